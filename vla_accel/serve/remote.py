"""A client-side actor: the eval's simulators here, the policy in a `vla-accel-serve` process elsewhere.

    vla-accel-eval policy=remote policy.url=ws://gpu-host:8777 eval.num_envs=8 ...

    actor = RemoteActor("ws://gpu-host:8777")       # reset / act_batch / describe, like the local actors
    actor.reset([0, 1]); actions, infos = actor.act_batch(obs_list, instructions, [0, 1])

One websocket connection (= one server session, its own pruning history) per stream. A step sends the
observations of every stream that needs the policy first and then reads the answers, so the server batches
them into one forward. With a server in mode=chunk the chunk is executed open loop here (one request per
8 steps); in mode=action every step is a request and the server keeps the queue.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Sequence

import numpy as np

from .codec import packb, unpackb


class RemoteError(RuntimeError):
    """The server answered with an error, or could not be reached."""


class RemoteActor:
    def __init__(self, url: str, *, timeout_s: float = 600.0, open_timeout_s: float = 30.0):
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"policy.url must be the server's websocket address, ws://host:port; got {url!r}")
        self.url, self.timeout_s, self.open_timeout_s = url, timeout_s, open_timeout_s
        self.conns: dict[int, Any] = {}
        self.queues: dict[int, deque] = {}
        conn, self.meta = self._connect()  # fail fast when no server is there; learn its mode
        conn.close()
        self.mode = self.meta.get("mode")
        if self.mode not in ("chunk", "action"):
            raise RemoteError(f"{url} did not answer as vla-accel-serve (metadata {self.meta!r})")

    def _connect(self):
        import inspect

        from websockets.sync.client import connect

        # a long-lived connection: websockets >= 17 asks for legacy=True outside a with-block (15, 16 lack the flag)
        extra = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
        try:
            conn = connect(self.url, compression=None, max_size=None, open_timeout=self.open_timeout_s, proxy=None,
                           **extra)
            meta = unpackb(conn.recv(timeout=self.open_timeout_s))
        except (OSError, TimeoutError) as err:
            raise RemoteError(f"cannot reach the policy server at {self.url} ({type(err).__name__}: {err}); start "
                              "it with vla-accel-serve (docs/serving.md)") from err
        if not isinstance(meta, dict):
            raise RemoteError(f"{self.url} sent {type(meta).__name__} as its metadata, expected a map")
        return conn, meta

    def _recv(self, stream: int) -> dict:
        try:
            reply = self.conns[stream].recv(timeout=self.timeout_s)
        except TimeoutError:
            raise RemoteError(f"no answer from {self.url} within {self.timeout_s:g} s (stream {stream})") from None
        if isinstance(reply, str):
            raise RemoteError(f"the policy server refused stream {stream}'s request: {reply}")
        return unpackb(reply)

    def identity(self) -> dict[str, Any]:
        """What of the server's policy decides results (the eval's fingerprint): the identity the server
        announces (weights' content hash, dtype, statistics key, pruning, runtime); from a server that
        announces none, its policy description without the device it runs on."""
        if isinstance(self.meta.get("identity"), dict):
            return self.meta["identity"]
        policy = self.meta.get("policy", {})
        return {k: v for k, v in policy.items() if k not in ("device", "device_name")}

    # ---- actor interface -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**self.meta.get("policy", {}), "actor": f"remote ({self.meta['policy'].get('actor', '?')})",
                "remote_url": self.url, "remote_mode": self.mode,
                "device_name": f"{self.meta.get('device_name', '?')} (remote: {self.url})"}

    def reset(self, streams: Sequence[int]) -> None:
        """New episodes: a fresh session state on the server (its reset message) and an empty local queue."""
        for s in streams:
            self.queues[s] = deque()
            if s not in self.conns:
                self.conns[s], _ = self._connect()
                continue
            self.conns[s].send(packb({"__ctrl__": "reset"}))
            ack = self._recv(s)
            if ack.get("__ack__") != "reset":
                raise RemoteError(f"unexpected answer to reset on stream {s}: {ack!r}")

    def act_batch(self, obs_list: Sequence[dict], instructions: Sequence[str], streams: Sequence[int]):
        for s in streams:
            if s not in self.conns:
                self.reset([s])
        need = [i for i, s in enumerate(streams) if self.mode == "action" or not self.queues[s]]
        t0 = time.perf_counter()
        for i in need:  # all requests first: the server batches them
            obs = obs_list[i]
            self.conns[streams[i]].send(packb({"full_image": obs["full_image"], "wrist_image": obs["wrist_image"],
                                               "state": obs["state"], "instruction": instructions[i]}))
        infos: list[dict[str, Any]] = [{"queried": False, "latency_ms": None, "batch_size": None,
                                        "tokens_kept": None} for _ in streams]
        for i in need:
            reply = self._recv(streams[i])
            self.queues[streams[i]] = deque(np.asarray(reply["actions"]))
            infos[i] = {**reply.get("info", {}), "server_timing": reply.get("server_timing", {}),
                        "round_trip_ms": (time.perf_counter() - t0) * 1e3}
        actions = np.stack([self.queues[s].popleft() for s in streams])
        return actions, infos

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


def remote_actor(cfg) -> RemoteActor:
    """The eval's hook (vla_accel.eval.factory, policy=remote): RemoteActor from a RunConfig."""
    from vla_accel.eval.config import ConfigError

    local = [f"{g}={cfg_g['name']}" for g, cfg_g in (("prune", cfg.prune), ("runtime", cfg.runtime))
             if cfg_g["name"] not in ("none", "reference")]
    if local:
        raise ConfigError(f"policy=remote runs the server's policy, pruning and runtime; {', '.join(local)} would "
                          "not apply here: set them on vla-accel-serve and leave prune=none runtime=reference")
    try:
        return RemoteActor(cfg.policy.url)
    except (ValueError, RemoteError) as err:
        raise ConfigError(str(err)) from None
