"""The vectorized runner and the CLI flow with a fake simulator and a fake actor (fast, no LIBERO).

The fake env encodes (task, episode, step) in the state it returns and checks that every action it
receives was computed for exactly that episode and step, so mis-routed observations or actions
between streams, or a chunk executed out of order, surface as episode errors.
"""

import json
import os
import time
from collections import deque
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from vla_accel.eval import results as R
from vla_accel.eval.runner import RolloutRunner
from vla_accel.eval.shard import EpisodeKey

CHUNK = 4


class FakeEnv(gym.Env):
    """Even episodes succeed at step `succeed_at`; odd ones run to max_steps."""

    def __init__(self, suite, task_id, succeed_at=6, max_steps=10, fault=None, crash=None, slow_reset=None):
        image = spaces.Box(0, 255, (8, 8, 3), np.uint8)
        self.observation_space = spaces.Dict({"full_image": image, "wrist_image": image,
                                              "state": spaces.Box(-np.inf, np.inf, (8,), np.float32),
                                              "instruction": spaces.Text(64)})
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.succeed_at, self.max_steps = succeed_at, max_steps
        self.fault, self.crash = fault, crash          # (episode, step)
        self.slow_reset = slow_reset                   # (episode, seconds): a reset that hangs
        self.key, self.t = None, 0

    def _obs(self):
        suite, task, ep = self.key
        state = np.array([task, ep, self.t, 0, 0, 0, 0, 0], np.float32)
        img = np.full((8, 8, 3), ep, np.uint8)
        return {"full_image": img, "wrist_image": img, "state": state, "instruction": f"task {task}"}

    def reset(self, *, seed=None, options=None):
        if self.slow_reset and options["episode"] == self.slow_reset[0]:
            time.sleep(self.slow_reset[1])
        self.key = (options["suite"], options["task_id"], options["episode"])
        self.t = 0
        mark = os.environ.get("VLA_ACCEL_TEST_MARK", "")      # shows the worker's environment
        return self._obs(), {"instruction": f"do task {options['task_id']}{mark}"}

    def step(self, action):
        if (action[0], action[1]) != (self.key[2], self.t):
            raise AssertionError(f"episode {self.key[2]} step {self.t} got an action meant for {action[:2]}")
        if self.crash == (self.key[2], self.t):
            os._exit(3)                                  # the worker process dies
        if self.fault == (self.key[2], self.t):
            raise RuntimeError("fake sim exploded")
        self.t += 1
        success = self.key[2] % 2 == 0 and self.t >= self.succeed_at
        return self._obs(), float(success), success, self.t >= self.max_steps and not success, {"success": success}


def make_fake_env(params, suite, task_id):
    return FakeEnv(suite, task_id, **params)


class FakeActor:
    """Chunked open-loop actor: one batched 'forward' per call for the streams whose queue is empty."""

    def __init__(self, interrupt_after_calls=None, nan_episodes=()):
        self.queues, self.batches = {}, []
        self.interrupt_after_calls = interrupt_after_calls
        self.nan_episodes = set(nan_episodes)          # chunks for these episodes hold a NaN

    def describe(self):
        return {"name": "fake", "random_weights": True, "device": "cpu", "dtype": "float32"}

    def reset(self, streams):
        for s in streams:
            self.queues[s] = deque()

    def act_batch(self, obs_list, instructions, streams):
        assert len(obs_list) == len(instructions) == len(streams)
        need = [j for j, s in enumerate(streams) if not self.queues[s]]
        infos = [{"queried": False, "latency_ms": None, "batch_size": None, "tokens_kept": None}
                 for _ in streams]
        if need:
            if self.interrupt_after_calls is not None and len(self.batches) >= self.interrupt_after_calls:
                raise KeyboardInterrupt
            self.batches.append(len(need))
            for j in need:
                _, ep, t = obs_list[j]["state"][:3]
                bad = np.nan if ep in self.nan_episodes else 0
                self.queues[streams[j]].extend([[ep, t + k, bad, 0, 0, 0, 0] for k in range(CHUNK)])
                infos[j] = {"queried": True, "latency_ms": 1.0, "batch_size": len(need), "tokens_kept": 10,
                            "mode": "fake"}
        return np.array([self.queues[s].popleft() for s in streams], np.float32), infos


def keys(tasks=2, episodes=3):
    return [EpisodeKey("libero_spatial", t, e) for t in range(tasks) for e in range(episodes)]


def run(selection, num_envs=2, actor=None, step_timeout_s=60, **env_params):
    records = []
    actor = actor or FakeActor()
    runner = RolloutRunner(actor, partial(make_fake_env, env_params), num_envs=num_envs,
                           on_episode=records.append, warmup_chunks=1, step_timeout_s=step_timeout_s)
    stats = runner.run(selection)
    return records, stats, actor


def by_key(records):
    out = {}
    for r in records:
        assert R.key_of(r) not in out, f"{R.key_of(r)} recorded twice"
        out[R.key_of(r)] = r
    return out


def test_two_envs_run_every_episode_once_with_batched_forwards():
    selection = keys()
    records, stats, actor = run(selection, num_envs=2)
    got = by_key(records)
    assert sorted(got) == sorted(selection)
    for k, r in got.items():
        assert r["error"] is None, r["error"]
        if k.episode % 2 == 0:
            assert r["success"] and r["steps"] == 6
        else:
            assert not r["success"] and r["steps"] == 10
        assert sum(r["chunk_actions"]) == r["steps"]
        assert len(r["chunk_ms"]) == -(-r["steps"] // CHUNK)
        assert r["chunk_extra"] == {"mode": ["fake"] * len(r["chunk_ms"])}
        assert r["instruction"] == f"do task {k.task_id}"
    assert max(actor.batches) == 2                       # both envs served by one forward
    assert stats.episodes == 6 and stats.forwards == len(actor.batches)
    assert sum(r["chunk_warmup"].count(True) for r in records) == 2   # first forward: batch of 2 chunks


def test_env_exception_is_recorded_as_failed_and_the_run_goes_on():
    selection = keys(tasks=1, episodes=5)
    records, stats, _ = run(selection, num_envs=2, fault=(1, 3))
    got = by_key(records)
    assert sorted(got) == selection
    bad = got[EpisodeKey("libero_spatial", 0, 1)]
    assert not bad["success"] and "fake sim exploded" in bad["error"] and bad["steps"] == 3
    assert all(r["error"] is None for k, r in got.items() if k.episode != 1)
    assert stats.errors == 1 and stats.worker_restarts == 0


def test_a_worker_that_dies_is_replaced_and_its_episode_retried_once():
    selection = keys(tasks=1, episodes=4)
    records, stats, _ = run(selection, num_envs=2, crash=(2, 1))
    got = by_key(records)
    assert sorted(got) == selection
    assert "failed 2 times during this episode" in got[EpisodeKey("libero_spatial", 0, 2)]["error"]
    assert all(r["error"] is None for k, r in got.items() if k.episode != 2)
    assert stats.worker_restarts == 2


def test_a_worker_that_hangs_in_reset_is_replaced_and_no_episode_is_lost():
    # issue 12, item 1: episodes being started when their worker timed out in reset were dropped (exit 0)
    selection = keys(tasks=1, episodes=3)
    records, stats, _ = run(selection, num_envs=2, step_timeout_s=3, slow_reset=(1, 30))
    got = by_key(records)
    assert sorted(got) == selection
    assert "failed 2 times during this episode" in got[EpisodeKey("libero_spatial", 0, 1)]["error"]
    assert "did not answer within 3 s during reset" in got[EpisodeKey("libero_spatial", 0, 1)]["error"]
    assert all(r["error"] is None for k, r in got.items() if k.episode != 1)
    assert stats.worker_restarts == 2


def test_non_finite_actions_are_episode_errors_and_repeated_ones_stop_the_run():
    from vla_accel.eval.runner import PolicyFault

    selection = keys(tasks=1, episodes=4)
    records, _, _ = run(selection, num_envs=1, actor=FakeActor(nan_episodes={1}))
    got = by_key(records)
    assert sorted(got) == selection
    bad = got[EpisodeKey("libero_spatial", 0, 1)]
    assert bad["steps"] == 0 and "non-finite action at step 0" in bad["error"]
    assert "1 of 7 values are not finite (nan 1, +inf 0, -inf 0): [1, 0, nan, 0" in bad["error"]
    assert all(r["error"] is None for k, r in got.items() if k.episode != 1)
    records = []
    runner = RolloutRunner(FakeActor(nan_episodes={0, 1, 2, 3}), partial(make_fake_env, {}), num_envs=1,
                           on_episode=records.append)
    with pytest.raises(PolicyFault, match="3 policy calls in a row failed"):
        runner.run(selection)
    assert [r["episode"] for r in records] == [0, 1, 2]      # recorded before the stop; episode 3 not run


def test_many_errors_in_a_row_stop_the_run_after_recording_them():
    from vla_accel.eval.runner import TooManyErrors

    def runner(records):
        # episode 0 of every task faults at its first step
        return RolloutRunner(FakeActor(), partial(make_fake_env, {"fault": (0, 0)}), num_envs=1,
                             on_episode=records.append, max_consecutive_errors=2)

    records = []
    runner(records).run([EpisodeKey("libero_spatial", 0, 0), EpisodeKey("libero_spatial", 0, 1),
                         EpisodeKey("libero_spatial", 1, 0)])          # error, ok, error: goes on
    assert [bool(r["error"]) for r in records] == [True, False, True]
    records = []
    with pytest.raises(TooManyErrors, match="2 episodes in a row"):
        runner(records).run([EpisodeKey("libero_spatial", t, 0) for t in range(4)])
    assert [r["task_id"] for r in records] == [0, 1] and all(r["error"] for r in records)


def test_single_env_and_worker_environment():
    records = []
    actor = FakeActor()
    runner = RolloutRunner(actor, partial(make_fake_env, {}), num_envs=1, on_episode=records.append,
                           worker_env={"VLA_ACCEL_TEST_MARK": " (worker env)"})
    runner.run(keys(tasks=1, episodes=2))
    assert [r["episode"] for r in records] == [0, 1] and set(actor.batches) == {1}
    assert records[0]["instruction"] == "do task 0 (worker env)"
    assert "VLA_ACCEL_TEST_MARK" not in os.environ          # the parent's environment is restored


# ---- the CLI flow (resume, Ctrl-C, run-dir checks) with the fakes ------------------------------------


class FakeCatalog:
    suites = ["libero_spatial", "libero_object"]

    def num_tasks(self, suite):
        return 2

    def num_init_states(self, suite, task_id):
        return 4

    def task_name(self, suite, task_id):
        return f"fake task {task_id}"

    def instruction(self, suite, task_id):
        return f"do task {task_id}"


@pytest.fixture
def fake_cli(monkeypatch):
    from vla_accel.eval import factory

    state = {"actor": None, "env": {}}
    monkeypatch.setattr(factory, "LiberoCatalog", FakeCatalog)
    monkeypatch.setattr(factory, "resolve_assets", lambda rc: "/nowhere")
    monkeypatch.setattr(factory, "build_actor", lambda rc, unnorm_key=None, **kw: state["actor"] or FakeActor())
    monkeypatch.setattr(factory, "env_factory", lambda rc, assets: partial(make_fake_env, state["env"]))
    return state


def run_cli(run_dir, *overrides):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from vla_accel.eval.cli import run_eval

    with initialize_config_module("vla_accel.configs", version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval.progress=false", "eval.num_envs=2", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return run_eval(cfg)


def test_cli_writes_results_and_resume_skips_finished_episodes(tmp_path, fake_cli, capsys):
    sel = ["eval.task_ids=[0,1]", "eval.episodes=null", "eval.num_episodes=3"]
    summary = run_cli(tmp_path, *sel)
    assert summary["complete"] and summary["success"]["average"]["episodes"] == 6
    first = R.read_records(tmp_path / R.RESULTS_FILE)
    assert len(first) == 6
    assert "fake task 1" in capsys.readouterr().out
    # same dir again: nothing runs (an actor that would fail on any call proves it)
    fake_cli["actor"] = FakeActor(interrupt_after_calls=0)
    assert run_cli(tmp_path, *sel)["complete"]
    assert R.read_records(tmp_path / R.RESULTS_FILE) == first
    # remove one finished episode from the file: only that one runs again
    lines = (tmp_path / R.RESULTS_FILE).read_text().splitlines()
    (tmp_path / R.RESULTS_FILE).write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    fake_cli["actor"] = None
    assert run_cli(tmp_path, *sel)["complete"]
    again = R.read_records(tmp_path / R.RESULTS_FILE)
    assert len(again) == 6 and R.key_of(again[-1]) == R.key_of(first[2])


def test_every_episode_with_an_error_is_not_a_clean_run(tmp_path, fake_cli):
    # issue 12: a run whose every episode errored exited 0 with complete=true
    fake_cli["env"] = {"fault": (0, 0)}
    summary = run_cli(tmp_path, "eval.task_ids=[0,1]", "eval.episodes=[0]", "eval.max_consecutive_errors=0")
    assert summary["exit_status"] == 4 and not summary["complete"] and not summary["missing"]
    assert [e["episode"] for e in summary["errors"]] == ["libero_spatial/task0/ep0", "libero_spatial/task1/ep0"]


def test_rerunning_a_finished_run_keeps_its_throughput(tmp_path, fake_cli):
    sel = ["eval.task_ids=[0]", "eval.episodes=[0,1]"]
    first = run_cli(tmp_path, *sel)["throughput"]
    assert first["episodes"] == 2 and first["wall_s"] > 0 and len(first["sessions"]) == 1
    again = run_cli(tmp_path, *sel)                      # nothing left to run
    assert again["exit_status"] == 0 and again["throughput"] == first
    assert json.loads((tmp_path / R.SUMMARY_FILE).read_text())["throughput"] == first


def test_ctrl_c_leaves_finished_episodes_on_disk_and_resume_completes(tmp_path, fake_cli):
    sel = ["eval.task_ids=[0]", "eval.episodes=null", "eval.num_episodes=4", "eval.num_envs=1"]
    # episode 0 takes 2 chunks (success at step 6), episode 1 takes 3: the 5th forward is in episode 1
    fake_cli["actor"] = FakeActor(interrupt_after_calls=4)
    assert run_cli(tmp_path, *sel)["exit_status"] == 130
    done = R.read_records(tmp_path / R.RESULTS_FILE)
    assert [r["episode"] for r in done] == [0]
    partial_summary = json.loads((tmp_path / R.SUMMARY_FILE).read_text())
    assert partial_summary["interrupted"] and not partial_summary["complete"]
    assert len(partial_summary["missing"]) == 3
    fake_cli["actor"] = None
    assert run_cli(tmp_path, *sel)["complete"]
    assert sorted(r["episode"] for r in R.read_records(tmp_path / R.RESULTS_FILE)) == [0, 1, 2, 3]


def test_run_dir_identity_ignores_where_it_ran_and_names_what_changed(tmp_path, fake_cli):
    from vla_accel.eval.config import ConfigError

    run_cli(tmp_path, "eval.seed=0", "policy.device=auto", "policy.dtype=float32", "eval.num_envs=2")
    # another device string and another number of simulators: the same evaluation; resume finds it done
    fake_cli["actor"] = FakeActor(interrupt_after_calls=0)
    again = run_cli(tmp_path, "eval.seed=0", "policy.device=cpu", "policy.dtype=float32", "eval.num_envs=1")
    assert again["exit_status"] == 0 and again["complete"]
    with pytest.raises(ConfigError, match=r'(?s)different evaluation.*policy.dtype: "float32" -> "bfloat16"'
                                          r'.*seed: 0 -> 1'):
        run_cli(tmp_path, "eval.seed=1", "policy.dtype=bfloat16")


def test_cli_bad_selection_lists_valid_values(tmp_path, fake_cli):
    from vla_accel.eval.config import ConfigError

    with pytest.raises(ConfigError, match="valid suites: libero_spatial, libero_object"):
        run_cli(tmp_path, "eval.suites=[libero_spatail]")
    with pytest.raises(ConfigError, match="valid task ids: 0..1"):
        run_cli(tmp_path, "eval.task_ids=[2]")
    with pytest.raises(ConfigError, match="valid episode indices: 0..3"):
        run_cli(tmp_path, "eval.episodes=[4]")
    assert not (tmp_path / R.RESULTS_FILE).exists()
