"""`vla-accel-eval policy=remote`: the LIBERO simulator here, the policy in a vla-accel-serve process on
loopback; success, steps and every executed action equal a local run with the same seed (tiny random policy,
CPU, 64 px, a few steps). One simulator, so every forward of either run holds one request: bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_clients import server
from test_eval_sim import FAST, eval_cli, sim

from vla_accel.envs.trace import load_trace

pytestmark = [*sim, pytest.mark.slow]


def run_eval(tmp_path, name: str, *extra: str) -> tuple[dict, np.ndarray]:
    run_dir, trace = tmp_path / name, tmp_path / f"{name}.npz"
    rc, out = eval_cli(*FAST, f"hydra.run.dir={run_dir}", "eval.episodes=[0]", f"eval.record_trace={trace}",
                       *extra)
    assert rc == 0, out[-3000:]
    summary = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    run = json.loads((run_dir / "run.json").read_text())
    return {"summary": summary, "records": records, "run": run}, load_trace(trace)["action"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return run_eval(tmp_path_factory.mktemp("local"), "local", "policy.device=cpu")


@pytest.mark.parametrize("mode", ["action", "chunk"])
def test_remote_eval_equals_local_eval(tmp_path, local_run, mode):
    local, local_actions = local_run
    with server(f"serve.mode={mode}", log_path=tmp_path / "server.log") as s:
        remote, remote_actions = run_eval(tmp_path, "remote", "policy=remote", f"policy.url={s.ws}")
        assert s.alive()
    (lr,), (rr,) = local["records"], remote["records"]
    assert (rr["success"], rr["steps"], rr["error"]) == (lr["success"], lr["steps"], lr["error"])
    assert len(remote_actions) == len(local_actions) == lr["steps"] > 0
    np.testing.assert_array_equal(remote_actions, local_actions)
    assert "remote: ws://127.0.0.1" in remote["summary"]["device"]
    assert remote["summary"]["policy"]["remote_mode"] == mode
    # the server's per-chunk information reaches the results (the forward's time on the server)
    assert all(ms is not None and ms > 0 for ms in rr["chunk_model_ms"])
    # the remote run is fingerprinted by the server's policy: the same identity as the local policy's
    served = remote["run"]["fingerprint_fields"]["policy"]["server"]
    assert served["policy"] == local["run"]["fingerprint_fields"]["policy"]
    assert served["prune"] == {"name": "none"} and served["runtime"]["name"] == "reference"


def test_remote_policy_needs_a_url_and_a_server(tmp_path):
    rc, out = eval_cli(*FAST, f"hydra.run.dir={tmp_path / 'a'}", "policy=remote")
    assert rc == 2 and "policy.url" in out
    rc, out = eval_cli(*FAST, f"hydra.run.dir={tmp_path / 'b'}", "policy=remote", "policy.url=ws://127.0.0.1:9")
    assert rc == 2 and "cannot reach the policy server at ws://127.0.0.1:9" in out
    rc, out = eval_cli(*FAST, f"hydra.run.dir={tmp_path / 'c'}", "policy=remote", "policy.url=ws://127.0.0.1:9",
                       "prune=specprune")
    assert rc == 2 and "prune=specprune would not apply here" in out
