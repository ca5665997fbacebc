"""A fast stand-in for the LIBERO simulator, and `vla-accel-eval` running on it (fault-injection tests).

    python tests/fakesim.py <vla-accel-eval arguments>
    proc = launch([...arguments], faults={...}); rc, out = finish(proc)     # from tests


Only the simulator and its catalog (suites, tasks, instructions) are replaced: the CLI, the policy,
the runner, the simulator worker processes and the results files are the real ones. FakeSim follows
env.image_size, env.max_steps and the testing-only env.fault_step / env.fault_episodes (through the
real FaultInjector); even episodes succeed half-way, odd ones run to max_steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

SUITE = "libero_spatial"
NUM_TASKS, NUM_EPISODES = 2, 8
INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the cream cheese in the bowl"]


class FakeSim(gym.Env):
    def __init__(self, image_size: int, max_steps: int):
        image = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict({"full_image": image, "wrist_image": image,
                                              "state": spaces.Box(-np.inf, np.inf, (8,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.size, self.max_steps = image_size, max_steps
        self.task = self.episode = self.t = 0

    def _obs(self):
        rng = np.random.default_rng([self.task, self.episode, self.t])
        img = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        state = np.array([0.1 * self.t, 0, 0.5, 0, 0, 0, 0.02, -0.02], np.float32)
        return {"full_image": img, "wrist_image": img[::-1].copy(), "state": state}

    def reset(self, *, seed=None, options=None):
        self.task, self.episode, self.t = options["task_id"], options["episode"], 0
        return self._obs(), {"instruction": INSTRUCTIONS[self.task]}

    def step(self, action):
        self.t += 1
        success = self.episode % 2 == 0 and self.t >= max(1, self.max_steps // 2)
        return self._obs(), float(success), success, self.t >= self.max_steps and not success, {"success": success}


def make_fake_sim(env: dict, suite: str, task_id: int) -> gym.Env:
    from vla_accel.eval.factory import FaultInjector

    sim: gym.Env = FakeSim(env["image_size"], env["max_steps"] or 10)
    if env.get("fault_step") is not None:
        sim = FaultInjector(sim, env["fault_step"], env["fault_episodes"])
    return sim


class FakeCatalog:
    suites = [SUITE]

    def num_tasks(self, suite):
        return NUM_TASKS

    def num_init_states(self, suite, task_id):
        return NUM_EPISODES

    def task_name(self, suite, task_id):
        return INSTRUCTIONS[task_id].replace(" ", "_")

    def instruction(self, suite, task_id):
        return INSTRUCTIONS[task_id]


def launch(args: list[str], faults: dict | None = None, prefix: list[str] = ()) -> subprocess.Popen:
    """`python tests/fakesim.py ARGS` in its own process group; `faults` -> $VLA_ACCEL_FAULTS;
    `prefix` wraps the command (e.g. a read-only mount namespace)."""
    from vla_accel.eval.faults import ENV_VAR

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_VAR, None)
    if faults:
        env[ENV_VAR] = json.dumps(faults)
    here = Path(__file__).resolve().parent
    return subprocess.Popen([*prefix, sys.executable, str(here / "fakesim.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=here.parent, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """(exit status, output); a run that outlives `timeout` is killed (with its workers) and fails the test."""
    import pytest

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"vla-accel-eval hung (> {timeout} s):\n{out[-4000:]}")
    return proc.returncode, out


def main() -> None:
    from vla_accel.eval import cli, factory

    factory.LiberoCatalog = FakeCatalog
    factory.resolve_assets = lambda rc: "(fake simulator)"
    factory.env_factory = lambda rc, assets: partial(make_fake_sim, dataclasses.asdict(rc.env))
    cli.main()


if __name__ == "__main__":
    import fakesim  # a module of its own name: the workers unpickle fakesim.make_fake_sim

    fakesim.main()
