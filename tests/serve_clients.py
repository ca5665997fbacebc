"""Test helpers for vla-accel-serve: minimal re-implementations of the two clients it must speak to, written from
the protocol facts (NOT from vla_accel.serve.codec, so that the tests check the wire format), a real server
process, and a bounded load test.

- openpi: websockets + msgpack; an ndarray is {"__ndarray__": True, "data": bytes, "dtype": str, "shape": [...]},
  a numpy scalar {"__npgeneric__": True, "data": value, "dtype": str}; the server's first message is its
  metadata; then one observation per message, the reply holds "actions" and "server_timing"; a TEXT reply is an
  error (openpi's client raises on it). GET /healthz answers "OK".
- OpenVLA-OFT deploy.py: POST /act with the observation as JSON with json-numpy arrays (full_image, a key with
  "wrist", state, instruction), or {"encoded": json_numpy.dumps(observation)}; the reply is the json-numpy list
  of the chunk's actions (for "encoded", a JSON string holding that text).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import json_numpy
import msgpack
import numpy as np
import requests
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]


# ---- openpi msgpack-numpy, written from the format ---------------------------------------------------------
def _pack(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def openpi_pack(obj) -> bytes:
    return msgpack.Packer(default=_pack).pack(obj)


def openpi_unpack(data: bytes):
    return msgpack.unpackb(data, object_hook=_unpack)


class OpenpiClient:
    """openpi's WebsocketClientPolicy, minimal: metadata on connect, infer() per observation."""

    def __init__(self, url: str, timeout: float = 120.0):
        self.timeout = timeout
        legacy = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}  # long-lived
        self.ws = connect(url, compression=None, max_size=None, proxy=None, open_timeout=timeout, **legacy)
        self.metadata = openpi_unpack(self.ws.recv(timeout=timeout))

    def send_raw(self, data) -> None:
        self.ws.send(data)

    def recv(self):
        reply = self.ws.recv(timeout=self.timeout)
        return reply if isinstance(reply, str) else openpi_unpack(reply)

    def infer(self, obs: dict):
        """-> the reply map, or the error text the server sent."""
        self.ws.send(openpi_pack(obs))
        return self.recv()

    def close(self) -> None:
        self.ws.close()


class DeployClient:
    """OpenVLA-OFT's REST client (requests + json-numpy)."""

    def __init__(self, base: str, timeout: float = 120.0):
        self.base, self.timeout = base, timeout

    def post(self, path: str, body: bytes | str, headers: dict | None = None) -> requests.Response:
        return requests.post(self.base + path, data=body, timeout=self.timeout,
                             headers={"Content-Type": "application/json", **(headers or {})})

    def act(self, obs: dict, encoded: bool = False, **extra):
        """-> (status, list of actions | error text)."""
        payload = {**obs, **extra}
        body = json_numpy.dumps({"encoded": json_numpy.dumps(payload)} if encoded else payload)
        r = self.post("/act", body)
        if r.status_code != 200:
            return r.status_code, r.json()["error"]
        return 200, json_numpy.loads(r.json()) if encoded else json_numpy.loads(r.text)


# ---- observations ------------------------------------------------------------------------------------------
def images(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)


def state(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).normal(size=8).astype(np.float32)


def openpi_obs(img_seed: int, state_seed: int, prompt: str = "put the bowl on the plate") -> dict:
    full, wrist = images(img_seed)
    return {"observation/image": full, "observation/wrist_image": wrist, "observation/state": state(state_seed),
            "prompt": prompt}


def policy_obs(obs: dict) -> tuple[dict, str]:
    """openpi keys -> the policy's (obs, instruction)."""
    return ({"full_image": obs["observation/image"], "wrist_image": obs["observation/wrist_image"],
             "state": obs["observation/state"]}, obs["prompt"])


# ---- a real server process ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m vla_accel.serve.cli` on a free loopback port (tiny random policy on CPU)."""

    def __init__(self, *overrides: str, log_path: Path, startup_s: float = 300.0):
        self.port = free_port()
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "vla_accel.serve.cli", "serve.host=127.0.0.1", f"serve.port={self.port}",
               "policy.device=cpu", f"hydra.run.dir={self.log_path.parent / 'hydra'}", *overrides]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.http + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /healthz within {startup_s} s:\n{self.log()}")
            time.sleep(0.5)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None and requests.get(self.http + "/healthz", timeout=10).text == "OK\n"

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def server(*overrides: str, log_path: Path):
    s = ServerProcess(*overrides, log_path=log_path)
    try:
        yield s
    finally:
        s.stop()


# ---- bounded load test -------------------------------------------------------------------------------------
def load_test(url: str, clients: int, requests_per_client: int, expected: dict, obs_for) -> dict:
    """`clients` openpi clients in threads, each sending `requests_per_client` observations of its own
    (obs_for(client, i) -> (key, obs)) and checking the reply against expected[key] (rel. tolerance for the
    batched forward). -> {"latency_ms": [...], "dropped": n, "mismatched": n, "errors": [...], "wall_s": s}."""
    lat, errors = [], []
    counts = {"dropped": 0, "mismatched": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run(c: int) -> None:
        try:
            client = OpenpiClient(url)
        except Exception as err:  # noqa: BLE001 - counted, the test fails on it
            with lock:
                errors.append(f"client {c}: connect: {err}")
                counts["dropped"] += requests_per_client
            barrier.abort()
            return
        try:
            barrier.wait()
            for i in range(requests_per_client):
                key, obs = obs_for(c, i)
                t0 = time.perf_counter()
                try:
                    reply = client.infer(obs)
                except Exception as err:  # noqa: BLE001
                    with lock:
                        errors.append(f"client {c} request {i}: {type(err).__name__}: {err}")
                        counts["dropped"] += requests_per_client - i
                    return
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    if isinstance(reply, str) or "actions" not in reply:
                        counts["dropped"] += 1
                        errors.append(f"client {c} request {i}: {reply!r}"[:300])
                    elif not np.allclose(reply["actions"], expected[key], rtol=1e-4, atol=1e-5):
                        counts["mismatched"] += 1
                    lat.append(ms)
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return {"latency_ms": lat, **counts, "errors": errors, "wall_s": time.perf_counter() - t0,
            "answered": len(lat)}
