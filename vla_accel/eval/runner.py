"""Vectorized LIBERO rollouts: N simulators in subprocesses, one batched policy call per step.

Main process                                    worker k (gymnasium AsyncVectorEnv, spawn)
  queue of (suite, task, episode) jobs           EpisodeSlot: runs one episode at a time
  actor.act_batch(obs of active streams)  ---->    step(action): simulator step, or nothing when idle
  finished slot: set_attr("job") + reset(mask) ->  reset(): start the job's episode (task switch inside)

Chunks are executed open loop: the actor owns one action queue per stream (= slot index) and
runs ONE forward for all streams whose queue is empty. Autoreset is disabled; the runner hands
each freed slot its next job and resets only those slots (reset_mask). An exception inside an
env is caught in the worker and comes back as the episode's error; a worker that dies or hangs
makes the runner rebuild the vector env and run the interrupted episodes again (once).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from vla_accel.eval.shard import EpisodeKey
from vla_accel.eval.video import EpisodeVideo, TraceRecorder, episode_stem

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_POLICY_ERRORS = 3   # then the run stops: the policy is broken, not one episode
MAX_ATTEMPTS_AFTER_CRASH = 2        # an episode in flight when a worker died is run at most this often
MAX_WORKER_RESTARTS = 20            # more restarts than this in one run: give up (the simulator is broken)
_STANDARD_INFO_KEYS = {"queried", "latency_ms", "batch_size", "tokens_kept"}


def _short_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def _array_space(space: gym.Space) -> gym.Space:
    """The observation space without text entries (the instruction travels in info, not in shared memory)."""
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: s for k, s in space.spaces.items() if not isinstance(s, gym.spaces.Text)})
    return space


def _blank_obs(space: gym.Space) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: _blank_obs(s) for k, s in space.spaces.items()}
    return np.zeros(space.shape, dtype=space.dtype)


class EpisodeSlot(gym.Env):
    """Worker-side env: runs the episode given in `self.job` at each reset; never raises.

    job: {"suite", "task_id", "episode", "seed"} or None (the slot idles: step() does nothing).
    Errors come back in info["error"] (a traceback); the broken env is dropped and rebuilt on the
    next reset.
    """

    def __init__(self, make_env: Callable[[str, int], gym.Env], suite: str, task_id: int):
        self._make_env = make_env
        self._env: gym.Env | None = make_env(suite, task_id)
        self.observation_space = _array_space(self._env.observation_space)
        self.action_space = self._env.action_space
        self.job: dict | None = None
        self._obs = _blank_obs(self.observation_space)
        self._active = False

    def _drop_env(self) -> None:
        env, self._env = self._env, None
        try:
            if env is not None:
                env.close()
        except Exception:  # closing a broken simulator may fail too; it is dropped either way
            pass

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        job, self._active = self.job, False
        if job is None:
            return self._obs, {"idle": True, "error": ""}
        try:
            if self._env is None:
                self._env = self._make_env(job["suite"], job["task_id"])
            obs, info = self._env.reset(seed=job["seed"], options={
                "episode": job["episode"], "suite": job["suite"], "task_id": job["task_id"]})
        except Exception as exc:
            self._drop_env()
            return self._obs, {"error": _short_error(exc)}
        self._obs, self._active = self._arrays(obs), True
        return self._obs, {"instruction": str(info.get("instruction", "")), "error": ""}

    def step(self, action):
        if not self._active:
            return self._obs, 0.0, False, False, {"idle": True, "error": ""}
        try:
            obs, reward, terminated, truncated, info = self._env.step(action)
        except Exception as exc:
            self._active = False
            self._drop_env()
            return self._obs, 0.0, False, False, {"error": _short_error(exc)}
        self._obs = self._arrays(obs)
        if terminated or truncated:
            self._active = False
        return self._obs, float(reward), bool(terminated), bool(truncated), {
            "success": bool(info.get("success", terminated)), "error": ""}

    def close(self):
        self._drop_env()

    def _arrays(self, obs: Any) -> Any:
        if isinstance(self.observation_space, gym.spaces.Dict):
            return {k: obs[k] for k in self.observation_space.spaces}
        return obs


def _make_slot(make_env: Callable[[str, int], gym.Env], suite: str, task_id: int) -> EpisodeSlot:
    return EpisodeSlot(make_env, suite, task_id)


def _info(infos: dict, key: str, i: int, default: Any = None) -> Any:
    """Value of `key` for env i in a gymnasium vector info dict (respects the `_key` mask)."""
    if key not in infos or not infos.get(f"_{key}", np.ones(i + 1, bool))[i]:
        return default
    value = infos[key][i]
    return value.item() if isinstance(value, np.generic) else value


def _dead_workers(vec) -> list[int]:
    """Indices of the vector env's worker processes that have exited."""
    dead = []
    for i, process in enumerate(getattr(vec, "processes", [])):
        process.join(timeout=0.2)
        if process.exitcode is not None:
            dead.append(i)
    return dead


def _close(vec, terminate: bool) -> None:
    try:
        vec.close(terminate=terminate)
    except Exception as exc:  # a dead worker's pipe: stop the others ourselves
        log.debug("closing the vector env: %s", exc)
        for process in vec.processes:
            if process.is_alive():
                process.terminate()
        for process in vec.processes:
            process.join(timeout=10)
        vec.closed = True


class TooManyErrors(RuntimeError):
    """Many episodes in a row ended with an error: something systemic (assets, rendering, policy)."""


class _VectorFailure(RuntimeError):
    """The vector env itself failed (a worker died or stopped answering)."""


@dataclass
class _Episode:
    """Main-process bookkeeping of one running episode."""
    key: EpisodeKey
    task: str
    slot: int
    started: float
    instruction: str = ""
    steps: int = 0
    chunk_ms: list = field(default_factory=list)
    chunk_model_ms: list = field(default_factory=list)
    chunk_batch: list = field(default_factory=list)
    chunk_warmup: list = field(default_factory=list)
    chunk_actions: list = field(default_factory=list)
    tokens_kept: list = field(default_factory=list)
    chunk_extra: dict = field(default_factory=dict)
    video: EpisodeVideo | None = None
    trace: TraceRecorder | None = None

    def on_policy(self, info: dict, call_ms: float, warmup: bool) -> None:
        if not info.get("queried"):
            if self.chunk_actions:
                self.chunk_actions[-1] += 1
            return
        n = len(self.chunk_ms)
        self.chunk_ms.append(round(call_ms, 3))
        model_ms = info.get("latency_ms")
        self.chunk_model_ms.append(None if model_ms is None else round(float(model_ms), 3))
        self.chunk_batch.append(info.get("batch_size"))
        self.chunk_warmup.append(warmup)
        self.chunk_actions.append(1)
        self.tokens_kept.append(info.get("tokens_kept"))
        for k, v in info.items():
            if k not in _STANDARD_INFO_KEYS:
                self.chunk_extra.setdefault(k, [None] * n).append(v)
        for values in self.chunk_extra.values():   # keys missing from this chunk's info
            if len(values) < n + 1:
                values.append(None)


@dataclass
class RunStats:
    episodes: int = 0          # episodes finished (recorded) by this process
    errors: int = 0
    wall_s: float = 0.0        # time spent in rollouts (vector env start to last episode)
    forwards: int = 0          # batched policy calls that queried the model
    worker_restarts: int = 0

    @property
    def episodes_per_hour(self) -> float:
        return 3600.0 * self.episodes / self.wall_s if self.wall_s > 0 else 0.0


class RolloutRunner:
    """Runs a list of episodes on `num_envs` simulator subprocesses with one actor.

    make_env(suite, task_id) -> gym.Env must be picklable (a functools.partial of a module-level
    function): it runs inside the workers. on_episode(record) receives each finished episode's
    record (see vla_accel.eval.results) as soon as it finishes.
    """

    def __init__(
        self,
        actor: Any,
        make_env: Callable[[str, int], gym.Env],
        *,
        num_envs: int,
        on_episode: Callable[[dict], None],
        task_names: dict[tuple[str, int], str] | None = None,
        seed: int = 0,
        warmup_chunks: int = 2,
        video_dir: str | Path | None = None,
        video_fps: int = 20,
        trace_path: str | Path | None = None,
        step_timeout_s: float = 900.0,
        context: str = "spawn",
        record_fields: dict | None = None,
        max_consecutive_errors: int = 0,
        worker_env: dict[str, str] | None = None,
    ):
        self.actor = actor
        self.make_env = make_env
        self.num_envs = num_envs
        self.on_episode = on_episode
        self.task_names = task_names or {}
        self.seed = seed
        self.warmup_chunks = warmup_chunks
        self.video_dir = Path(video_dir) if video_dir else None
        self.video_fps = video_fps
        self.trace_path = Path(trace_path) if trace_path else None
        self.step_timeout_s = step_timeout_s
        self.context = context
        self.record_fields = dict(record_fields or {})
        self.max_consecutive_errors = max_consecutive_errors   # 0: never stop
        self.worker_env = dict(worker_env or {})                # environment variables of the workers
        self._consecutive_errors = 0
        self.stats = RunStats()
        self._trace_key: EpisodeKey | None = None
        self._policy_errors = 0

    # ------------------------------------------------------------------------------------------
    def run(self, keys: Sequence[EpisodeKey]) -> RunStats:
        queue = deque(keys)
        if self.trace_path is not None and self.trace_path.suffix == ".npz" and keys:
            self._trace_key = keys[0]          # a single file: the first episode of the run
        attempts: Counter = Counter()
        t0 = time.perf_counter()
        try:
            while queue:
                n = min(self.num_envs, len(queue))
                vec = self._open(n, queue[0])
                slots: list[_Episode | None] = [None] * n
                failed = True
                try:
                    self._loop(vec, slots, queue)
                    failed = False
                except _VectorFailure as exc:
                    self.stats.worker_restarts += 1
                    if self.stats.worker_restarts > MAX_WORKER_RESTARTS:
                        raise RuntimeError(f"simulator workers failed {self.stats.worker_restarts} times; "
                                           f"giving up (last: {exc})") from exc
                    dead = _dead_workers(vec)
                    log.warning("simulator worker(s) %s failed (%s); restarting the workers",
                                dead or "?", exc)
                    for ep in slots:
                        if ep is None:
                            continue
                        if not dead or ep.slot in dead:   # blame the dead worker's episode (all if unknown)
                            attempts[ep.key] += 1
                        if attempts[ep.key] >= MAX_ATTEMPTS_AFTER_CRASH:
                            self._finish(slots, ep.slot, success=False,
                                         error=f"simulator worker crashed twice during this episode: {exc}")
                        else:
                            self._discard(ep)
                            queue.appendleft(ep.key)
                finally:
                    for ep in slots:       # interrupted (Ctrl-C) or crashed: nothing half-written stays
                        if ep is not None:
                            self._discard(ep)
                    _close(vec, terminate=failed)
        finally:
            self.stats.wall_s = time.perf_counter() - t0
        return self.stats

    # ------------------------------------------------------------------------------------------
    def _open(self, n: int, first: EpisodeKey) -> gym.vector.AsyncVectorEnv:
        fns = [partial(_make_slot, self.make_env, first.suite, first.task_id) for _ in range(n)]
        saved = {k: os.environ.get(k) for k in self.worker_env}
        os.environ.update(self.worker_env)        # spawned workers copy the environment at start
        try:
            return gym.vector.AsyncVectorEnv(
                fns, context=self.context, shared_memory=True, copy=True,
                autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _vec(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise _VectorFailure(f"{type(exc).__name__}: {exc}") from exc

    def _loop(self, vec, slots: list[_Episode | None], queue: deque) -> None:
        n = len(slots)
        obs = self._start(vec, slots, queue, list(range(n)))
        while any(ep is not None for ep in slots):
            active = [i for i, ep in enumerate(slots) if ep is not None]
            obs_list = [{k: v[i] for k, v in obs.items()} for i in active]
            t = time.perf_counter()
            try:
                actions, infos = self.actor.act_batch(obs_list, [slots[i].instruction for i in active], active)
            except Exception as exc:
                self._policy_errors += 1
                if self._policy_errors >= MAX_CONSECUTIVE_POLICY_ERRORS:
                    raise
                log.error("policy call failed; recording %d episode(s) as failed:\n%s", len(active),
                          _short_error(exc))
                for i in active:
                    self._finish(slots, i, success=False, error=f"policy: {_short_error(exc)}")
                obs = self._start(vec, slots, queue, active)
                continue
            self._policy_errors = 0
            call_ms = 1000.0 * (time.perf_counter() - t)
            actions = np.asarray(actions)
            if any(info.get("queried") for info in infos):
                self.stats.forwards += 1
            warmup = self.stats.forwards <= self.warmup_chunks
            for j, i in enumerate(active):
                ep = slots[i]
                ep.on_policy(infos[j], call_ms, warmup)
                if ep.video is not None:
                    ep.video.add(obs_list[j], self._overlay(i))
                if ep.trace is not None:
                    ep.trace.add(obs_list[j], actions[j])

            batch = np.zeros((n,) + actions.shape[1:], dtype=actions.dtype)
            batch[active] = actions
            self._vec(lambda: vec.step_async(batch))
            obs, _, terminated, truncated, step_info = self._vec(
                lambda: vec.step_wait(timeout=self.step_timeout_s))

            ended = []
            for i in active:
                ep = slots[i]
                error = _info(step_info, "error", i, "") or ""
                if not error:
                    ep.steps += 1
                if error or terminated[i] or truncated[i]:
                    if ep.video is not None and not error:
                        ep.video.add({k: v[i] for k, v in obs.items()}, self._overlay(i))
                    success = bool(_info(step_info, "success", i, terminated[i])) and not error
                    self._finish(slots, i, success=success, error=error or None)
                    ended.append(i)
            if ended:
                obs = self._start(vec, slots, queue, ended)

    def _overlay(self, stream: int):
        """SpecPrune's picture of the kept patches for this stream's last query (None for other actors)."""
        fn = getattr(self.actor, "overlay_frame", None)
        return fn(stream) if fn is not None else None

    def _start(self, vec, slots: list[_Episode | None], queue: deque, free: list[int]):
        """Give each free slot its next job (or none) and reset exactly those slots."""
        n = len(slots)
        obs = None
        while free:
            jobs: list[dict | None] = [None] * n
            mask = np.zeros(n, dtype=bool)
            starting = []
            for i in free:
                mask[i] = True
                if queue:
                    key = queue.popleft()
                    jobs[i] = {"suite": key.suite, "task_id": key.task_id, "episode": key.episode,
                               "seed": self.seed}
                    starting.append((i, key))
            self._vec(lambda: vec.set_attr("job", jobs))
            t = time.perf_counter()
            self._vec(lambda: vec.reset_async(options={"reset_mask": mask}))
            obs, infos = self._vec(lambda: vec.reset_wait(timeout=self.step_timeout_s))
            free = []
            started = []
            for i, key in starting:
                ep = _Episode(key=key, task=self.task_names.get((key.suite, key.task_id), ""), slot=i,
                              started=t)
                slots[i] = ep
                error = _info(infos, "error", i, "") or ""
                if error:
                    self._finish(slots, i, success=False, error=error)
                    free.append(i)
                    continue
                ep.instruction = _info(infos, "instruction", i, "") or ""
                if self.video_dir is not None:
                    ep.video = EpisodeVideo(self.video_dir, key, ep.task, self.video_fps)
                if self.trace_path is not None and (self._trace_key is None or self._trace_key == key):
                    path = self.trace_path if self._trace_key is not None else \
                        self.trace_path / f"{episode_stem(key)}.npz"
                    ep.trace = TraceRecorder(path, key, ep.task)
                started.append(i)
            if started:
                self.actor.reset(started)
        return obs

    def _discard(self, ep: _Episode) -> None:
        if ep.video is not None:
            ep.video.abort()
            ep.video = None
        ep.trace = None

    def _finish(self, slots: list[_Episode | None], i: int, *, success: bool, error: str | None) -> None:
        ep = slots[i]
        slots[i] = None
        video = None
        if ep.video is not None:
            video = ep.video.finish("error" if error else "success" if success else "failure")
        trace = None
        if ep.trace is not None and ep.trace.frames:
            meta = {"suite": ep.key.suite, "task_id": ep.key.task_id, "episode": ep.key.episode,
                    "task": ep.task, "success": success, "steps": ep.steps, "error": error or ""}
            trace = ep.trace.save(ep.instruction, meta)
        record = {
            "suite": ep.key.suite, "task_id": ep.key.task_id, "task": ep.task,
            "instruction": ep.instruction, "episode": ep.key.episode,
            "success": bool(success), "steps": ep.steps,
            "wall_s": round(time.perf_counter() - ep.started, 3),
            "error": error,
            "chunk_ms": ep.chunk_ms, "chunk_model_ms": ep.chunk_model_ms, "chunk_batch": ep.chunk_batch,
            "chunk_warmup": ep.chunk_warmup, "chunk_actions": ep.chunk_actions,
            "tokens_kept": ep.tokens_kept, "chunk_extra": ep.chunk_extra,
            "slot": i, "seed": self.seed, "video": video, "trace": trace,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.record_fields,
        }
        self.stats.episodes += 1
        self.stats.errors += int(bool(error))
        self.on_episode(record)
        self._consecutive_errors = self._consecutive_errors + 1 if error else 0
        if self.max_consecutive_errors and self._consecutive_errors >= self.max_consecutive_errors:
            raise TooManyErrors(
                f"{self._consecutive_errors} episodes in a row ended with an error, the last one "
                f"({ep.key.label()}):\n{error}")
