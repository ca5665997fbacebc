"""One LIBERO task as a gymnasium environment (hf-libero + robosuite 1.4 + MuJoCo, EGL rendering).

    from vla_accel.envs import LiberoEnv
    env = LiberoEnv("libero_spatial", task_id=0, assets_path="../shared/libero-assets")
    obs, info = env.reset(options={"episode": 3})        # official init state 3, then 10 settle steps
    obs, reward, terminated, truncated, info = env.step(action)   # action: [7], gripper -1 open / +1 close
    env.close()

Follows the OpenVLA-OFT LIBERO evaluation: `OffScreenRenderEnv` with square cameras, hard reset, the
episode's init state from hf-libero, `settle_steps` no-op steps `[0,0,0,0,0,0,-1]` that do not count
toward `max_steps`, success = LIBERO's `done`.

Observation (a `spaces.Dict`):
    full_image  uint8 [H, W, 3]  agentview camera, upright (rotated 180 degrees, as the OFT eval does)
    wrist_image uint8 [H, W, 3]  eye-in-hand camera, upright (same rotation)
    state       float32 [8]      eef_pos (3) + axis-angle of eef_quat (3) + gripper_qpos (2)
info: instruction (the task's language, what the policy is prompted with), suite, task_id, episode,
success (bool). The instruction is deliberately not an observation: gymnasium 1.4's AsyncVectorEnv
with shared memory (its default) reads a `spaces.Text` observation once at construction and then
returns that stale string forever, silently; info travels through the pipe and stays correct.

The simulator is built on the first reset, in the process that calls it: creating the env is cheap
and a not-yet-reset env pickles, so vector envs can create it in the parent and build it in
spawn/forkserver workers (EGL contexts do not survive a fork).

Randomness. An init state fixes every joint, but LIBERO also re-samples the poses of the fixed
furniture (cabinets, stoves, ...) on each hard reset from NumPy's global RNG. The OFT eval seeds that
RNG once per task (`env.seed(0)`), so there the furniture of episode k depends on the k resets before
it. Here each reset seeds it from (seed, suite, task_id, episode) and restores the caller's global
RNG afterwards: an episode looks the same whatever ran before it in the worker.
`reset(seed=...)` seeds `self.np_random`, which only picks the episode when options give none.
"""

import functools
import math
import operator
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .libero_setup import configure_libero, import_libero_envs, make_benchmark, resolve_assets_path


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    max_steps: int  # steps per episode in the OFT eval, not counting the settle steps
    num_tasks: int


# The OpenVLA-OFT evaluation protocol (max steps from its run_libero_eval.py).
SUITES = {
    #                                      name   max_steps  num_tasks
    "libero_spatial": SuiteSpec("libero_spatial", 220, 10),
    "libero_object": SuiteSpec("libero_object", 280, 10),
    "libero_goal": SuiteSpec("libero_goal", 300, 10),
    "libero_10": SuiteSpec("libero_10", 520, 10),
    "libero_90": SuiteSpec("libero_90", 400, 90),
}

SETTLE_STEPS = 10  # no-op steps after setting the init state, so objects come to rest
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # hold still, gripper open
CAMERAS = ("agentview", "robot0_eye_in_hand")  # -> full_image, wrist_image


# ---- suite metadata (hf-libero's task lists, no simulator) ----------------------------------------


def _check_suite(suite: str) -> SuiteSpec:
    if suite not in SUITES:
        raise ValueError(f"Unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[suite]


def _index(value, what: str) -> int:
    try:
        return operator.index(value)  # ints and numpy ints; not floats or strings
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


@functools.cache
def _benchmark(suite: str):
    _check_suite(suite)
    return make_benchmark(suite)


def task_names(suite: str) -> list[str]:
    """hf-libero's task names of a suite, in task-id order."""
    return _benchmark(suite).get_task_names()


def task_instruction(suite: str, task_id: int) -> str:
    """The language instruction the policy gets (the benchmark's `task.language`, as in the OFT eval)."""
    validate_selection(suite, [task_id], None)
    return _benchmark(suite).get_task(task_id).language


@functools.cache
def _init_states(suite: str, task_id: int) -> np.ndarray:
    # [num_episodes, state_dim] flattened MuJoCo states (time, qpos, qvel) shipped with hf-libero.
    return np.asarray(_benchmark(suite).get_task_init_states(task_id))


def num_episodes(suite: str, task_id: int) -> int:
    """Number of official init states (episodes) of a task."""
    validate_selection(suite, [task_id], None)
    return len(_init_states(suite, task_id))


def validate_selection(suite: str, task_ids=None, episodes=None) -> None:
    """Raise ValueError naming the valid values if suite, a task id or an episode index is out of range.

    task_ids / episodes: iterables of ints, or None for "all". Episodes are checked against every
    selected task (all tasks of the suite when task_ids is None).
    """
    spec = _check_suite(suite)
    checked = list(range(spec.num_tasks)) if task_ids is None else [_index(t, "task_id") for t in task_ids]
    for task_id in checked:
        if not 0 <= task_id < spec.num_tasks:
            raise ValueError(
                f"task_id {task_id} is out of range for {suite}; valid task ids: 0..{spec.num_tasks - 1}"
            )
    if episodes is None:
        return
    episodes = [_index(e, "episode") for e in episodes]
    for task_id in checked:
        count = len(_init_states(suite, task_id))
        for episode in episodes:
            if not 0 <= episode < count:
                raise ValueError(
                    f"episode {episode} is out of range for {suite} task {task_id}; valid episodes: 0..{count - 1}"
                )


# ---- observation helpers ----------------------------------------------------------------------------


def quat2axisangle(quat) -> np.ndarray:
    """Quaternion (x, y, z, w), robosuite's order, -> axis-angle [3], the OFT/robosuite convention.

    w is clipped to [-1, 1]; a zero rotation gives zeros. The angle is 2*acos(w) in [0, 2*pi]: a
    quaternion with w < 0 is not flipped to its shorter equivalent.
    """
    quat = np.asarray(quat, dtype=np.float64)
    w = min(max(float(quat[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * math.acos(w) / den


def _upright(image: np.ndarray) -> np.ndarray:
    # robosuite renders in the OpenGL convention (bottom row first); the OFT eval turns both
    # cameras by 180 degrees. A fresh contiguous copy, so observations never share memory.
    return np.ascontiguousarray(image[::-1, ::-1])


@contextmanager
def _seeded_global_numpy(seed: int):
    # LIBERO's placement samplers draw from np.random; keep the caller's global RNG untouched.
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _layout_seed(seed: int, suite: str, task_id: int, episode: int) -> int:
    suite_index = list(SUITES).index(suite)
    return int(np.random.SeedSequence([seed, suite_index, task_id, episode]).generate_state(1)[0])


# ---- the environment ----------------------------------------------------------------------------------


class LiberoEnv(gym.Env):
    """One LIBERO task; `reset(options={"suite", "task_id", "episode"})` may switch task and episode."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}  # robosuite control_freq = 20 Hz

    def __init__(
        self,
        suite: str = "libero_spatial",
        task_id: int = 0,
        image_size: int = 256,  # both cameras are image_size x image_size (the OFT eval: 256)
        assets_path=None,  # LIBERO asset folder; None -> $VLA_ACCEL_LIBERO_ASSETS -> hf-libero default
        seed: int = 0,  # seeds the furniture layout of each episode (the OFT eval's env.seed(0))
        settle_steps: int = SETTLE_STEPS,  # no-op steps after the init state, not counted in max_steps
        max_steps: int | None = None,  # None: the suite's official max steps (follows task switches)
        render_mode: str | None = None,  # None or "rgb_array" (render() returns full_image)
    ):
        validate_selection(suite, [task_id], None)
        self.suite, self.task_id = suite, _index(task_id, "task_id")
        self.image_size = _index(image_size, "image_size")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.sim_seed = _index(seed, "seed")
        self.settle_steps = _index(settle_steps, "settle_steps")
        if self.settle_steps < 0:
            raise ValueError(f"settle_steps must be >= 0, got {settle_steps}")
        self._max_steps = None if max_steps is None else _index(max_steps, "max_steps")
        if self._max_steps is not None and self._max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (the suite's official value), got {max_steps}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of None, {self.metadata['render_modes']}; got {render_mode!r}")
        self.render_mode = render_mode
        # Resolved (and checked) here, so a wrong folder fails in the parent, not in a worker.
        self.assets_path = resolve_assets_path(assets_path)

        image = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(
            {
                "full_image": image,
                "wrist_image": image,
                "state": spaces.Box(-np.inf, np.inf, (8,), np.float32),
            }
        )
        # OSC_POSE deltas in [-1, 1] (robosuite clips), gripper -1 = open, +1 = close.
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)

        self._sim = None  # libero OffScreenRenderEnv, built on the first reset
        self._sim_task = None  # (suite, task_id) the simulator was built for
        self._sim_pid = None  # process that built it: EGL contexts do not survive a fork
        self._episode = None
        self._steps = 0
        self._last_full_image = None

    @property
    def max_steps(self) -> int:
        return self._max_steps if self._max_steps is not None else SUITES[self.suite].max_steps

    @property
    def instruction(self) -> str:
        return task_instruction(self.suite, self.task_id)

    # -- pickling: an env travels without its simulator and rebuilds it on its next reset
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_sim=None, _sim_task=None, _sim_pid=None, _episode=None, _last_full_image=None)
        return state

    def _build_sim(self):
        configure_libero(self.assets_path)
        envs = import_libero_envs()
        import robosuite.macros

        if robosuite.macros.IMAGE_CONVENTION != "opengl":
            raise RuntimeError(
                f"robosuite.macros.IMAGE_CONVENTION is {robosuite.macros.IMAGE_CONVENTION!r}; "
                "LiberoEnv's upright images assume robosuite's default 'opengl'"
            )
        bddl_file = _benchmark(self.suite).get_task_bddl_file_path(self.task_id)
        with _seeded_global_numpy(self.sim_seed):  # construction samples a layout too; keep it off the global RNG
            self._sim = envs.OffScreenRenderEnv(
                bddl_file_name=bddl_file,
                camera_names=list(CAMERAS),
                camera_heights=self.image_size,
                camera_widths=self.image_size,
                # robosuite refuses to step past its horizon; the OFT eval keeps the default 1000.
                horizon=max(1000, self.settle_steps + self.max_steps),
            )
        self._sim_task = (self.suite, self.task_id)
        self._sim_pid = os.getpid()

    def _check_process(self):
        if self._sim is not None and self._sim_pid != os.getpid():
            raise RuntimeError(
                f"This LiberoEnv's simulator was built in process {self._sim_pid}; its EGL context does not "
                "survive a fork. Create the env in the worker (or hand it over before its first reset) and use "
                "spawn or forkserver workers, e.g. AsyncVectorEnv(..., context='spawn')."
            )

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"suite", "task_id", "episode"}
        if unknown:
            raise ValueError(f"Unknown reset options {sorted(unknown)}; allowed: suite, task_id, episode")
        suite = options.get("suite", self.suite)
        task_id = options.get("task_id", self.task_id)
        validate_selection(suite, [task_id], None)
        task_id = _index(task_id, "task_id")
        episode = options.get("episode")
        if episode is None:
            episode = int(self.np_random.integers(len(_init_states(suite, task_id))))
        validate_selection(suite, [task_id], [episode])
        episode = _index(episode, "episode")

        self._check_process()
        self.suite, self.task_id, self._episode = suite, task_id, episode
        if self._sim is not None and self._sim_task != (suite, task_id):
            self._close_sim()
        if self._sim is None:
            self._build_sim()

        with _seeded_global_numpy(_layout_seed(self.sim_seed, suite, task_id, episode)):
            self._sim.reset()  # hard reset: reloads the model, re-samples the furniture poses
        raw = self._sim.set_init_state(_init_states(suite, task_id)[episode])
        for _ in range(self.settle_steps):
            raw, _, _, _ = self._sim.step(NOOP_ACTION)
        self._steps = 0
        success = bool(self._sim.check_success())
        return self._observation(raw), self._info(success)

    def step(self, action):
        if self._sim is None:
            raise RuntimeError("LiberoEnv.step() called before reset()")
        self._check_process()
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"action must have shape (7,) (6 OSC_POSE deltas + gripper), got {action.shape}")
        raw, reward, done, _ = self._sim.step(action)
        self._steps += 1
        terminated = bool(done)  # LIBERO's done is its success check
        truncated = self._steps >= self.max_steps
        return self._observation(raw), float(reward), terminated, truncated, self._info(terminated)

    @property
    def built(self) -> tuple[str, int] | None:
        """(suite, task_id) of the simulator built in this process, or None before the first reset."""
        return self._sim_task

    def time_render(self, repeats: int = 3) -> float:
        """Seconds one step spends rendering both cameras, measured by rendering them `repeats` more times (the
        step renders them inside robosuite's observation update, where they cannot be timed apart)."""
        if self._sim is None:
            raise RuntimeError("LiberoEnv.time_render() called before reset()")
        self._check_process()
        sim = self._sim.env.sim
        t = time.perf_counter()
        for _ in range(repeats):
            for camera in CAMERAS:
                sim.render(camera_name=camera, width=self.image_size, height=self.image_size)
        return (time.perf_counter() - t) / repeats

    def render(self):
        if self.render_mode == "rgb_array" and self._last_full_image is not None:
            return self._last_full_image.copy()
        return None

    def close(self):
        self._close_sim()

    def _close_sim(self):
        if self._sim is not None and self._sim_pid == os.getpid():
            self._sim.close()
        self._sim, self._sim_task, self._sim_pid = None, None, None

    def _observation(self, raw) -> dict:
        full_image = _upright(raw["agentview_image"])
        self._last_full_image = full_image if self.render_mode == "rgb_array" else None
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        return {
            "full_image": full_image,
            "wrist_image": _upright(raw["robot0_eye_in_hand_image"]),
            "state": state,
        }

    def _info(self, success: bool) -> dict:
        return {
            "instruction": self.instruction,
            "suite": self.suite,
            "task_id": self.task_id,
            "episode": self._episode,
            "success": success,
        }
