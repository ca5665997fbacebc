"""vla-accel-serve end to end: a real server process on loopback (tiny random policy on CPU), spoken to by
minimal re-implementations of openpi's websocket client and OpenVLA-OFT's REST client (serve_clients.py).

Answers are checked against the same policy built in this process. A batched forward differs from the
unbatched one by float reassociation only (measured <= 3e-7 on these chunks), hence BATCH_TOL.
"""

from __future__ import annotations

import threading

import json_numpy
import numpy as np
import pytest
import requests
from omegaconf import OmegaConf
from serve_clients import REPO, DeployClient, OpenpiClient, load_test, openpi_obs, openpi_pack, policy_obs, server
from websockets.exceptions import ConnectionClosed

import vla_accel
from vla_accel.prune import make_actor

BATCH_TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32 batched vs unbatched GEMMs (reassociation), ~1e-7 measured
LIMIT_MB = 0.25

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", device="cpu", seed=0)  # = the server's policy=random_tiny on CPU


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """mode=chunk, no pruning, up to 16 per forward."""
    log = tmp_path_factory.mktemp("serve_plain") / "server.log"
    with server("serve.max_batch=16", "serve.batch_window_ms=20", f"serve.max_message_mb={LIMIT_MB}",
                log_path=log) as s:
        yield s


def chunk(policy, obs: dict) -> np.ndarray:
    o, text = policy_obs(obs)
    return policy.predict(o, text)


def deploy_obs(obs: dict) -> dict:
    o, text = policy_obs(obs)
    return {**o, "instruction": text}


# ---- the two protocols -------------------------------------------------------------------------------------
def test_openpi_websocket_protocol(plain, policy):
    c = OpenpiClient(plain.ws)
    meta = c.metadata
    assert meta["mode"] == "chunk" and meta["policy"]["random_weights"] is True and meta["session_id"]
    obs = openpi_obs(1, 1)
    reply = c.infer(obs)
    assert reply["actions"].shape == (8, 7) and reply["actions"].dtype == np.float64
    np.testing.assert_array_equal(reply["actions"], chunk(policy, obs))  # alone in its batch: bit-exact
    timing = reply["server_timing"]
    assert {"infer_ms", "queue_ms", "compute_ms", "prep_ms", "batch_size"} <= set(timing)
    assert timing["infer_ms"] >= timing["compute_ms"] > 0
    assert "prev_total_ms" in c.infer(obs)["server_timing"]  # openpi's field, from the second request on
    assert c.infer({"__ctrl__": "episode_start", "__task__": "t"}) == {"__ack__": "episode_start"}
    assert c.infer({"__ctrl__": "episode_end", "__success__": True}) == {"__ack__": "episode_end"}
    assert c.infer({"__ctrl__": "something"}) == {"__ack__": "ignored"}
    c.close()
    assert requests.get(plain.http + "/healthz").text == "OK\n"


def test_openvla_oft_rest_protocol(plain, policy):
    http = DeployClient(plain.http)
    obs = openpi_obs(2, 2)
    expected = chunk(policy, obs)
    status, actions = http.act(deploy_obs(obs))
    assert status == 200 and isinstance(actions, list) and len(actions) == 8
    np.testing.assert_array_equal(np.stack(actions), expected)
    status, actions = http.act(deploy_obs(obs), encoded=True)  # deploy.py's double-encoded form
    assert status == 200
    np.testing.assert_array_equal(np.stack(actions), expected)
    # deploy.py picks the wrist camera as the key containing "wrist"
    o = deploy_obs(obs)
    o["left_wrist_image"] = o.pop("wrist_image")
    status, actions = http.act(o)
    np.testing.assert_array_equal(np.stack(actions), expected)
    r = http.post("/act", b'{"full_image": 1}')
    assert "Server-Timing" not in r.headers and r.status_code == 400
    r = http.post("/act", json_numpy.dumps(deploy_obs(obs)))
    assert "compute;dur=" in r.headers["Server-Timing"]


def test_rest_sessions_reset_close_and_unknown(plain):
    http = DeployClient(plain.http)
    sid = requests.post(plain.http + "/reset", json={}).json()["session_id"]
    obs = deploy_obs(openpi_obs(3, 3))
    assert http.act(obs, session_id=sid)[0] == 200
    r = http.post("/act", json_numpy.dumps(obs), headers={"X-Session-Id": sid})
    assert r.status_code == 200
    assert requests.post(plain.http + "/reset", json={"session_id": sid}).json()["session_id"] == sid
    assert requests.post(plain.http + "/close", json={"session_id": sid}).status_code == 200
    status, err = http.act(obs, session_id=sid)
    assert status == 404 and sid in err
    status, err = http.act(obs, session_id="no-such-session")
    assert status == 404 and "'no-such-session'" in err and "POST /reset" in err


# ---- bad input never takes the server down -----------------------------------------------------------------
BAD_WS = [  # (name, raw message or changes to a good observation, what the error must say)
    ("not msgpack", b"\xc1\xff\x00", "not valid msgpack"),
    ("text frame", "hello", "binary msgpack"),
    ("not a map", openpi_pack([1, 2, 3]), "map of observation fields"),
    ("missing state", {"observation/state": None}, "missing key 'state' / 'observation/state'"),
    ("float image", {"observation/image": np.zeros((64, 64, 3), np.float32)},
     "'observation/image' must have dtype uint8"),
    ("gray image", {"observation/image": np.zeros((64, 64), np.uint8)},
     "'observation/image' must have shape [H, W, 3]"),
    ("huge side", {"observation/image": np.zeros((1100, 16, 3), np.uint8)}, "at most 1024 per side"),
    ("short state", {"observation/state": np.zeros(3, np.float32)}, "'observation/state' must be 8 numbers"),
    ("nan state", {"observation/state": np.full(8, np.nan, np.float32)}, "NaN"),
    ("empty prompt", {"prompt": "  "}, "'prompt' must be non-empty text"),
    ("two wrists", {"left_wrist": np.zeros((64, 64, 3), np.uint8), "observation/wrist_image": None,
                    "right_wrist": np.zeros((64, 64, 3), np.uint8)}, "wrist"),
    ("bad ndarray", openpi_pack({"observation/image": {b"__ndarray__": True, b"data": b"12", b"dtype": "<f4",
                                                       b"shape": [9, 9]}}), "malformed msgpack-numpy array"),
    ("object dtype", openpi_pack({"observation/image": {b"__ndarray__": True, b"data": b"", b"dtype": "|O",
                                                        b"shape": [0]}}), "dtype object is not accepted"),
]


@pytest.mark.parametrize("name,message,expected", BAD_WS, ids=[b[0] for b in BAD_WS])
def test_bad_websocket_message_gets_an_error_naming_the_field_and_the_connection_stays(plain, policy, name, message,
                                                                                       expected):
    c = OpenpiClient(plain.ws)
    if isinstance(message, dict):  # changes to a good observation; None drops the key
        obs = {k: v for k, v in {**openpi_obs(4, 4), **message}.items() if v is not None}
        message = openpi_pack(obs)
    c.send_raw(message)
    reply = c.recv()
    assert isinstance(reply, str) and reply.startswith("error 400") and expected in reply, reply
    good = openpi_obs(4, 4)
    np.testing.assert_array_equal(c.infer(good)["actions"], chunk(policy, good))  # same connection, still served
    c.close()


def test_bad_rest_requests(plain):
    http = DeployClient(plain.http)
    good = deploy_obs(openpi_obs(5, 5))
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"encoded": "{}", "x": 1}', 400, "'encoded' must be the only key"),
        (json_numpy.dumps({k: v for k, v in good.items() if k != "instruction"}), 400,
         "'instruction' / 'prompt'"),
        (json_numpy.dumps({**good, "state": np.zeros((2, 4))}), 400, "'state' must be 8 numbers"),
        (json_numpy.dumps({**good, "full_image": good["full_image"].astype(np.int16)}), 400,
         "'full_image' must have dtype uint8"),
    ]
    for body, status, expected in cases:
        r = http.post("/act", body)
        assert r.status_code == status and expected in r.json()["error"], (body[:60], r.text)
    big = {**good, "full_image": np.zeros((400, 400, 3), np.uint8)}  # ~0.6 MB of JSON > serve.max_message_mb
    r = http.post("/act", json_numpy.dumps(big))
    assert r.status_code == 413 and "serve.max_message_mb" in r.json()["error"]
    assert requests.get(plain.http + "/act").status_code == 405
    assert http.act(good)[0] == 200


def test_oversized_message_and_vanishing_client_leave_the_others_served(plain, policy):
    other = OpenpiClient(plain.ws)
    big = OpenpiClient(plain.ws)
    big.send_raw(openpi_pack({**openpi_obs(6, 6), "observation/image": np.zeros((400, 400, 3), np.uint8)}))
    with pytest.raises(ConnectionClosed) as err:
        big.recv()
    assert err.value.rcvd.code == 1009  # message too big: the websocket limit is serve.max_message_mb
    gone = OpenpiClient(plain.ws)
    gone.send_raw(openpi_pack(openpi_obs(6, 6)))
    gone.close()  # disconnects while its request is being served
    obs = openpi_obs(7, 7)
    np.testing.assert_allclose(other.infer(obs)["actions"], chunk(policy, obs), **BATCH_TOL)  # may share a forward
    other.close()
    metrics = requests.get(plain.http + "/metrics").text
    assert "vla_serve_batch_size_bucket" in metrics and 'outcome="bad_request"' in metrics
    assert plain.alive()


# ---- batching and the load test ----------------------------------------------------------------------------
def load_obs(c: int, i: int):
    key = (c, i)
    return key, openpi_obs(c % 3, 100 * c + i)  # distinct state per (client, request): distinct answers


@pytest.mark.parametrize("clients", [1, 4, 16])
def test_load_no_dropped_or_mixed_up_answers(plain, policy, clients):
    per = 3
    expected = {k: chunk(policy, o) for k, o in (load_obs(c, i) for c in range(clients) for i in range(per))}
    keys = list(expected)
    if len(keys) > 1:  # the check can tell answers apart: any two differ by far more than BATCH_TOL
        assert min(np.abs(expected[a] - expected[b]).max() for a in keys for b in keys if a != b) > 1e-4
    before = requests.get(plain.http + "/info").json()["batches"]
    res = load_test(plain.ws, clients, per, expected, load_obs)
    assert res["errors"] == [] and res["dropped"] == 0 and res["mismatched"] == 0
    assert res["answered"] == clients * per
    batches = requests.get(plain.http + "/info").json()["batches"] - before
    if clients > 1:
        assert batches < clients * per  # some requests shared a forward
    lat = np.asarray(res["latency_ms"])
    print(f"\nload: {clients} clients x {per}: p50 {np.percentile(lat, 50):.0f} ms, "
          f"p99 {np.percentile(lat, 99):.0f} ms, {batches} forwards")


# ---- sessions keep their own pruning history ---------------------------------------------------------------
def episode(seed: int, steps: int) -> list[dict]:
    """Frames that change a little per step (one moving 16 px block), as a camera stream does."""
    base = openpi_obs(seed, seed)
    frames = []
    for t in range(steps):
        o = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
        o["observation/image"][8 * t:8 * t + 16, 8:24] = 255
        o["observation/state"] = o["observation/state"] + 0.01 * t
        frames.append(o)
    return frames


def test_sessions_keep_separate_pruning_histories(tmp_path, policy):
    steps = 4
    eps = {"a": episode(11, steps), "b": episode(12, steps)}
    prune_cfg = OmegaConf.load(REPO / "configs" / "prune" / "specprune.yaml")
    ref = make_actor(policy, prune_cfg)
    expected = {}
    for stream, name in enumerate(eps):
        expected[name] = [ref.chunk_batch(*[[x] for x in policy_obs(o)], [stream]) for o in eps[name]]
    fresh = make_actor(policy, prune_cfg).chunk_batch(*[[x] for x in policy_obs(eps["a"][-1])], [0])
    # the history matters: the last frame on a fresh stream keeps other tokens than after the episode
    assert fresh[1][0]["kept_per_layer"] != expected["a"][-1][1][0]["kept_per_layer"]

    with server("prune=specprune", "serve.max_batch=2", "serve.batch_window_ms=500", log_path=tmp_path / "s.log") as s:
        clients = {name: OpenpiClient(s.ws) for name in eps}
        got = {name: [] for name in eps}
        for t in range(steps):  # both clients at once, every step: they share forwards
            threads = [threading.Thread(target=lambda n=n: got[n].append(clients[n].infer(eps[n][t]))) for n in eps]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
        for name in eps:
            for t, reply in enumerate(got[name]):
                chunks, infos = expected[name][t]
                assert reply["info"]["kept_per_layer"] == infos[0]["kept_per_layer"], (name, t)
                np.testing.assert_allclose(reply["actions"], chunks[0], **BATCH_TOL)
        assert any(r["server_timing"]["batch_size"] == 2 for r in got["a"])
        for c in clients.values():
            c.close()


# ---- the eval's remote actor -------------------------------------------------------------------------------
def test_remote_actor_equals_the_local_actor(plain, policy):
    from vla_accel.policy import ChunkedActor
    from vla_accel.serve.remote import RemoteActor

    remote, local = RemoteActor(plain.ws), ChunkedActor(policy)
    assert remote.mode == "chunk" and remote.describe()["remote_url"] == plain.ws
    frames = episode(21, 10)
    for actor in (remote, local):
        actor.reset([0])
    for t, o in enumerate(frames):  # one stream: every forward alone, so bit-exact
        obs, text = policy_obs(o)
        a_remote, i_remote = remote.act_batch([obs], [text], [0])
        a_local, i_local = local.act_batch([obs], [text], [0])
        np.testing.assert_array_equal(a_remote, a_local)
        assert i_remote[0]["queried"] == i_local[0]["queried"] == (t % 8 == 0)
    remote.reset([0])  # a new episode: the next step queries again
    obs, text = policy_obs(frames[0])
    assert remote.act_batch([obs], [text], [0])[1][0]["queried"]
    remote.close()
