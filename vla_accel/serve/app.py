"""The ASGI app (Starlette on uvicorn): both wire protocols over one engine, health, metrics, graceful stop.

    websocket, any path (openpi)  on connect: msgpack metadata {server, mode, session_id, policy, ...};
                                  then per message: observation -> {"actions": [n, 7], "server_timing": {...},
                                  "info": {...}}; {"__ctrl__": "reset" | "episode_start"} -> new episode,
                                  {"__ctrl__": "episode_end"} -> ack; an error comes back as a TEXT frame
                                  ("error: ..."), the connection stays open. One connection = one session.
    POST /act (OpenVLA-OFT)       json-numpy observation (or {"encoded": "<json-numpy text>"}) -> the json-numpy
                                  list of 7-vectors (a JSON string of it for "encoded"); timings in the
                                  Server-Timing header. Session: "session_id" field or X-Session-Id header; none:
                                  a one-shot fresh stream (deploy.py's behaviour; mode=chunk only).
    POST /reset                   {"session_id": id} resets that session; {} opens one -> {"session_id": id}
    POST /close                   {"session_id": id} ends a session and frees its state
    GET /healthz, /metrics, /info liveness ("OK"), Prometheus text, the metadata as JSON
Errors: 400 bad input (the message names the field), 404 unknown session, 413 too large, 503 busy / stopping,
500 the forward failed. None of them stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from .codec import BadRequest, dumps_json, loads_json, observation, packb, unpackb
from .config import ServeConfig
from .engine import Busy, Engine, SessionError, plain_values
from .metrics import Metrics

log = logging.getLogger("vla_accel.serve")

POLICY_INPUT_ERRORS = (ValueError, TypeError, KeyError)  # what the policy's own pre-processing raises for bad input


class TooLarge(ValueError):
    pass


def classify(err: BaseException, prepared: bool) -> tuple[int, str, str]:
    """-> (HTTP status, metrics outcome, message). `prepared`: the error came from after pre-processing."""
    if isinstance(err, BadRequest):
        return 400, "bad_request", str(err)
    if isinstance(err, TooLarge):
        return 413, "too_large", str(err)
    if isinstance(err, SessionError):
        return 404, "not_found", str(err.args[0] if err.args else err)
    if isinstance(err, Busy):
        return 503, "busy", str(err)
    if isinstance(err, POLICY_INPUT_ERRORS) and not prepared:
        return 400, "bad_request", f"the policy refused the observation: {err}"
    return 500, "error", f"{type(err).__name__}: {err}"


def metadata(engine: Engine, cfg: ServeConfig, identity: dict | None = None) -> dict:
    """What a client learns on connect (and from GET /info); `identity`: what of the policy decides
    results (the eval's policy identity with pruning and runtime), which a remote eval fingerprints."""
    desc = engine.served.describe()
    try:  # the eval's name for the device (GPU model, or CPU model and cores); it imports the simulator stack
        from vla_accel.eval.factory import device_name
    except ImportError:
        device_name = str
    return {"server": "vla-accel-serve", "mode": cfg.mode, "action_dim": 7, "chunk_size": 8,
            "max_batch": cfg.max_batch, "batch_window_ms": cfg.batch_window_ms, "policy": desc,
            "device_name": device_name(str(desc.get("device", "cpu"))),
            **({"identity": plain_values(identity)} if identity is not None else {})}  # string keys: msgpack clients


def server_timing_header(timing: dict) -> str:
    return ", ".join(f"{k.removesuffix('_ms')};dur={timing[k]:.3f}" for k in
                     ("prep_ms", "queue_ms", "compute_ms", "infer_ms")) + f", batch;desc={timing['batch_size']}"


def build_app(engine: Engine, cfg: ServeConfig, metrics: Metrics, identity: dict | None = None):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    meta = metadata(engine, cfg, identity)

    def error_response(err: BaseException, prepared: bool = False) -> Response:
        status, outcome, msg = classify(err, prepared)
        metrics.request("rest", outcome)
        if status == 500:
            log.error("request failed: %s", msg)
        return JSONResponse({"error": msg}, status_code=status)

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"the body has {int(declared)} bytes; at most {limit} (serve.max_message_mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body exceeds {limit} bytes (serve.max_message_mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def session_payload(request: Request) -> dict:
        body = await read_body(request)
        if not body.strip():
            return {}
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise BadRequest(f"the body is not JSON ({err})") from None
        if not isinstance(payload, dict):
            raise BadRequest("the body must be a JSON object, e.g. {\"session_id\": \"...\"}")
        sid = payload.get("session_id", request.headers.get("x-session-id"))
        if sid is not None and not isinstance(sid, str):
            raise BadRequest(f"'session_id' must be text, got {type(sid).__name__}")
        return {"session_id": sid}

    async def act(request: Request) -> Response:
        prepared = False
        try:
            async with engine.track():
                payload, double = loads_json(await read_body(request))
                if not isinstance(payload, dict):
                    raise BadRequest(f"the body must be a JSON object of observation fields, got "
                                     f"{type(payload).__name__}")
                sid = payload.pop("session_id", None) or request.headers.get("x-session-id")
                if sid is not None and not isinstance(sid, str):
                    raise BadRequest(f"'session_id' must be text, got {type(sid).__name__}")
                obs, text = observation(payload, max_image_side=cfg.max_image_side)
                if sid is None and cfg.mode == "action":
                    raise BadRequest("this server runs serve.mode=action: send 'session_id' (POST /reset opens a "
                                     "session) so that it can keep your action queue")
                session = engine.get_session(sid) if sid is not None else engine.open_session("rest-oneshot")
                try:
                    result = await engine.submit(session, obs, text)
                    prepared = True
                finally:
                    if sid is None:
                        await engine.close_session(session)
                metrics.request("rest", "ok", result["timing"])
                body = dumps_json(list(result["actions"]), double)
                return Response(body, media_type="application/json",
                                headers={"Server-Timing": server_timing_header(result["timing"])})
        except Exception as err:  # noqa: BLE001 - every failure becomes a response; the server stays up
            return error_response(err, prepared)

    async def reset(request: Request) -> Response:
        try:
            async with engine.track():
                sid = (await session_payload(request))["session_id"]
                session = engine.get_session(sid) if sid is not None else engine.open_session("rest")
                await engine.reset(session)
                metrics.request("rest", "ok")
                return JSONResponse({"session_id": session.id, "mode": cfg.mode})
        except Exception as err:  # noqa: BLE001
            return error_response(err)

    async def close(request: Request) -> Response:
        try:
            async with engine.track():
                sid = (await session_payload(request))["session_id"]
                if sid is None:
                    raise BadRequest("missing key 'session_id': the session to close")
                await engine.close_session(engine.get_session(sid))
                metrics.request("rest", "ok")
                return JSONResponse({"closed": sid})
        except Exception as err:  # noqa: BLE001
            return error_response(err)

    async def healthz(request: Request) -> Response:
        if engine.draining:
            return PlainTextResponse("shutting down\n", status_code=503)
        return PlainTextResponse("OK\n")

    async def metrics_page(request: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, headers={"Content-Type": ctype})

    async def info(request: Request) -> Response:
        return JSONResponse({**meta, "sessions": len(engine.sessions), "batches": engine.batches})

    async def ws_send_error(ws: WebSocket, err: BaseException, prepared: bool = False) -> None:
        status, outcome, msg = classify(err, prepared)
        metrics.request("websocket", outcome)
        if status == 500:
            log.error("websocket request failed: %s", msg)
        await ws.send_text(f"error {status}: {msg}")

    async def websocket(ws: WebSocket) -> None:
        try:
            session = engine.open_session("websocket")
        except Busy as err:
            await ws.accept()
            await ws.close(code=1013, reason=str(err)[:120])
            metrics.request("websocket", "busy")
            return
        try:
            await ws.accept()
            await ws.send_bytes(packb({**meta, "session_id": session.id}))
            prev_total_ms = None
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), cfg.session_idle_s)
                except asyncio.TimeoutError:
                    await ws.close(code=1000, reason=f"idle for {cfg.session_idle_s:g} s (serve.session_idle_s)")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                t0 = time.perf_counter()
                reply = await ws_request(ws, session, message, prev_total_ms)
                if reply is None:
                    return
                if reply:
                    prev_total_ms = (time.perf_counter() - t0) * 1e3
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away mid-request
            return
        finally:
            await engine.close_session(session)

    async def ws_request(ws: WebSocket, session, message: dict, prev_total_ms: float | None):
        """One message -> True (answered an observation), False (error or control message), None (stop)."""
        prepared = False
        try:
            async with engine.track():
                data = message.get("bytes")
                if data is None:
                    raise BadRequest("send binary msgpack messages (openpi msgpack-numpy), not text")
                payload = unpackb(data)
                if isinstance(payload, dict) and "__ctrl__" in payload:
                    ctrl = payload["__ctrl__"]
                    if ctrl in ("reset", "episode_start"):
                        await engine.reset(session)
                    await ws.send_bytes(packb({"__ack__": ctrl if ctrl in ("reset", "episode_start", "episode_end")
                                               else "ignored"}))
                    return False
                obs, text = observation(payload, max_image_side=cfg.max_image_side)
                result = await engine.submit(session, obs, text)
                prepared = True
                timing = dict(result["timing"])
                if prev_total_ms is not None:  # openpi's field: the previous request's time in the server
                    timing["prev_total_ms"] = prev_total_ms
                await ws.send_bytes(packb({"actions": result["actions"], "server_timing": timing,
                                           "info": result["info"]}))
                metrics.request("websocket", "ok", timing)
                return True
        except Busy as err:
            await ws_send_error(ws, err)
            await ws.close(code=1012, reason="server shutting down")
            return None
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as err:  # noqa: BLE001 - reported to this client; the server keeps serving
            await ws_send_error(ws, err, prepared)
            return False

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    routes = [Route("/healthz", healthz), Route("/metrics", metrics_page), Route("/info", info)]
    if cfg.protocol in ("both", "rest"):
        routes += [Route("/act", act, methods=["POST"]), Route("/reset", reset, methods=["POST"]),
                   Route("/close", close, methods=["POST"])]
    if cfg.protocol in ("both", "websocket"):
        routes.append(WebSocketRoute("/{path:path}", websocket))
    return Starlette(routes=routes, lifespan=lifespan)


def serve(actor, cfg: ServeConfig, *, on_ready=None, identity: dict | None = None) -> None:
    """Runs the server until SIGINT / SIGTERM; then finishes the requests in flight (serve.shutdown_timeout_s)."""
    import uvicorn

    metrics = Metrics()
    engine = Engine(actor, cfg, metrics)
    app = build_app(engine, cfg, metrics, identity)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_ready is not None and not self.should_exit:
                on_ready(self)

        async def shutdown(self, sockets=None):
            for s in self.servers:  # stop accepting, then let the requests in flight finish before the
                s.close()           # connections are closed
            if not await engine.drain(cfg.shutdown_timeout_s):
                log.warning("%d request(s) still in flight after %g s (serve.shutdown_timeout_s); closing",
                            engine.inflight, cfg.shutdown_timeout_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, ws_max_size=cfg.max_message_bytes,
                            log_level="info", timeout_graceful_shutdown=max(1, int(cfg.shutdown_timeout_s)),
                            lifespan="on")
    Server(config).run()
