"""The serving engine: sessions as actor streams, dynamic batching, one thread that owns the model.

    engine = Engine(actor, cfg, metrics)      # actor: reset / act_batch / describe (+ chunk_batch for mode=chunk)
    await engine.start()
    session = engine.open_session("websocket")
    result = await engine.submit(session, obs, instruction)   # {"actions": [n, 7], "info": ..., "timing": ...}
    await engine.reset(session); await engine.close_session(session); await engine.stop()

Flow of one request: decoded on the event loop -> pre-processed (JPEG + resize + tokenize) in a small thread
pool -> waits in `pending` -> the collector takes up to `max_batch` ready requests, at most one per session,
once the oldest has waited `batch_window_ms` (at once if the batch is full) -> ONE actor call for the batch in
the model thread (the event loop never blocks on it) -> each request's future gets its rows. Resets and the
release of closed sessions run in the same model thread, in order with the batches.

Each session is one stream (a slot number) of the actor: its own action queue, pruning history and controller
mode. Slots are reused after a session ends (reset first), so the actor holds at most `max_sessions` streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ServeConfig


class SessionError(LookupError):
    """Unknown or expired session (HTTP 404)."""


class Busy(RuntimeError):
    """No session slot free, or the server is shutting down (HTTP 503)."""


@dataclass
class Session:
    id: str
    slot: int
    protocol: str
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    requests: int = 0
    active: int = 0  # requests of this session between submit and answer


@dataclass
class Request:
    session: Session
    obs: dict
    text: str
    future: asyncio.Future
    t_arrive: float
    prepared: Any = None
    t_ready: float = 0.0


def plain_values(x: Any) -> Any:
    """Actor info -> msgpack / JSON-safe values (numpy scalars and arrays become python ones)."""
    if isinstance(x, dict):
        return {str(k): plain_values(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_values(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


class ServedActor:
    """The one adapter between the server and an actor (duck-typed: reset / act_batch / describe, and
    chunk_batch for mode=chunk). It also pre-processes requests off the model thread: the actor's policy gets
    an instance-level `prepare` that returns the inputs computed on arrival (same function, same values) and
    falls back to computing them."""

    def __init__(self, actor, mode: str):
        if mode == "chunk" and not callable(getattr(actor, "chunk_batch", None)):
            raise TypeError(f"serve.mode=chunk needs an actor with chunk_batch(obs_list, instructions, streams); "
                            f"{type(actor).__name__} has none: use serve.mode=action")
        self.actor, self.mode = actor, mode
        self._cache: dict[int, tuple[dict, str, Any]] = {}
        policy = getattr(actor, "policy", None)
        self._prepare = getattr(policy, "prepare", None)
        if self._prepare is not None:
            policy.prepare = self._cached_prepare

    def describe(self) -> dict:
        return plain_values(self.actor.describe())

    def prepare(self, obs: dict, text: str) -> Any:
        """Any thread: the policy's pre-processing of one request (raises on input the policy refuses)."""
        return self._prepare([obs], [text]) if self._prepare is not None else None

    def _cached_prepare(self, obs_list, instructions):
        import torch

        parts = []
        for obs, text in zip(obs_list, instructions):
            hit = self._cache.get(id(obs))
            parts.append(hit[2] if hit is not None and hit[0] is obs and hit[1] == text
                         else self._prepare([obs], [text]))
        return ([p[0][0] for p in parts], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    def reset(self, slots: list[int]) -> None:
        self.actor.reset(slots)

    def run(self, requests: list[Request]) -> tuple[list[np.ndarray], list[dict]]:
        """Model thread: one actor call for the batch -> per request actions [8, 7] (chunk) or [1, 7], info."""
        obs = [r.obs for r in requests]
        texts = [r.text for r in requests]
        slots = [r.session.slot for r in requests]
        self._cache = {id(r.obs): (r.obs, r.text, r.prepared) for r in requests if r.prepared is not None}
        try:
            if self.mode == "chunk":
                chunks, infos = self.actor.chunk_batch(obs, texts, slots)
                actions = [np.asarray(c) for c in chunks]
            else:
                acts, infos = self.actor.act_batch(obs, texts, slots)
                actions = [np.asarray(a)[None] for a in acts]
        finally:
            self._cache = {}
        return actions, [plain_values(i) for i in infos]


class Engine:
    def __init__(self, actor, cfg: ServeConfig, metrics=None):
        self.cfg = cfg
        self.served = actor if isinstance(actor, ServedActor) else ServedActor(actor, cfg.mode)
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._free = list(range(cfg.max_sessions))[::-1]
        self._pending: deque[Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="vla-serve-model")
        self._prep = ThreadPoolExecutor(cfg.prep_threads, thread_name_prefix="vla-serve-prep")
        self._tasks: list[asyncio.Task] = []
        self.inflight = 0
        self._idle: asyncio.Event | None = None
        self.draining = False
        self.batches = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._tasks = [asyncio.create_task(self._collect(), name="vla-serve-batcher"),
                       asyncio.create_task(self._reap(), name="vla-serve-reaper")]

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, wait for the ones in flight (True: all finished within `timeout`)."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in self._pending:
            if not r.future.done():
                r.future.set_exception(Busy("the server stopped before this request ran"))
        self._pending.clear()
        self._model.shutdown(wait=True)
        self._prep.shutdown(wait=True)

    # ---- sessions ----------------------------------------------------------------------------
    def open_session(self, protocol: str) -> Session:
        if self.draining:
            raise Busy("the server is shutting down")
        if not self._free:
            raise Busy(f"all {self.cfg.max_sessions} session slots are in use (serve.max_sessions); close one or "
                       "retry later")
        s = Session(id=uuid.uuid4().hex, slot=self._free.pop(), protocol=protocol)
        self.sessions[s.id] = s
        self._gauge()
        return s

    def get_session(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionError(f"unknown session {session_id!r}: never opened, closed, or idle for more than "
                               f"{self.cfg.session_idle_s:g} s (serve.session_idle_s); POST /reset opens a new one")
        return s

    async def reset(self, session: Session) -> None:
        """New episode on the session's stream (after anything of it already queued in the model thread)."""
        session.last_used = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(self._model, self.served.reset, [session.slot])

    async def close_session(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        self._gauge()
        # the slot's state is freed in the model thread, after anything of it still queued there
        try:
            await asyncio.get_running_loop().run_in_executor(self._model, self.served.reset, [session.slot])
        except RuntimeError:  # the model thread is already shut down (server stopping): nothing to free
            pass
        self._free.append(session.slot)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.sessions.set(len(self.sessions))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.cfg.session_idle_s / 4, 5.0))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.protocol == "rest" and now - s.last_used > self.cfg.session_idle_s and not s.active:
                    await self.close_session(s)

    # ---- requests ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def track(self):
        """Around everything a request does, up to its response being sent: drain() waits for these."""
        if self.draining:
            raise Busy("the server is shutting down")
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def submit(self, session: Session, obs: dict, text: str) -> dict:
        """-> {"actions", "info", "timing"}; raises the policy's error for input it refuses (a ValueError /
        TypeError / KeyError from pre-processing)."""
        loop = asyncio.get_running_loop()
        session.last_used = time.monotonic()
        session.requests += 1
        session.active += 1
        req = Request(session, obs, text, loop.create_future(), time.perf_counter())
        try:
            req.prepared = await loop.run_in_executor(self._prep, self.served.prepare, obs, text)
            req.t_ready = time.perf_counter()
            self._pending.append(req)
            self._wakeup.set()
            return await req.future
        finally:
            session.active -= 1
            session.last_used = time.monotonic()

    def _take(self) -> list[Request]:
        batch, seen, keep = [], set(), deque()
        while self._pending and len(batch) < self.cfg.max_batch:
            r = self._pending.popleft()
            if r.future.done():  # its client went away while it waited
                continue
            if r.session.closed:  # closed (POST /close) while this request waited: its slot is no longer its own
                r.future.set_exception(SessionError(f"session {r.session.id!r} was closed before this request ran"))
                continue
            if r.session.id in seen:
                keep.append(r)
            else:
                seen.add(r.session.id)
                batch.append(r)
        self._pending.extendleft(reversed(keep))
        return batch

    def _ready_sessions(self) -> int:
        return len({r.session.id for r in self._pending})

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.cfg.batch_window_ms / 1e3
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].t_ready + window
            while self._ready_sessions() < self.cfg.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                actions, infos = await loop.run_in_executor(self._model, self.served.run, batch)
                error = None
            except Exception as err:  # noqa: BLE001 - reported to each request of the batch; the server stays up
                error = err
            t1 = time.perf_counter()
            self.batches += 1
            if self.metrics is not None:
                self.metrics.batch(len(batch), error is not None)
            for i, r in enumerate(batch):
                if r.future.done():
                    continue
                if error is not None:
                    r.future.set_exception(RuntimeError(f"the batched forward failed: {type(error).__name__}: "
                                                        f"{error}"))
                    continue
                timing = {"prep_ms": (r.t_ready - r.t_arrive) * 1e3, "queue_ms": (t0 - r.t_ready) * 1e3,
                          "compute_ms": (t1 - t0) * 1e3, "infer_ms": (t1 - r.t_arrive) * 1e3,
                          "batch_size": len(batch)}
                r.future.set_result({"actions": actions[i], "info": infos[i], "timing": timing})
