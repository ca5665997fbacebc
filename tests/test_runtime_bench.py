"""CPU: `vla-accel-bench e2e` runs end to end on the tiny model (emulated graphs) and its equivalence checks
pass at fp32 tolerance; `vla-accel-bench` dispatches its subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vla_accel.bench import main as dispatch


def tiny_trace(path: Path, steps: int = 3) -> Path:
    from vla_accel.envs.trace import save_trace

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    frames = []
    for t in range(steps):  # a slowly changing scene, so the changed-patch rule sees motion
        img = base.copy()
        img[:, 10 * t:10 * t + 20, 10:40] = 255 - img[:, 10 * t:10 * t + 20, 10:40]
        frames.append({"full_image": img[0], "wrist_image": img[1], "state": rng.normal(size=8) * 0.1,
                       "action": rng.normal(size=7) * 0.3})
    return save_trace(path / "trace.npz", frames, "put the bowl on the plate", {"suite": "test"})


@pytest.mark.slow
def test_bench_e2e_smoke(tmp_path):
    trace = tiny_trace(tmp_path)
    dispatch(["e2e", "--trace", str(trace), "--preset", "tiny", "--device", "cpu", "--steps", "3", "--allow-short",
              "--configs", "b,c,d,e", "--streams", "2", "--check-every", "1", "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert not res["errors"], res["errors"]
    assert {"b", "c", "d", "d'", "e", "e'"} <= set(res["configs"])
    for key in ("c", "d", "e"):
        assert res["checks"][key]["pass"], res["checks"][key]
    d = res["configs"]["d"]
    assert d["tokens_mean"] < res["configs"]["c"]["tokens_mean"]  # SpecPrune pruned
    assert d["floor_at_mean_tokens_ms"] > 0 and len(d["tokens_per_layer_mean"]) == 8
    assert (tmp_path / "out" / "e2e.md").read_text().startswith("# End-to-end")


@pytest.mark.slow
def test_profile_smoke(tmp_path):
    """`python -m vla_accel.runtime.profile` on the tiny model on CPU: every section runs and is written (the GPU-only
    parts -- kernel timings, sync audit, traces -- are left out there, and say so)."""
    from vla_accel.runtime.profile import main as profile

    trace = tiny_trace(tmp_path)
    profile(["--trace", str(trace), "--preset", "tiny", "--device", "cpu", "--steps", "3", "--out", str(tmp_path / "p")])
    out = tmp_path / "p"
    summary = json.loads((out / "summary.json").read_text())
    assert {"vision", "c", "d", "d_replay", "d_host_breakdown"} <= set(summary)
    host = summary["d_host_breakdown"]
    assert host["PrunePlan.on_scores"]["calls_per_query"] == 3  # score layers 0, 1, 3 of the tiny schedule
    assert host["AccelRunner.forward"]["calls_per_query"] == 1 and host["_latency_ms_median"] > 0
    for name in ("kernels_c.txt", "host_d.txt", "host_d_ops.txt"):
        assert (out / name).stat().st_size > 0
    assert "GPU only" in (out / "ops_error.txt").read_text()


def test_bench_dispatch_errors():
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        dispatch(["train"])
    with pytest.raises(SystemExit, match="need >= 50 consecutive steps"):
        dispatch(["e2e", "--trace", str(tiny_trace(Path(__import__("tempfile").mkdtemp()))), "--preset", "tiny",
                  "--device", "cpu"])
