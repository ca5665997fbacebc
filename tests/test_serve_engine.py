"""vla-accel-serve's engine and app in this process, with a fake deterministic actor (no model): dynamic
batching, one request per session per forward, session limits and idle expiry, a failing forward, graceful
shutdown. The protocols against the real policy in a separate server process: test_serve.py."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import requests
from serve_clients import DeployClient, OpenpiClient, free_port, openpi_obs
from websockets.exceptions import ConnectionClosed

from vla_accel.serve import ServeConfig, ServeConfigError, serve

BOOM = 666.0  # a state whose forward raises


class FakeActor:
    """Chunk row k of a request = state[:7] + k (so every client can check it got ITS answer); `compute_s` per
    forward; act_batch keeps a per-stream step counter like a queue. Records the streams of every forward."""

    def __init__(self, compute_s: float = 0.0):
        self.compute_s = compute_s
        self.forwards: list[list[int]] = []
        self.resets: list[int] = []
        self.steps: dict[int, int] = {}

    def describe(self):
        return {"name": "fake", "device": "cpu", "actor": "fake"}

    def reset(self, streams):
        for s in streams:
            self.resets.append(s)
            self.steps[s] = 0

    def _chunks(self, obs_list, streams):
        self.forwards.append(list(streams))
        time.sleep(self.compute_s)
        if any(float(o["state"][0]) == BOOM for o in obs_list):
            raise RuntimeError("fake forward failed")
        return np.stack([np.asarray(o["state"][:7], np.float64)[None] + np.arange(8.0)[:, None] for o in obs_list])

    def chunk_batch(self, obs_list, instructions, streams):
        return self._chunks(obs_list, streams), [{"queried": True, "stream": s} for s in streams]

    def act_batch(self, obs_list, instructions, streams):
        chunks = self._chunks(obs_list, streams)
        out = []
        for c, s in zip(chunks, streams):
            out.append(c[self.steps.get(s, 0) % 8])
            self.steps[s] = self.steps.get(s, 0) + 1
        return np.stack(out), [{"queried": True} for _ in streams]


@contextlib.contextmanager
def running(actor, **settings):
    cfg = ServeConfig(host="127.0.0.1", port=free_port(), **settings)
    ready, holder = threading.Event(), {}

    def on_ready(server):
        holder["server"] = server
        ready.set()

    thread = threading.Thread(target=serve, args=(actor, cfg), kwargs={"on_ready": on_ready}, daemon=True)
    thread.start()
    assert ready.wait(60), "the in-process server did not start"
    try:
        yield cfg, holder["server"]
    finally:
        holder["server"].should_exit = True
        thread.join(60)
        assert not thread.is_alive()


def url(cfg, scheme="ws"):
    return f"{scheme}://127.0.0.1:{cfg.port}"


def obs(seed: int, first: float | None = None) -> dict:
    o = openpi_obs(0, seed)
    if first is not None:
        o["observation/state"] = o["observation/state"].copy()
        o["observation/state"][0] = first
    return o


def expected_chunk(o: dict) -> np.ndarray:
    return o["observation/state"][:7].astype(np.float64)[None] + np.arange(8.0)[:, None]


def parallel(fn, n: int) -> list:
    out = [None] * n

    def run(i):
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_config_rejects_bad_values_naming_the_field():
    for bad, field in (({"mode": "chunks"}, "serve.mode"), ({"protocol": "grpc"}, "serve.protocol"),
                       ({"max_batch": 0}, "serve.max_batch"), ({"batch_window_ms": -1}, "serve.batch_window_ms"),
                       ({"port": 70000}, "serve.port"), ({"batch_size": 4}, "serve.batch_size")):
        with pytest.raises(ServeConfigError, match=field.replace(".", r"\.")):
            ServeConfig.from_dict(bad)


def test_concurrent_requests_run_as_one_forward_and_each_gets_its_own_answer():
    actor = FakeActor(compute_s=0.05)
    with running(actor, batch_window_ms=300.0, max_batch=8) as (cfg, _):
        clients = [OpenpiClient(url(cfg)) for _ in range(4)]
        replies = parallel(lambda i: clients[i].infer(obs(i)), 4)
        for i, r in enumerate(replies):
            np.testing.assert_array_equal(r["actions"], expected_chunk(obs(i)))
            assert r["server_timing"]["batch_size"] == 4
            assert r["server_timing"]["queue_ms"] >= 0 and r["server_timing"]["compute_ms"] >= 50
        assert len(actor.forwards) == 1 and len(set(actor.forwards[0])) == 4  # one forward, four streams
        for c in clients:
            c.close()


def test_max_batch_splits_and_one_session_never_appears_twice_in_a_forward():
    actor = FakeActor(compute_s=0.02)
    with running(actor, batch_window_ms=200.0, max_batch=2, mode="action") as (cfg, _):
        http = DeployClient(url(cfg, "http"))
        sid = requests.post(http.base + "/reset", json={}).json()["session_id"]
        full = {"full_image": obs(0)["observation/image"], "wrist_image": obs(0)["observation/wrist_image"],
                "instruction": "x"}
        # three requests of ONE session at once: three forwards, in order
        res = parallel(lambda i: http.act({**full, "state": obs(i)["observation/state"]}, session_id=sid), 3)
        assert all(status == 200 for status, _ in res)
        assert [len(f) for f in actor.forwards] == [1, 1, 1]
        # five sessions at once with max_batch=2: forwards of at most 2
        actor.forwards.clear()
        clients = [OpenpiClient(url(cfg)) for _ in range(5)]
        parallel(lambda i: clients[i].infer(obs(i)), 5)
        assert sum(len(f) for f in actor.forwards) == 5 and max(len(f) for f in actor.forwards) <= 2
        for f in actor.forwards:
            assert len(set(f)) == len(f)
        for c in clients:
            c.close()


def test_action_mode_returns_one_action_per_call_from_the_servers_queue():
    actor = FakeActor()
    with running(actor, mode="action", batch_window_ms=1.0) as (cfg, _):
        c = OpenpiClient(url(cfg))
        assert c.metadata["mode"] == "action"
        got = [c.infer(obs(3))["actions"] for _ in range(3)]
        for k, a in enumerate(got):
            assert a.shape == (1, 7)
            np.testing.assert_array_equal(a[0], expected_chunk(obs(3))[k])
        assert c.infer({"__ctrl__": "reset"}) == {"__ack__": "reset"}
        np.testing.assert_array_equal(c.infer(obs(3))["actions"][0], expected_chunk(obs(3))[0])
        status, err = DeployClient(url(cfg, "http")).act(
            {"full_image": obs(0)["observation/image"], "wrist_image": obs(0)["observation/wrist_image"],
             "state": obs(0)["observation/state"], "instruction": "x"})
        assert status == 400 and "session_id" in err
        c.close()


def test_failing_forward_answers_500_and_the_server_serves_the_next_request():
    actor = FakeActor()
    with running(actor, batch_window_ms=1.0) as (cfg, _):
        c = OpenpiClient(url(cfg))
        reply = c.infer(obs(1, first=BOOM))
        assert isinstance(reply, str) and reply.startswith("error 500") and "fake forward failed" in reply
        np.testing.assert_array_equal(c.infer(obs(2))["actions"], expected_chunk(obs(2)))
        metrics = requests.get(url(cfg, "http") + "/metrics").text
        assert 'vla_serve_batches_total{outcome="error"} 1.0' in metrics
        assert 'vla_serve_requests_total{outcome="error",protocol="websocket"} 1.0' in metrics
        c.close()


def test_session_limit_and_idle_expiry():
    actor = FakeActor()
    with running(actor, max_sessions=2, session_idle_s=1.0, batch_window_ms=1.0) as (cfg, _):
        a, b = OpenpiClient(url(cfg)), OpenpiClient(url(cfg))
        with pytest.raises(ConnectionClosed) as err:  # the third: closed with 1013 (try again later), no metadata
            OpenpiClient(url(cfg))
        assert err.value.rcvd.code == 1013 and "max_sessions" in err.value.rcvd.reason
        # a and b stay silent past session_idle_s: the server closes them (code 1000) and frees the slots
        for ws in (a, b):
            with pytest.raises(ConnectionClosed) as err:
                ws.recv()
            assert err.value.rcvd.code == 1000 and "idle" in err.value.rcvd.reason
        time.sleep(0.2)
        sid = requests.post(url(cfg, "http") + "/reset", json={}).json()["session_id"]
        time.sleep(3.0)  # idle REST session: reaped
        r = requests.post(url(cfg, "http") + "/reset", json={"session_id": sid})
        assert r.status_code == 404 and sid in r.json()["error"] and "session_idle_s" in r.json()["error"]
        assert len(set(actor.resets)) >= 2  # freed slots were reset


def test_graceful_shutdown_finishes_the_request_in_flight():
    actor = FakeActor(compute_s=1.5)
    with running(actor, batch_window_ms=1.0) as (cfg, server):
        c = OpenpiClient(url(cfg))
        reply = {}
        t = threading.Thread(target=lambda: reply.update(r=c.infer(obs(5))))
        t.start()
        deadline = time.monotonic() + 30
        while not actor.forwards and time.monotonic() < deadline:  # the forward has started
            time.sleep(0.01)
        server.should_exit = True  # what SIGINT / SIGTERM do
        t.join(30)
        np.testing.assert_array_equal(reply["r"]["actions"], expected_chunk(obs(5)))
        try:  # no longer serving: the port is closed (or 503 while draining)
            status = requests.get(url(cfg, "http") + "/healthz", timeout=5).status_code
        except requests.ConnectionError:
            status = None
        assert status in (None, 503)


@pytest.mark.parametrize("override,expected", [("serve.mode=chunks", "serve.mode must be one of chunk, action"),
                                               ("policy=remote", "policy.url")])
def test_cli_refuses_bad_settings_before_serving(override, expected):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vla_accel.serve.cli", override, "serve.port=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "vla-accel-serve: error: " in proc.stderr and expected in proc.stderr, proc.stderr
