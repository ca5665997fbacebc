"""Simulator worker processes under supervision: every wait is bounded, a dead or silent worker is replaced.

Main process (WorkerPool)                       worker process (_serve, spawn / forkserver)
  start: spawn, wait for ("ready", pid)            EpisodeSlot: one episode at a time, never raises
  request({i: ("reset", job)})        ------>        reset(job)    -> (obs, info)
  request({i: ("step", action)})      ------>        step(action)  -> (obs, reward, terminated, truncated, info)
  close                               ------>        leaves its loop, closes the simulator

Every reply's info carries `busy_s` (the worker's time in reset / step) and, for a step, `render_s` (the
env's own estimate of its rendering per step, `time_render()`, measured once per simulator build; absent for
envs without it). The pool sums the main process's time receiving replies (`io_s`: unpickling the
observations) for the timing breakdown.

With `prepare` (an obs -> obs callable, e.g. the policy's image_prep()), a "reset+prep" / "step+prep" request
also runs it on the observation in the worker (eval.prepare_in_workers: the image pre-processing of N simulators
in N processes instead of the main one); its time comes back as `prep_s`.

A worker that exits, breaks its pipe or stays silent past `timeout_s` (`startup_timeout_s` until it
is ready) comes back from start() / request() as a WorkerFailure (which worker, in which phase,
why) and is stopped: SIGTERM (with SIGCONT, so a stopped process gets it), then SIGKILL, each
followed by a join of at most `grace_s`. close() asks healthy workers to leave first.
Nothing here waits without a limit. Workers ignore SIGINT (Ctrl-C reaches the whole process group;
the main process decides) and leave when the main process is gone (their pipe ends).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from vla_accel.eval import faults

log = logging.getLogger(__name__)


def short_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


class EpisodeSlot:
    """Worker side: runs the episode of each reset(job); errors come back in info["error"] (a traceback).

    job: {"suite", "task_id", "episode", "seed"}. The env is built on the first job (in the worker)
    and rebuilt on the next reset after an error.
    """

    def __init__(self, make_env: Callable[[str, int], Any]):
        self._make_env = make_env
        self._env = None
        self._episode: int | None = None
        self._task: int | None = None
        self._t = 0
        self._render_s: float | None = None   # rendering per step, estimated once per simulator build

    def _drop_env(self) -> None:
        env, self._env = self._env, None
        try:
            if env is not None:
                env.close()
        except Exception:  # closing a broken simulator may fail too; it is dropped either way
            pass

    def reset(self, job: dict):
        self._episode, self._task, self._t = None, job["task_id"], 0
        faults.pause("reset", task=job["task_id"], episode=job["episode"])
        try:
            if self._env is None:
                self._env = self._make_env(job["suite"], job["task_id"])
            built = getattr(self._env.unwrapped, "built", None)   # (suite, task) the simulator was built for
            obs, info = self._env.reset(seed=job["seed"], options={
                "episode": job["episode"], "suite": job["suite"], "task_id": job["task_id"]})
            if self._render_s is None or getattr(self._env.unwrapped, "built", None) != built:
                self._render_s = _render_estimate(self._env)
        except Exception as exc:
            self._drop_env()
            return None, {"error": short_error(exc)}
        self._episode = job["episode"]
        return _arrays(obs), {"instruction": str(info.get("instruction", "")), "error": ""}

    def step(self, action):
        if self._episode is None:
            return None, 0.0, False, False, {"error": "step() without a running episode"}
        faults.pause("step", task=self._task, episode=self._episode, step=self._t)
        try:
            obs, reward, terminated, truncated, info = self._env.step(action)
        except Exception as exc:
            self._episode = None
            self._drop_env()
            return None, 0.0, False, False, {"error": short_error(exc)}
        self._t += 1
        if terminated or truncated:
            self._episode = None
        out = {"success": bool(info.get("success", terminated)), "error": ""}
        if self._render_s is not None:
            out["render_s"] = self._render_s
        return _arrays(obs), float(reward), bool(terminated), bool(truncated), out

    def close(self) -> None:
        self._drop_env()
        self._render_s = None


def _render_estimate(env) -> float | None:
    """Seconds of rendering per step of the env (its `time_render()`), or None: the env renders inside its
    step and has no such method, or the estimate failed (it is only a figure; the episode goes on)."""
    fn = getattr(env.unwrapped, "time_render", None)
    if fn is None:
        return None
    try:
        return float(fn())
    except Exception as exc:  # noqa: BLE001 - a failed estimate leaves the render share unknown
        log.warning("render time estimate failed: %s", exc)
        return None


def _arrays(obs: Any) -> Any:
    """Observation without text entries (the instruction travels in info)."""
    if isinstance(obs, dict):
        return {k: v for k, v in obs.items() if not isinstance(v, str)}
    return obs


def _serve(conn: Connection, make_env: Callable[[str, int], Any], prepare: Callable | None = None) -> None:
    """Worker process main loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faults.pause("startup")
    slot = EpisodeSlot(make_env)
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                command, data = conn.recv()
            except (EOFError, OSError):
                break                              # the main process is gone
            if command == "close":
                break
            t = time.perf_counter()
            base, _, prep = command.partition("+")
            reply = slot.reset(data) if base == "reset" else slot.step(data)
            if prep and prepare is not None and reply[0] is not None:
                t_prep = time.perf_counter()
                try:
                    reply = (prepare(reply[0]), *reply[1:])
                except Exception as exc:  # noqa: BLE001 - the policy prepares the images itself then
                    log.warning("preparing the observation in the worker failed: %s", exc)
                reply[-1]["prep_s"] = time.perf_counter() - t_prep
            reply[-1]["busy_s"] = time.perf_counter() - t     # the info dict ends both replies
            conn.send(reply)
    finally:
        slot.close()


class WorkerFailure(RuntimeError):
    """A worker died, broke its pipe or did not answer in time."""

    def __init__(self, index: int, phase: str, reason: str):
        super().__init__(f"simulator worker {index} {reason} during {phase}")
        self.index, self.phase, self.reason = index, phase, reason


Failures = dict[int, WorkerFailure]     # worker index -> what happened to it


def _exit_reason(process) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class WorkerPool:
    """`size` simulator worker processes; see the module doc. Indices are slots: 0..size-1."""

    def __init__(self, make_env: Callable[[str, int], Any], size: int, *, timeout_s: float, startup_timeout_s: float,
                 context: str = "spawn", env_vars: dict[str, str] | None = None, grace_s: float = 5.0,
                 prepare: Callable | None = None):
        self.make_env, self.size, self.prepare = make_env, size, prepare
        self.timeout_s, self.startup_timeout_s, self.grace_s = timeout_s, startup_timeout_s, grace_s
        self.ctx = mp.get_context(context)
        self.env_vars = dict(env_vars or {})
        self.processes: list[Any] = [None] * size
        self.conns: list[Connection | None] = [None] * size
        self.io_s = 0.0      # main-process seconds spent receiving replies (unpickling observations)

    # ---- life cycle --------------------------------------------------------------------------
    def start(self, indices: list[int]) -> dict[int, WorkerFailure]:
        """Spawn the workers `indices` and wait (bounded) until each is ready; returns the failures."""
        self.spawn(indices)
        return self.wait_ready(indices)

    def spawn(self, indices: list[int]) -> None:
        """Start the worker processes `indices` without waiting for them (wait_ready() does, bounded)."""
        saved = {k: os.environ.get(k) for k in self.env_vars}
        os.environ.update(self.env_vars)           # spawned workers copy the environment at start
        try:
            for i in indices:
                parent, child = self.ctx.Pipe()
                process = self.ctx.Process(target=_serve, args=(child, self.make_env, self.prepare), daemon=True,
                                           name=f"vla-accel-sim-{i}")
                process.start()
                child.close()
                self.processes[i], self.conns[i] = process, parent
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def wait_ready(self, indices: list[int]) -> dict[int, WorkerFailure]:
        """Wait (bounded) until each spawned worker in `indices` is ready; failed ones are stopped and returned."""
        replies, failures = self._collect(indices, "start-up", self.startup_timeout_s)
        for i, reply in replies.items():
            if not (isinstance(reply, tuple) and reply[:1] == ("ready",)):
                failures[i] = WorkerFailure(i, "start-up", f"sent {reply!r} instead of ready")
        for i in failures:
            self.stop(i)
        return failures

    def restart(self, i: int) -> WorkerFailure | None:
        self.stop(i)
        return self.start([i]).get(i)

    def stop(self, i: int) -> None:
        """Stop worker i now: SIGTERM (+ SIGCONT), then SIGKILL; each join bounded by grace_s."""
        process, conn = self.processes[i], self.conns[i]
        self.processes[i] = self.conns[i] = None
        if process is None:
            return
        _escalate(process, self.grace_s)
        conn.close()

    def close(self, polite: bool = True) -> None:
        """Stop every worker; polite: ask all first and give them one shared grace period."""
        alive = [i for i in range(self.size) if self.processes[i] is not None]
        if polite:
            for i in alive:
                try:
                    self.conns[i].send(("close", None))
                except OSError:
                    pass
            end = time.monotonic() + self.grace_s
            for i in alive:
                self.processes[i].join(max(0.0, end - time.monotonic()))
        for i in alive:
            self.stop(i)

    # ---- requests ----------------------------------------------------------------------------
    def request(self, requests: dict[int, tuple[str, Any]], phase: str) -> tuple[dict[int, Any], Failures]:
        """Send each worker its (command, data); wait for the answers (bounded). -> (replies, failures)."""
        failures: dict[int, WorkerFailure] = {}
        sent = []
        for i, message in requests.items():
            try:
                self.conns[i].send(message)
                sent.append(i)
            except (OSError, ValueError):             # a dead worker's pipe
                failures[i] = WorkerFailure(i, phase, _exit_reason(_reaped(self.processes[i])))
        replies, late = self._collect(sent, phase, self.timeout_s)
        failures.update(late)
        for i in failures:
            self.stop(i)
        return replies, failures

    def _collect(self, indices: list[int], phase: str, timeout_s: float) -> tuple[dict[int, Any], Failures]:
        """One message from each worker in `indices` within timeout_s; the rest are failures."""
        replies: dict[int, Any] = {}
        failures: dict[int, WorkerFailure] = {}
        waiting = {self.conns[i]: i for i in indices}
        end = time.monotonic() + timeout_s
        while waiting:
            left = end - time.monotonic()
            ready = wait(list(waiting), timeout=max(0.0, left)) if left > 0 else []
            if not ready:
                for i in waiting.values():
                    failures[i] = WorkerFailure(i, phase, f"did not answer within {timeout_s:g} s")
                break
            for conn in ready:
                i = waiting.pop(conn)
                t = time.perf_counter()
                try:
                    replies[i] = conn.recv()
                except (EOFError, OSError):
                    failures[i] = WorkerFailure(i, phase, _exit_reason(_reaped(self.processes[i])))
                self.io_s += time.perf_counter() - t
        return replies, failures


def _reaped(process, timeout: float = 1.0):
    """The process after a short join, so that its exit code is known when it has just died."""
    process.join(timeout)
    return process


def _escalate(process, grace_s: float) -> None:
    if process.is_alive():
        process.terminate()
        try:
            os.kill(process.pid, signal.SIGCONT)   # a stopped (SIGSTOP) process gets SIGTERM only when continued
        except OSError:
            pass
        process.join(grace_s)
    if process.is_alive():
        process.kill()
        process.join(grace_s)
    if process.is_alive():
        log.error("simulator worker pid %d is still alive after SIGKILL; leaving it", process.pid)

