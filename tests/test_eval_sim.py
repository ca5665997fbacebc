"""`vla-accel-eval` end to end on the real LIBERO simulator with the tiny random policy (CPU).

Small on purpose: 64 px cameras, a few steps per episode, one task. Marked `sim`; skipped only
where the simulator or the asset folder is absent. The input-error tests need hf-libero's task
metadata but no simulator.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_accel.eval import results as R
from vla_accel.eval.shard import EpisodeKey

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VLA_ACCEL_LIBERO_ASSETS") or REPO.parent / "shared" / "libero-assets")
HAVE_LIBERO = importlib.util.find_spec("libero") is not None
HAVE_SIM = HAVE_LIBERO and importlib.util.find_spec("robosuite") is not None and ASSETS.is_dir()

needs_libero = pytest.mark.skipif(not HAVE_LIBERO, reason="hf-libero is not installed")
sim = [pytest.mark.sim,
       pytest.mark.skipif(not HAVE_SIM, reason=f"needs robosuite, hf-libero and the LIBERO assets ({ASSETS})")]

STEPS = 12
FAST = ["env.image_size=64", f"env.max_steps={STEPS}", "eval.progress=false", f"env.assets_path={ASSETS}"]


def eval_cli(*args, timeout=300):
    exe = Path(sys.executable).with_name("vla-accel-eval")   # the console script, as users run it
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vla_accel.eval.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def merge_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "vla_accel.eval.merge", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_env_run(tmp_path_factory):
    """2 envs, 3 episodes; episode 1's env raises at step 4; videos and a trace of episode 0."""
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    trace = run_dir.parent / "trace_spatial_t0_e0.npz"
    rc, out = eval_cli(*FAST, f"hydra.run.dir={run_dir}", "eval.num_envs=2", "eval.episodes=[0,1,2]",
                       "env.fault_step=4", "env.fault_episodes=[1]", "eval.video=true",
                       f"eval.record_trace={trace}", "eval.warmup_chunks=1")
    return run_dir, trace, rc, out


class TestTwoEnvRollout:
    pytestmark = sim

    def test_run_completes_and_prints_the_tables(self, two_env_run):
        run_dir, _, rc, out = two_env_run
        assert rc == 4, out[-4000:]                      # ran to the end, one episode recorded with an error
        assert "recorded with an error: 1 episode(s): libero_spatial/task0/ep1" in out
        assert "libero_spatial    all" in out and "policy latency per chunk" in out
        assert "RANDOM weights" in out and "device:" in out and "episodes/hour with 2 env(s)" in out

    def test_results_jsonl(self, two_env_run):
        run_dir, _, rc, out = two_env_run
        records = {R.key_of(r): r for r in R.read_records(run_dir / R.RESULTS_FILE)}
        assert sorted(records) == [EpisodeKey("libero_spatial", 0, e) for e in range(3)]
        faulty = records[EpisodeKey("libero_spatial", 0, 1)]
        assert faulty["success"] is False and "injected fault at step 4" in faulty["error"]
        assert faulty["steps"] == 4
        for e in (0, 2):
            r = records[EpisodeKey("libero_spatial", 0, e)]
            assert r["error"] is None
            assert r["steps"] == STEPS or r["success"]
            assert "black bowl" in r["instruction"]
            assert len(r["chunk_ms"]) == len(r["chunk_batch"]) == len(r["tokens_kept"]) >= 1
            assert sum(r["chunk_actions"]) == r["steps"]
        assert 2 in records[EpisodeKey("libero_spatial", 0, 0)]["chunk_batch"]   # one forward for both envs

    def test_results_json(self, two_env_run):
        run_dir, *_ = two_env_run
        summary = json.loads((run_dir / R.SUMMARY_FILE).read_text())
        assert not summary["complete"] and summary["exit_status"] == 4 and not summary["missing"]
        assert summary["random_weights"]
        assert summary["success"]["average"]["episodes"] == 3
        assert summary["success"]["per_task"][0]["errors"] == 1
        assert summary["latency"]["chunks"] >= 1 and summary["latency"]["median_ms"] > 0
        assert summary["throughput"]["num_envs"] == 2 and summary["throughput"]["episodes"] == 3

    def test_videos_and_trace(self, two_env_run):
        run_dir, trace, *_ = two_env_run
        videos = sorted(p.name for p in (run_dir / "videos").glob("*.mp4"))
        assert len(videos) == 3 and any(v.endswith("ep001_error.mp4") for v in videos), videos
        from vla_accel.envs import load_trace

        t = load_trace(trace)
        record = next(r for r in R.read_records(run_dir / R.RESULTS_FILE) if r["episode"] == 0)
        assert t["full_image"].shape == (record["steps"], 64, 64, 3)
        assert t["wrist_image"].shape == t["full_image"].shape
        assert t["state"].shape == (record["steps"], 8) and t["action"].shape == (record["steps"], 7)
        assert t["instruction"] == record["instruction"] and t["meta"]["episode"] == 0

    def test_resume_skips_finished_episodes(self, two_env_run):
        run_dir, *_ = two_env_run
        before = R.read_records(run_dir / R.RESULTS_FILE)
        # drop episode 2's line: a re-run in the same dir runs only that episode
        lines = (run_dir / R.RESULTS_FILE).read_text().splitlines()
        kept = [l for l in lines if json.loads(l)["episode"] != 2]
        (run_dir / R.RESULTS_FILE).write_text("\n".join(kept) + "\n")
        rc, out = eval_cli(*FAST, f"hydra.run.dir={run_dir}", "eval.num_envs=2", "eval.episodes=[0,1,2]",
                           "env.fault_step=4", "env.fault_episodes=[1]", "eval.warmup_chunks=1")
        assert rc == 4, out[-4000:]
        assert "2 already done, 1 to run" in out
        after = R.read_records(run_dir / R.RESULTS_FILE)
        assert after[:2] == [r for r in before if r["episode"] != 2]
        assert [r["episode"] for r in after[2:]] == [2]


@pytest.mark.sim
@pytest.mark.skipif(not HAVE_SIM, reason=f"needs robosuite, hf-libero and the LIBERO assets ({ASSETS})")
def test_two_shard_multirun_with_submitit_local_covers_every_episode_once(tmp_path):
    sweep = tmp_path / "sweep"
    rc, out = eval_cli("--multirun", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
                       "hydra.launcher.timeout_min=8", "eval.num_shards=2", "eval.shard=0,1",
                       "eval.episodes=[0,1,2]", *FAST, "env.max_steps=8", timeout=480)
    assert rc == 0, out[-4000:]
    shards = [R.read_records(sweep / str(job) / R.RESULTS_FILE) for job in (0, 1)]
    keys = [R.key_of(r) for records in shards for r in records]
    assert sorted(keys) == [EpisodeKey("libero_spatial", 0, e) for e in range(3)]   # each exactly once
    assert [len(s) for s in shards] == [2, 1]
    assert all(r["error"] is None for s in shards for r in s), [r["error"] for s in shards for r in s]
    rc, out = merge_cli(sweep)
    assert rc == 0 and "COMPLETE" in out and "3/3 episodes" in out, out
    # remove one finished episode from shard 1: merge names it as missing
    (sweep / "1" / R.RESULTS_FILE).write_text("")
    rc, out = merge_cli(sweep)
    assert rc == 1 and "MISSING: 1 episode(s) in no results.jsonl: libero_spatial/task0/ep1" in out, out


# ---- bad input: errors that list the valid values, before any simulator starts ----------------------

@needs_libero
@pytest.mark.parametrize("override,message", [
    ("eval.suites=[libero_spatail]", "valid suites: libero_spatial, libero_object, libero_goal, libero_10, libero_90"),
    ("eval.task_ids=[10]", "valid task ids: 0..9"),
    ("eval.episodes=[50]", "valid episode indices: 0..49"),
    ("env.assets_path=/nonexistent/libero-assets", "env.assets_path=/path/to/libero-assets"),
    ("eval.num_envs=0", "eval.num_envs must be >= 1"),
])
def test_bad_input_fails_with_the_valid_values(tmp_path, override, message):
    rc, out = eval_cli(*FAST, f"hydra.run.dir={tmp_path}", override, timeout=120)
    assert rc == 2 and message in out, out[-3000:]
    assert not (tmp_path / R.RESULTS_FILE).exists()


@needs_libero
@pytest.mark.skipif(not ASSETS.is_dir(), reason=f"needs the LIBERO assets ({ASSETS})")
def test_unloadable_checkpoint_fails_with_the_loaders_error_before_any_simulator(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    import vla_accel

    with pytest.raises(Exception) as loader_error:
        vla_accel.load_policy(str(ckpt), device="cpu")
    rc, out = eval_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", "policy=checkpoint",
                       f"policy.checkpoint={ckpt}", timeout=120)
    assert rc == 2 and str(loader_error.value) in out and "Traceback" not in out, out[-3000:]
    assert "robosuite" not in out                       # no simulator was started
    assert not (tmp_path / "run" / R.RESULTS_FILE).exists()


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SIM, reason=f"needs robosuite, hf-libero and the LIBERO assets ({ASSETS})")
def test_reset_timeouts_lose_no_episode(tmp_path):
    """Issue 12, item 1: with a 1 s timeout every LIBERO reset times out (building the scene takes
    longer); the episodes being started were dropped and the run exited 0. Now each one is retried
    and then recorded as an error, or the run stops naming it as missing; the exit status is not 0."""
    run_dir = tmp_path / "run"
    rc, out = eval_cli(*FAST, f"hydra.run.dir={run_dir}", "eval.episodes=[0,1,2]", "eval.step_timeout_s=1",
                       "env.max_steps=8", timeout=480)
    assert rc in (3, 4) and "Traceback" not in out, out[-4000:]
    summary = json.loads((run_dir / R.SUMMARY_FILE).read_text())
    recorded = {R.key_of(r) for r in R.read_records(run_dir / R.RESULTS_FILE)}
    missing = {EpisodeKey(*k) for k in summary["missing"]}
    assert recorded | missing == {EpisodeKey("libero_spatial", 0, e) for e in range(3)} and not recorded & missing
    assert all("did not answer within 1 s during reset" in r["error"]
               for r in R.read_records(run_dir / R.RESULTS_FILE))
