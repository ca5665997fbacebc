"""Where the time goes, report.png and the pre-capture path (issue 13).

- The runner's timing parts cover the wall time (the parts are measured around separate calls, so they can
  miss time or count it twice; the test checks neither happens beyond 5%), with a stand-in env and actor whose
  step, render, pre-processing, forward and post-processing times are known.
- The real CLI on the fast stand-in simulator (tests/fakesim.py) with the tiny random policy on the emulated
  accelerated runtime (runtime.on_cpu=emulate: graph bookkeeping without a GPU): the pre-capture runs, no
  timed chunk captures a graph afterwards, the timing block and report.png are written. Without the
  pre-capture the first forwards do capture, and exactly those chunks are left out of the latency.
"""

import json
import time
from collections import Counter, deque
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from fakesim import finish, launch
from gymnasium import spaces

from vla_accel.eval import results as R
from vla_accel.eval.runner import RolloutRunner
from vla_accel.eval.shard import EpisodeKey
from vla_accel.eval.timing import PARTS, GpuSampler, Timing, merge_timings

STEP_S, RENDER_S, RESET_S = 0.004, 0.001, 0.01
PREP_S, FORWARD_S, POST_S = 0.002, 0.004, 0.001
CHUNK = 4


class TimedEnv(gym.Env):
    """Steps take STEP_S, of which time_render() says RENDER_S is rendering; episodes run `max_steps`."""

    def __init__(self, max_steps=10):
        image = spaces.Box(0, 255, (8, 8, 3), np.uint8)
        self.observation_space = spaces.Dict({"full_image": image, "wrist_image": image,
                                              "state": spaces.Box(-np.inf, np.inf, (8,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.max_steps, self.t = max_steps, 0

    def _obs(self):
        img = np.full((8, 8, 3), self.t, np.uint8)
        return {"full_image": img, "wrist_image": img, "state": np.zeros(8, np.float32)}

    def reset(self, *, seed=None, options=None):
        time.sleep(RESET_S)
        self.t = 0
        return self._obs(), {"instruction": "do it"}

    def step(self, action):
        time.sleep(STEP_S)
        self.t += 1
        return self._obs(), 0.0, False, self.t >= self.max_steps, {"success": False}

    def time_render(self):
        return RENDER_S


def make_timed_env(max_steps, suite, task_id):
    return TimedEnv(max_steps)


class TimedActor:
    """Chunked actor whose forward sleeps PREP_S + FORWARD_S + POST_S and reports them as the real ones do."""

    def __init__(self):
        self.queues, self.batches = {}, []

    def describe(self):
        return {"name": "timed", "random_weights": True, "device": "cpu", "dtype": "float32"}

    def reset(self, streams):
        for s in streams:
            self.queues[s] = deque()

    def act_batch(self, obs_list, instructions, streams):
        need = [j for j, s in enumerate(streams) if not self.queues[s]]
        infos = [{"queried": False, "latency_ms": None, "batch_size": None, "tokens_kept": None} for _ in streams]
        if need:
            t0 = time.perf_counter()
            time.sleep(PREP_S)
            t1 = time.perf_counter()
            time.sleep(FORWARD_S)
            t2 = time.perf_counter()
            for j in need:
                self.queues[streams[j]].extend([np.zeros(7, np.float32)] * CHUNK)
            time.sleep(POST_S)
            t3 = time.perf_counter()
            self.batches.append(len(need))
            for j in need:
                infos[j] = {"queried": True, "latency_ms": 1e3 * (t2 - t1), "batch_size": len(need),
                            "tokens_kept": 10, "prep_ms": 1e3 * (t1 - t0), "post_ms": 1e3 * (t3 - t2)}
        return np.stack([self.queues[s].popleft() for s in streams]), infos


def test_timing_parts_cover_the_wall_time_and_follow_the_known_costs():
    records, actor = [], TimedActor()
    runner = RolloutRunner(actor, partial(make_timed_env, 10), num_envs=2, on_episode=records.append,
                           warmup_chunks=0)
    stats = runner.run([EpisodeKey("libero_spatial", 0, e) for e in range(4)])
    t = stats.timing_summary()
    parts = t["parts_s"]
    assert set(parts) == set(PARTS) | {"other"}
    assert all(v >= 0 for k, v in parts.items() if k != "other"), parts
    # nothing counted twice (other would go negative), nothing large missed (other would grow)
    assert -0.001 * t["wall_s"] <= parts["other"] <= 0.05 * t["wall_s"], parts
    assert abs(sum(parts.values()) - t["wall_s"]) < 0.01
    # the known costs: 4 episodes x 10 steps on 2 envs = 20 step rounds of >= STEP_S; chunks of 4 actions:
    # forwards at steps 0, 4, 8 of each pair of episodes = 6 forwards of 2
    assert t["env_steps"] == sum(r["steps"] for r in records) == 40
    assert t["forwards"] == len(actor.batches) == 6
    assert t["batch_sizes"] == {str(b): n for b, n in sorted(Counter(actor.batches).items())}
    assert t["chunks"] == sum(actor.batches)
    assert parts["render"] == pytest.approx(20 * RENDER_S, rel=0.05)
    assert parts["sim_step"] + parts["render"] >= 20 * STEP_S * 0.9
    assert parts["policy_prep"] >= 6 * PREP_S * 0.9 and parts["policy_post"] >= 6 * POST_S * 0.9
    assert parts["policy_forward"] >= 6 * FORWARD_S * 0.9 and parts["graph_capture"] == 0
    assert parts["reset"] >= 4 * RESET_S * 0.9 / 2        # two resets run side by side
    assert parts["startup"] > 0 and parts["shutdown"] >= 0
    assert t["render"].startswith("estimated")
    assert t["gpu"] == {"sampled": False, "why": "the policy does not run on CUDA"}
    assert t["episodes_per_hour"] == pytest.approx(3600 * 4 / t["wall_s"], rel=1e-3)


def test_policy_call_split_never_exceeds_the_call_and_takes_captures_out_of_the_forward():
    timing = Timing()
    info = {"queried": True, "latency_ms": 30.0, "batch_size": 2, "prep_ms": 5.0, "post_ms": 1.0}
    timing.policy_call(0.040, [info, info], capture_s=0.020, captures=3)
    p = timing.parts
    assert p["graph_capture"] == pytest.approx(0.020) and p["policy_forward"] == pytest.approx(0.010)
    assert p["policy_prep"] == pytest.approx(0.005) and p["policy_post"] == pytest.approx(0.001)
    assert p["policy_other"] == pytest.approx(0.004)
    assert timing.forwards == 1 and timing.capture_forwards == 1 and timing.batch_sizes == {2: 1}
    timing.policy_call(0.001, [{"queried": False}])             # a call that only popped queued actions
    assert p["policy_other"] == pytest.approx(0.005) and timing.forwards == 1


def test_step_round_split_sums_to_the_round():
    timing = Timing()
    infos = [{"busy_s": 0.050, "render_s": 0.020}, {"busy_s": 0.080, "render_s": 0.030}, {"error": "x"}]
    timing.step_round(0.100, 0.005, infos)
    p = timing.parts
    assert p["obs_transfer"] == pytest.approx(0.005)
    assert p["render"] == pytest.approx(0.030) and p["sim_step"] == pytest.approx(0.050)   # the slowest worker
    assert p["sim_wait"] == pytest.approx(0.015)
    assert timing.env_steps == 2


def test_gpu_sampler_without_a_gpu_says_why():
    sampler = GpuSampler("cuda:0", interval_s=0.05).start()
    out = sampler.stop()
    if out["sampled"]:
        pytest.skip("this machine has an NVIDIA GPU that answers")
    assert "nvml" in out["why"] or "nvidia-smi" in out["why"]


def test_merge_timings_adds_runs_up():
    a = {"wall_s": 10.0, "parts_s": {"sim_step": 6.0, "policy_forward": 3.0, "other": 1.0}, "forwards": 5,
         "forwards_with_capture": 0, "chunks": 10, "env_steps": 40, "episodes": 2, "batch_sizes": {"2": 5},
         "render": "not separable: inside sim_step", "gpu": {"sampled": False}}
    b = dict(a, wall_s=20.0, parts_s={"sim_step": 15.0, "policy_forward": 4.0, "other": 1.0},
             batch_sizes={"1": 2, "2": 4})
    m = merge_timings([a, b, None])
    assert m["runs"] == 2 and m["wall_s"] == 30.0 and m["parts_s"]["sim_step"] == 21.0
    assert m["batch_sizes"] == {"1": 2, "2": 9} and m["episodes"] == 4
    assert m["covered_fraction"] == pytest.approx(28 / 30, abs=1e-4)


# ---- the real CLI on the stand-in simulator, tiny policy, emulated accelerated runtime ------------------------

RUN = ["runtime=accel", "runtime.on_cpu=emulate", "eval.num_envs=3", "eval.task_ids=[0]", "eval.episodes=[0,1,2,3,4]",
       "env.max_steps=10", "env.image_size=64", "eval.progress=false", "eval.warmup_chunks=0"]


def _run(run_dir, *extra):
    rc, out = finish(launch([*RUN, *extra, f"hydra.run.dir={run_dir}"]), timeout=600)
    assert rc == 0, out[-4000:]
    return json.loads((run_dir / R.SUMMARY_FILE).read_text()), R.read_records(run_dir / R.RESULTS_FILE), out


@pytest.fixture(scope="module")
def precaptured(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("precaptured")
    return (run_dir, *_run(run_dir))


def test_precapture_runs_before_the_rollout_and_no_timed_chunk_captures(precaptured):
    run_dir, summary, records, out = precaptured
    pre = summary["timing"]["precapture"]
    assert pre["ran"] and pre["batch_sizes"] == [1, 2, 3] and pre["graphs_captured"] > 0
    assert pre["seconds"] <= summary["timing"]["parts_s"]["startup"]      # inside the start-up, not the loop
    # batch size 3 is not in runtime.batch_sizes' default [1, 2, 4, 8]: the eval added it (graphs, not eager)
    assert 3 in summary["policy"]["runtime"]["config"]["batch_sizes"]
    chunks = [c for r in records for c in r["chunk_capture_ms"]]
    assert chunks and not any(chunks), "a timed chunk captured a graph after the pre-capture"
    assert summary["timing"]["forwards_with_capture"] == 0
    assert summary["latency"]["capture_chunks_excluded"] == 0
    assert summary["timing"]["batch_sizes"].get("3", 0) > 0


def test_cli_writes_the_timing_block_and_report_png(precaptured):
    run_dir, summary, records, out = precaptured
    t = summary["timing"]
    assert set(t["parts_s"]) == set(PARTS) | {"other"}
    assert t["covered_fraction"] >= 0.95 and abs(sum(t["parts_s"].values()) - t["wall_s"]) < 0.01
    assert t["parts_s"]["policy_prep"] > 0 and t["parts_s"]["policy_forward"] > 0 and t["parts_s"]["policy_post"] > 0
    assert t["env_steps"] == sum(r["steps"] for r in records) and t["episodes"] == 5
    assert t["render"] == "not separable: inside sim_step"          # the stand-in simulator has no time_render
    assert not t["gpu"]["sampled"]
    assert "where the time went" in out and "where the time went" in (run_dir / R.TABLE_FILE).read_text()
    png = (run_dir / R.REPORT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_without_precapture_the_capturing_chunks_are_flagged_and_left_out(tmp_path):
    summary, records, _ = _run(tmp_path, "eval.precapture_steps=0", "eval.report=false")
    assert "precapture" not in summary["timing"] and not (tmp_path / R.REPORT_FILE).exists()
    flagged = sum(1 for r in records for c in r["chunk_capture_ms"] if c)
    assert flagged > 0 and summary["timing"]["forwards_with_capture"] > 0
    assert summary["latency"]["capture_chunks_excluded"] == flagged
    assert summary["latency"]["chunks"] == sum(len(r["chunk_ms"]) for r in records) - flagged


# ---- eval.prepare_in_workers: the same results, the images prepared in the simulator workers -------------------


@pytest.mark.parametrize("prune", ["specprune", "none"])
def test_preparing_images_in_the_workers_changes_no_result(tmp_path, prune):
    from vla_accel.envs import load_trace

    runs = {}
    for on in (False, True):
        run_dir = tmp_path / f"prep_{on}"
        args = [f"prune={prune}", "eval.num_envs=2", "eval.task_ids=[0,1]", "eval.episodes=[0,1]", "env.max_steps=12",
                "env.image_size=64", "eval.progress=false", "eval.report=false", f"eval.prepare_in_workers={on}",
                f"eval.record_trace={run_dir / 'traces'}", f"hydra.run.dir={run_dir}"]
        rc, out = finish(launch(args), timeout=600)
        assert rc == 0, out[-4000:]
        summary = json.loads((run_dir / R.SUMMARY_FILE).read_text())
        records = {R.key_of(r): r for r in R.read_records(run_dir / R.RESULTS_FILE)}
        traces = {p.name: load_trace(p) for p in sorted((run_dir / "traces").glob("*.npz"))}
        runs[on] = summary, records, traces
    (s_off, rec_off, tr_off), (s_on, rec_on, tr_on) = runs[False], runs[True]
    assert s_on["timing"]["parts_s"]["worker_prep"] > 0 and s_off["timing"]["parts_s"]["worker_prep"] == 0
    assert rec_on.keys() == rec_off.keys() and len(rec_on) == 4 and tr_on.keys() == tr_off.keys()
    for key, r in rec_off.items():
        o = rec_on[key]
        assert (o["success"], o["steps"], o["chunk_batch"], o["tokens_kept"]) == \
            (r["success"], r["steps"], r["chunk_batch"], r["tokens_kept"]), key
        assert o["chunk_extra"].get("kept_per_layer") == r["chunk_extra"].get("kept_per_layer"), key
    for name, t in tr_off.items():
        np.testing.assert_array_equal(tr_on[name]["action"], t["action"], err_msg=name)   # bit for bit


def test_policy_and_specprune_take_prepared_images_only_for_their_own_spec():
    import vla_accel
    from vla_accel import processing as P
    from vla_accel.prune.wrapper import Frame

    policy = vla_accel.random_policy("tiny")
    rng = np.random.default_rng(0)
    obs = {"full_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           "wrist_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "state": np.zeros(8, np.float32)}
    prepared = policy.image_prep()(obs)                      # what a worker sends (picklable callable)
    want = [P.prepare_image(obs[k], *policy.image_spec) for k in ("full_image", "wrist_image")]
    for got, w in zip(P.model_images(prepared, policy.image_spec), want):
        np.testing.assert_array_equal(got, w)
    # prepare() uses what the observation carries (a marked copy shows it), and only for its own spec
    marked = {**obs, P.MODEL_IMAGES: {"spec": policy.image_spec, "images": [np.zeros_like(w) for w in want]}}
    _, pixels, _ = policy.prepare([marked], ["pick it up"])
    _, zeros, _ = policy.prepare([{**obs, "full_image": np.zeros_like(want[0]), "wrist_image": np.zeros_like(want[1])}],
                                 ["pick it up"])
    assert torch_equal(pixels, zeros)
    other = {**marked, P.MODEL_IMAGES: {**marked[P.MODEL_IMAGES], "spec": (policy.image_spec[0], False, True)}}
    _, own, _ = policy.prepare([other], ["pick it up"])
    _, plain, _ = policy.prepare([obs], ["pick it up"])
    assert torch_equal(own, plain)
    assert Frame(marked, policy.image_spec).model is not None and Frame(other, policy.image_spec).model is None


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_rollout_summary_extrapolates_the_protocol_from_measured_suites(tmp_path):
    from benchmarks import rollout_summary as RS

    run = tmp_path / "a"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"prune": {"name": "specprune"}, "runtime": {"name": "accel"},
                                                         "eval": {"num_envs": 16}, "env": {"max_steps": None}}}))
    (run / "results.json").write_text(json.dumps({
        "device": "NVIDIA H200", "throughput": {"num_envs": 16}, "latency": {}, "missing": [], "errors": [],
        "policy": {"source": "random:7b", "random_weights": True, "dtype": "bfloat16", "executor": "accel"},
        "timing": {"wall_s": 120.0, "parts_s": {"startup": 30.0}, "episodes_per_hour": 1000.0}}))
    lines = []
    for suite, wall in (("libero_spatial", 23.0), ("libero_goal", 31.0), ("libero_10", 53.0)):   # 0.1 s per step
        for e in range(2):
            lines.append({"suite": suite, "task_id": 2, "episode": e, "success": False, "wall_s": wall, "error": None,
                          "steps": RS.MAX_STEPS[suite], "chunk_ms": [20.0, 12.0, 11.0],
                          "chunk_model_ms": [18.0, 10.0, 9.0], "chunk_batch": [16, 16, 1],
                          "chunk_warmup": [True, False, False], "chunk_capture_ms": [0.0, 0.0, 0.0]})
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert RS.main([str(tmp_path), "--out", str(tmp_path / "out"), "--commit", "abc"]) == 0
    doc = json.loads((tmp_path / "out" / f"rollout_nvidia-h200_{time.strftime('%Y-%m-%d', time.gmtime())}.json")
                     .read_text())
    rows = {r["suite"]: r for r in doc["suites"]}
    assert rows["libero_spatial"]["episodes_per_hour"] == pytest.approx(16 * 3600 / 23, abs=0.1)
    assert rows["libero_object"]["how"].startswith("estimated") and rows["libero_object"]["mean_episode_s"] == 29.0
    expected = sum(500 / (16 * 3600 / w) * 60 for w in (23.0, 29.0, 31.0, 53.0)) + 0.5
    assert doc["protocol_total_min"] == pytest.approx(expected, abs=0.2)
    lat = {(r["prune"], r["batch"]): r for r in doc["latency"]}
    assert lat[("specprune", 1)]["model_median_ms"] == 9.0 and lat[("specprune", 1)]["vs_trace"] == 0.9
    assert lat[("specprune", 16)]["model_median_ms"] == 10.0 and lat[("specprune", 16)]["trace_ms"] is None
