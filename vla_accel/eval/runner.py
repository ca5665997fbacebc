"""Vectorized LIBERO rollouts: N simulators in subprocesses, one batched policy call per step.

Main process                                     simulator worker k (workers.py: WorkerPool, spawn)
  queue of (suite, task, episode) jobs             EpisodeSlot: runs one episode at a time
  actor.act_batch(obs of active streams)           step(action): one simulator step
  finished slot: its next job           ------->   reset(job): start that episode (task switch inside)

Chunks are executed open loop: the actor owns one action queue per stream (= slot index) and
runs ONE forward for all streams whose queue is empty. What can go wrong, and what happens:
- an exception inside an env: caught in the worker, the episode is recorded with its traceback;
- a worker that dies or stops answering (start-up, reset or step; every wait is bounded:
  `step_timeout_s` for a reset or a step, max(STARTUP_TIMEOUT_S, step_timeout_s) for start-up):
  it is stopped (terminate, then kill) and replaced, and its episode runs again, at most
  MAX_ATTEMPTS times in all (then it is recorded as an error);
- the policy raises or returns a non-finite action: that stream's episode is recorded as an
  error (with a summary of the values); MAX_POLICY_FAULTS policy calls in a row with such a fault
  stop the run (PolicyFault);
- `max_consecutive_errors` episodes in a row with an error stop the run (TooManyErrors), and
  more than MAX_WORKER_RESTARTS worker replacements too (SimulatorFailure).
Every episode given to run() is either passed to on_episode() or still unrecorded when run()
raises; the caller names the unrecorded ones as missing.

Timing (vla_accel/eval/timing.py): the main process's wall time in parts, measured around the existing calls;
`precapture()` (graph captures and compilation before the first timed chunk) runs while the workers start,
and a forward that still captured graphs is marked in its chunks' `chunk_capture_ms` (left out of the latency
statistics).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vla_accel.eval.shard import EpisodeKey
from vla_accel.eval.timing import GpuSampler, Timing, graph_counter
from vla_accel.eval.video import EpisodeVideo, TraceRecorder, episode_stem
from vla_accel.eval.workers import WorkerFailure, WorkerPool, short_error

log = logging.getLogger(__name__)

MAX_POLICY_FAULTS = 3        # policy calls in a row that raised or gave non-finite actions: the policy is broken
MAX_ATTEMPTS = 2             # an episode whose simulator worker failed is run at most this often in all
MAX_WORKER_RESTARTS = 20     # more worker replacements than this in one run: the simulator is broken
STARTUP_TIMEOUT_S = 120.0    # a new worker has max(this, step_timeout_s) to start (spawn + imports)
_STANDARD_INFO_KEYS = {"queried", "latency_ms", "batch_size", "tokens_kept", "prep_ms", "post_ms"}


class RunStopped(RuntimeError):
    """The run stopped early: something systemic is wrong; the message says what."""


class TooManyErrors(RunStopped):
    """Many episodes in a row ended with an error (assets, rendering, policy)."""


class PolicyFault(RunStopped):
    """The policy raised or returned non-finite actions in MAX_POLICY_FAULTS calls in a row."""


class SimulatorFailure(RunStopped):
    """Simulator workers failed more than MAX_WORKER_RESTARTS times."""


def nonfinite_summary(action: Any) -> str:
    """'3 of 7 values are not finite (nan 3, +inf 0, -inf 0): [nan, 0.1, ...]'."""
    a = np.asarray(action, dtype=np.float64).ravel()
    nan, pos, neg = int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum())
    values = ", ".join(f"{v:.4g}" for v in a[:8]) + (", ..." if a.size > 8 else "")
    return f"{nan + pos + neg} of {a.size} values are not finite (nan {nan}, +inf {pos}, -inf {neg}): [{values}]"


@dataclass
class _Episode:
    """Main-process bookkeeping of one running episode."""
    key: EpisodeKey
    task: str
    slot: int
    started: float
    instruction: str = ""
    obs: Any = None                 # the latest observation
    steps: int = 0
    chunk_ms: list = field(default_factory=list)
    chunk_model_ms: list = field(default_factory=list)
    chunk_batch: list = field(default_factory=list)
    chunk_warmup: list = field(default_factory=list)
    chunk_actions: list = field(default_factory=list)
    chunk_capture_ms: list = field(default_factory=list)
    tokens_kept: list = field(default_factory=list)
    chunk_extra: dict = field(default_factory=dict)
    video: EpisodeVideo | None = None
    trace: TraceRecorder | None = None

    def on_policy(self, info: dict, call_ms: float, warmup: bool, capture_ms: float = 0.0) -> None:
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
        self.chunk_capture_ms.append(round(capture_ms, 3))
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
    wall_s: float = 0.0        # time spent in rollouts (worker start to last episode)
    forwards: int = 0          # batched policy calls that queried the model
    worker_restarts: int = 0
    timing: Timing = field(default_factory=Timing)
    gpu: dict | None = None    # GPU utilisation samples (timing.GpuSampler.stop()); None: the policy is not on CUDA

    def timing_summary(self) -> dict:
        return self.timing.summary(self.wall_s, self.episodes, self.gpu)

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
        make_env: Callable[[str, int], Any],
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
        precapture: Callable[[], dict] | None = None,
        gpu_device: str | None = None,
        gpu_interval_s: float = 0.5,
        prepare_in_workers: bool = False,
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
        self.precapture = precapture           # () -> dict: graph captures before the first timed chunk
        self.gpu_device, self.gpu_interval_s = gpu_device, gpu_interval_s   # a CUDA device: sample its utilisation
        self._graphs = graph_counter(actor)     # () -> (captures, seconds) of the actor's graph cache, or None
        self._prepare = None                     # the actor's image pre-processing, run in the workers
        if prepare_in_workers:
            if hasattr(actor, "image_prep") and hasattr(actor, "wants_prepared"):
                self._prepare = actor.image_prep()
            else:
                log.warning("eval.prepare_in_workers: this actor cannot take prepared images; they are prepared "
                            "in the main process")
        self.stats = RunStats()
        self._trace_key: EpisodeKey | None = None
        self._queue: deque[EpisodeKey] = deque()
        self._attempts: Counter = Counter()
        self._consecutive_errors = 0
        self._policy_faults = 0
        self._last_error = ("", "")                             # (episode label, error) of the last error

    # ------------------------------------------------------------------------------------------
    def run(self, keys: Sequence[EpisodeKey]) -> RunStats:
        self._queue = deque(keys)
        if self.trace_path is not None and self.trace_path.suffix == ".npz" and keys:
            self._trace_key = keys[0]          # a single file: the first episode of the run
        n = min(self.num_envs, len(keys))
        pool = WorkerPool(self.make_env, n, timeout_s=self.step_timeout_s, context=self.context,
                          startup_timeout_s=max(STARTUP_TIMEOUT_S, self.step_timeout_s), env_vars=self.worker_env,
                          prepare=self._prepare)
        slots: list[_Episode | None] = [None] * n
        timing = self.stats.timing
        sampler = GpuSampler(self.gpu_device, self.gpu_interval_s).start() if self.gpu_device else None
        t0 = time.perf_counter()
        clean = False
        try:
            with timing.part("startup"):
                pool.spawn(list(range(n)))
                if self.precapture is not None:   # while the workers start (spawn, imports)
                    t = time.perf_counter()
                    timing.precapture = {**self.precapture(), "seconds": round(time.perf_counter() - t, 3)}
                failures = pool.wait_ready(list(range(n)))
            for i, failure in failures.items():
                self._replace_worker(pool, slots, i, failure)
            self._fill(pool, slots, list(range(n)))
            while any(ep is not None for ep in slots):
                self._step(pool, slots)
            clean = True
        finally:
            for ep in slots:       # interrupted or stopped: nothing half-written stays
                if ep is not None:
                    self._discard(ep)
            with timing.part("shutdown"):
                pool.close(polite=clean)
            self.stats.wall_s = time.perf_counter() - t0
            if sampler is not None:
                self.stats.gpu = sampler.stop()
        return self.stats

    # ------------------------------------------------------------------------------------------
    def _step(self, pool: WorkerPool, slots: list[_Episode | None]) -> None:
        """One policy call for every running episode, then one simulator step each."""
        active = [i for i, ep in enumerate(slots) if ep is not None]
        obs_list = [slots[i].obs for i in active]
        timing = self.stats.timing
        graphs0 = self._graphs() if self._graphs is not None else (0, 0.0)
        t = time.perf_counter()
        try:
            actions, infos = self.actor.act_batch(obs_list, [slots[i].instruction for i in active], active)
        except BaseException as exc:
            timing.add("policy_other", time.perf_counter() - t)
            if not isinstance(exc, Exception):     # Ctrl-C: not the policy's fault
                raise
            log.error("policy call failed; recording %d episode(s) as errors:\n%s", len(active), short_error(exc))
            for i in active:
                self._finish(slots, i, success=False, error=f"policy: {short_error(exc)}")
            self._policy_fault(f"the policy raised: {type(exc).__name__}: {exc}")
            self._check_stop()
            self._fill(pool, slots, active)
            return
        t1 = time.perf_counter()
        call_ms = 1000.0 * (t1 - t)
        captures, capture_s = (0, 0.0)
        if self._graphs is not None:
            graphs1 = self._graphs()
            captures, capture_s = graphs1[0] - graphs0[0], graphs1[1] - graphs0[1]
        timing.policy_call(t1 - t, infos, capture_s, captures)
        actions = np.asarray(actions)
        if any(info.get("queried") for info in infos):
            self.stats.forwards += 1
        warmup = self.stats.forwards <= self.warmup_chunks
        bad = []
        for j, i in enumerate(active):
            ep = slots[i]
            ep.on_policy(infos[j], call_ms, warmup, 1000.0 * capture_s if captures else 0.0)
            if not np.isfinite(actions[j]).all():
                bad.append(i)
                continue
            if ep.video is not None:
                ep.video.add(obs_list[j], self._overlay(i))
            if ep.trace is not None:
                ep.trace.add(obs_list[j], actions[j])
        timing.add("record", time.perf_counter() - t1)
        for i in bad:
            summary = nonfinite_summary(actions[active.index(i)])
            self._finish(slots, i, success=False, error=f"policy returned a non-finite action at step "
                                                        f"{slots[i].steps}: {summary}")
        if bad:
            self._policy_fault(f"non-finite actions for {len(bad)} of {len(active)} episode(s), e.g. {summary}")
        else:
            self._policy_faults = 0

        prep = self._prepare is not None
        requests = {i: ("step+prep" if prep and self.actor.wants_prepared(i) else "step", actions[j])
                    for j, i in enumerate(active) if i not in bad}
        io0, t = pool.io_s, time.perf_counter()
        try:
            replies, failures = pool.request(requests, "step")
        except BaseException:                   # interrupted while the simulators step: the time is theirs
            timing.add("sim_wait", time.perf_counter() - t)
            raise
        timing.step_round(time.perf_counter() - t, pool.io_s - io0, [reply[-1] for reply in replies.values()])
        ended = list(bad)
        for i, (obs, _, terminated, truncated, info) in sorted(replies.items()):
            ep = slots[i]
            error = info.get("error") or ""
            if not error:
                ep.steps += 1
                ep.obs = obs
            if error or terminated or truncated:
                if ep.video is not None and not error:
                    ep.video.add(obs, self._overlay(i))
                self._finish(slots, i, success=bool(info.get("success", terminated)) and not error,
                             error=error or None)
                ended.append(i)
        for i, failure in failures.items():
            self._replace_worker(pool, slots, i, failure)
        self._check_stop()
        self._fill(pool, slots, sorted(ended + list(failures)))

    def _fill(self, pool: WorkerPool, slots: list[_Episode | None], free: list[int]) -> None:
        """Give each free slot the next episode of the queue and start it (reset) there."""
        while free and self._queue:
            requests = {}
            t = time.perf_counter()
            for i in free:
                if not self._queue:
                    break
                key = self._queue.popleft()
                slots[i] = _Episode(key=key, task=self.task_names.get((key.suite, key.task_id), ""), slot=i, started=t)
                job = {"suite": key.suite, "task_id": key.task_id, "episode": key.episode, "seed": self.seed}
                requests[i] = ("reset+prep" if self._prepare is not None else "reset", job)
            with self.stats.timing.part("reset"):
                replies, failures = pool.request(requests, "reset")
            free, started = [], []
            for i, (obs, info) in sorted(replies.items()):
                ep = slots[i]
                if info.get("error"):
                    self._finish(slots, i, success=False, error=info["error"])
                    free.append(i)
                    continue
                ep.obs, ep.instruction = obs, info.get("instruction") or ""
                if self.video_dir is not None:
                    ep.video = EpisodeVideo(self.video_dir, ep.key, ep.task, self.video_fps)
                if self.trace_path is not None and (self._trace_key is None or self._trace_key == ep.key):
                    path = self.trace_path if self._trace_key is not None else \
                        self.trace_path / f"{episode_stem(ep.key)}.npz"
                    ep.trace = TraceRecorder(path, ep.key, ep.task)
                started.append(i)
            for i, failure in failures.items():
                self._replace_worker(pool, slots, i, failure)
                free.append(i)
            if started:
                self.actor.reset(started)
            self._check_stop()

    def _replace_worker(self, pool: WorkerPool, slots: list[_Episode | None], i: int,
                        failure: WorkerFailure) -> None:
        """Worker i failed (and is stopped): its episode runs again or is recorded; start a new worker."""
        ep, again = slots[i], ""
        if ep is not None:
            self._attempts[ep.key] += 1
            if self._attempts[ep.key] >= MAX_ATTEMPTS:
                self._finish(slots, i, success=False, error=f"the simulator worker failed {self._attempts[ep.key]} "
                                                            f"times during this episode; last: {failure}")
            else:
                self._discard(ep)
                slots[i] = None
                self._queue.appendleft(ep.key)
                again = f"; {ep.key.label()} runs again"
        while failure is not None:
            self.stats.worker_restarts += 1
            if self.stats.worker_restarts > MAX_WORKER_RESTARTS:
                raise SimulatorFailure(f"simulator workers failed {self.stats.worker_restarts} times; giving up "
                                       f"(last: {failure})")
            log.warning("%s; starting a new worker%s", failure, again)
            with self.stats.timing.part("restart"):
                failure, again = pool.restart(i), ""

    def _policy_fault(self, what: str) -> None:
        self._policy_faults += 1
        if self._policy_faults >= MAX_POLICY_FAULTS:
            raise PolicyFault(f"{self._policy_faults} policy calls in a row failed (last: {what}); the policy "
                              "is broken, not one episode (NaN weights? wrong dtype?)")

    def _check_stop(self) -> None:
        if self.max_consecutive_errors and self._consecutive_errors >= self.max_consecutive_errors:
            label, error = self._last_error
            raise TooManyErrors(f"{self._consecutive_errors} episodes in a row ended with an error, the last one "
                                f"({label}):\n{error}")

    def _overlay(self, stream: int):
        """SpecPrune's picture of the kept patches for this stream's last query (None for other actors)."""
        fn = getattr(self.actor, "overlay_frame", None)
        return fn(stream) if fn is not None else None

    def _discard(self, ep: _Episode) -> None:
        if ep.video is not None:
            ep.video.abort()
            ep.video = None
        ep.trace = None

    def _finish(self, slots: list[_Episode | None], i: int, *, success: bool, error: str | None) -> None:
        with self.stats.timing.part("record"):
            self._record(slots, i, success=success, error=error)

    def _record(self, slots: list[_Episode | None], i: int, *, success: bool, error: str | None) -> None:
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
            "chunk_warmup": ep.chunk_warmup, "chunk_actions": ep.chunk_actions, "chunk_capture_ms": ep.chunk_capture_ms,
            "tokens_kept": ep.tokens_kept, "chunk_extra": ep.chunk_extra,
            "slot": i, "seed": self.seed, "video": video, "trace": trace,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.record_fields,
        }
        self.stats.episodes += 1
        self.stats.errors += int(bool(error))
        self.on_episode(record)
        self._consecutive_errors = self._consecutive_errors + 1 if error else 0
        if error:
            self._last_error = (ep.key.label(), error)
