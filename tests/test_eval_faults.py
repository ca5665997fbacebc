"""Fault injection: every way an evaluation can be hit, and that no episode is lost or duplicated.

Each test runs `vla-accel-eval` on the fake simulator (tests/fakesim.py: the real CLI, tiny random
policy, runner, simulator worker processes and result files; only the simulator is a stand-in),
injects one fault -- a signal to the real main or worker process, found by its pid; an env
exception; a read-only run dir; a cut results line; NaN weights; a full disk -- checks the exit
status, resumes where the run did not finish, and checks that every selected episode is recorded
exactly once. The table (fault, episodes expected / recorded / lost / duplicated, exit statuses) is
written to $VLA_ACCEL_FAULT_TABLE (default: <pytest temp dir>/fault_table.md) when the module ends.

Worker faults use the testing-only seam of vla_accel.eval.faults: the worker reaching the chosen
point (start-up, reset or step of an episode) writes its pid into a file and waits; the test then
signals that pid (kill -9, SIGSTOP).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import fakesim
import pytest

from vla_accel.eval import results as R
from vla_accel.eval.shard import EpisodeKey

pytestmark = pytest.mark.faults

TESTS = Path(__file__).resolve().parent
SELECTION = [EpisodeKey("libero_spatial", t, e) for t in (0, 1) for e in (0, 1)]
ARGS = ["env.image_size=64", "env.max_steps=6", "eval.progress=false", "eval.warmup_chunks=0", "policy.device=cpu",
        "eval.task_ids=[0,1]", "eval.episodes=[0,1]", "eval.num_envs=2"]
TIMEOUT_S = 240           # one run of 4 short episodes takes ~10 s on an idle 2-core machine
ROWS: list[dict] = []


# ---- running vla-accel-eval on the fake simulator -----------------------------------------------------

def launch(run_dir, *extra, **kw):
    return fakesim.launch([*ARGS, f"hydra.run.dir={run_dir}", *extra], **kw)


def finish(proc):
    return fakesim.finish(proc, TIMEOUT_S)


def run(run_dir, *extra, **kw):
    return finish(launch(run_dir, *extra, **kw))


def paused_pid(fault_dir: Path, where: str, proc) -> int:
    """The pid of the process waiting at the fault point `where` (see vla_accel.eval.faults)."""
    marker = fault_dir / f"{where}.pid"
    end = time.monotonic() + TIMEOUT_S
    while not (marker.exists() and marker.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            rc, out = finish(proc)
            pytest.fail(f"the run never reached the fault point {where} (exit {rc}):\n{out[-4000:]}")
        time.sleep(0.05)
    return int(marker.read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def gone_within(pids, seconds=15.0) -> bool:
    end = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def summary(run_dir) -> dict:
    return json.loads((run_dir / R.SUMMARY_FILE).read_text())


def account(fault: str, run_dir: Path, statuses: list[int], clean=True) -> dict:
    """Check (and add to the table): each selected episode recorded exactly once, nothing else."""
    latest, duplicates = R.effective_records(R.read_records(run_dir / R.RESULTS_FILE))
    recorded = [k for k in SELECTION if k in latest]
    row = {"fault": fault, "expected": len(SELECTION), "recorded": len(recorded),
           "lost": len(SELECTION) - len(recorded), "duplicated": len(duplicates),
           "exit": " -> ".join(map(str, statuses))}
    ROWS.append(row)
    assert row["lost"] == 0 and row["duplicated"] == 0, row
    assert set(latest) == set(SELECTION), sorted(set(latest) - set(SELECTION))
    if clean:
        assert all(latest[k]["error"] is None for k in SELECTION), [latest[k]["error"] for k in SELECTION]
    return latest


def resume(fault: str, run_dir: Path, first_status: int, *extra, says: str = "") -> None:
    """Run again in the same dir; it must finish clean, with every episode once (added to the table)."""
    rc, out = run(run_dir, *extra)
    assert rc == 0 and says in out, out[-4000:]
    account(fault, run_dir, [first_status, rc])


@pytest.fixture(scope="module", autouse=True)
def fault_table(tmp_path_factory):
    yield
    path = Path(os.environ.get("VLA_ACCEL_FAULT_TABLE") or tmp_path_factory.getbasetemp() / "fault_table.md")
    lines = ["| fault injected | episodes expected | recorded | lost | duplicated | exit status (run -> resume) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fault']} | {r['expected']} | {r['recorded']} | {r['lost']} | {r['duplicated']} | {r['exit']} |"
              for r in ROWS]
    path.write_text("\n".join(lines) + "\n")
    print(f"\nfault table ({path}):\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete, clean run; tests that need a finished run dir work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    rc, out = run(run_dir)
    assert rc == 0, out[-4000:]
    return run_dir


def copy_of(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


# ---- the main process --------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_of_the_main_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, faults={"dir": str(tmp_path), "pause": "step", "task": 1, "episode": 1, "step": 2})
    paused_pid(tmp_path, "step", proc)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    assert gone_within(workers), "simulator workers outlived the killed main process"
    assert len(R.read_records(run_dir / R.RESULTS_FILE)) >= 2          # task 0 finished before the kill
    resume("kill -9 of the main process (during task 1 ep 1)", run_dir, rc)


@pytest.mark.slow
def test_sigint_of_the_main_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, faults={"dir": str(tmp_path), "pause": "step", "task": 1, "episode": 1, "step": 2})
    paused = paused_pid(tmp_path, "step", proc)
    os.killpg(proc.pid, signal.SIGINT)                  # as Ctrl-C does: the whole process group
    rc, out = finish(proc)
    assert rc == 130 and "interrupted" in out and "Traceback" not in out, out[-4000:]
    assert not alive(paused)
    s = summary(run_dir)
    assert s["interrupted"] and not s["complete"] and s["missing"] and s["exit_status"] == 130
    resume("SIGINT (Ctrl-C) of the main process", run_dir, rc)


# ---- simulator workers -------------------------------------------------------------------------------

@pytest.mark.parametrize("where,phase,point", [
    ("startup", "start-up", {}),
    ("reset", "reset", {"task": 0, "episode": 1}),
    ("step", "step", {"task": 0, "episode": 1, "step": 2}),
])
def test_kill_9_of_a_worker(tmp_path, where, phase, point):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, faults={"dir": str(tmp_path), "pause": where, **point})
    os.kill(paused_pid(tmp_path, where, proc), signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    assert f"was killed by SIGKILL during {phase}" in out, out[-4000:]
    assert summary(run_dir)["throughput"]["worker_restarts"] == 1
    account(f"kill -9 of a simulator worker at {phase}", run_dir, [rc])


@pytest.mark.slow
def test_sigstop_of_a_worker(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "eval.step_timeout_s=8",
                  faults={"dir": str(tmp_path), "pause": "step", "task": 0, "episode": 1, "step": 2})
    stopped = paused_pid(tmp_path, "step", proc)
    os.kill(stopped, signal.SIGSTOP)
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    assert "did not answer within 8 s" in out and not alive(stopped), out[-4000:]
    account("SIGSTOP of a simulator worker (step_timeout_s=8)", run_dir, [rc])


# ---- the simulator, the files, the policy ------------------------------------------------------------

def test_env_exceptions(tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run(run_dir, "env.fault_step=2", "env.fault_episodes=[1]")
    assert rc == 4, out[-4000:]
    s = summary(run_dir)
    assert not s["complete"] and len(s["errors"]) == 2 and not s["missing"]
    assert all("injected fault at step 2" in e["error"] for e in s["errors"])
    # without the fault (its fields are not part of the identity), the errored episodes again
    resume("env exception at step 2 of 2 episodes (retried with eval.retry_errors)", run_dir, rc,
           "eval.retry_errors=true", says="2 already done, 2 to run")


def read_only(path: Path):
    """A command prefix under which `path` is read-only, and how to undo it (None, None: impossible here)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return [], lambda: [p.chmod(m) for p, m in modes.items()]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, str(path)], lambda: None
    return None, None


def test_read_only_run_dir(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    lines = (run_dir / R.RESULTS_FILE).read_text().splitlines(keepends=True)
    (run_dir / R.RESULTS_FILE).write_text("".join(lines[:2]))           # two episodes left to run
    prefix, undo = read_only(run_dir)
    if prefix is None:
        pytest.skip("root without user namespaces: no way to make a directory read-only here")
    before = (run_dir / R.RESULTS_FILE).read_bytes()
    rc, out = run(run_dir, prefix=prefix)
    undo()
    assert rc == 2 and "cannot write" in out and "Traceback" not in out, out[-4000:]
    assert (run_dir / R.RESULTS_FILE).read_bytes() == before
    resume("read-only run dir (2 episodes left to run)", run_dir, rc, says="2 already done, 2 to run")


def test_truncated_results_line(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    text = (run_dir / R.RESULTS_FILE).read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    (run_dir / R.RESULTS_FILE).write_text(text[: len(text) - len(last) // 2 - 1])   # a crash mid-line
    rc, out = run(run_dir)
    assert rc == 0 and "is not a valid episode record" in out and "3 already done, 1 to run" in out, out[-4000:]
    account("results.jsonl line cut in half", run_dir, [rc])


def test_disk_full(tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run(run_dir, faults={"disk_full_after": 2})
    assert rc == 3 and "Traceback" not in out, out[-4000:]
    assert out.count("No space left on device") == 1, out[-4000:]
    text = (run_dir / R.RESULTS_FILE).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2           # the half-written line was cut off
    assert len(summary(run_dir)["missing"]) == 2
    resume("disk full (ENOSPC) at the 3rd results line", run_dir, rc)


@pytest.mark.slow
def test_nan_weights(tmp_path):
    import torch
    from test_checkpoint import write_tiny_tokenizer

    from vla_accel import random_policy, save_checkpoint

    ckpt = tmp_path / "ckpt"
    policy = random_policy("tiny", seed=3)
    with torch.no_grad():
        weight = next(policy.model.action_head.parameters())
        good = weight.clone()
        weight[0] = float("nan")
    save_checkpoint(policy, ckpt)
    write_tiny_tokenizer(ckpt)
    run_dir = tmp_path / "run"
    args = ["policy=checkpoint", f"policy.checkpoint={ckpt}", "policy.unnorm_key=random_no_noops",
            "eval.num_envs=1"]
    rc, out = run(run_dir, *args)
    assert rc == 3 and "policy calls in a row failed" in out and "Traceback" not in out, out[-4000:]
    records = R.read_records(run_dir / R.RESULTS_FILE)
    assert len(records) == 3 and all("non-finite action" in r["error"] and "nan" in r["error"] for r in records)
    with torch.no_grad():
        weight.copy_(good)
    save_checkpoint(policy, ckpt)                                       # the cause fixed: same files, good weights
    resume("NaN in the checkpoint's weights (fixed, then eval.retry_errors)", run_dir, rc, *args,
           "eval.retry_errors=true", says="0 already done, 4 to run")
