"""`vla-accel-serve`: the policy behind the protocols robot clients already speak, with dynamic batching.

    from vla_accel.serve import ServeConfig, serve
    serve(actor, ServeConfig(port=8777, mode="chunk"))     # blocks; Ctrl-C finishes the requests in flight

Parts: config.py (settings), codec.py (openpi msgpack-numpy, deploy.py json-numpy, the observation),
engine.py (sessions = actor streams, dynamic batching, the model thread), app.py (Starlette routes, uvicorn,
graceful stop), metrics.py (Prometheus), remote.py (the eval's client-side actor), cli.py (Hydra entry point).
Protocols and examples: docs/serving.md.
"""

from .config import ServeConfig, ServeConfigError


def serve(actor, cfg: ServeConfig, **kwargs) -> None:
    """Runs the server for `actor` until SIGINT / SIGTERM (see app.serve)."""
    from .app import serve as _serve

    _serve(actor, cfg, **kwargs)


__all__ = ["ServeConfig", "ServeConfigError", "serve"]
