"""Typed settings of `vla-accel-serve`; `configs/serve/default.yaml` fills them (every field is commented there
too). Validated at construction: a bad value fails naming the setting and what is allowed.

    cfg = ServeConfig.from_dict({"port": 8777, "mode": "action"})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vla_accel._config import build_dataclass

PROTOCOLS = ("both", "websocket", "rest")
MODES = ("chunk", "action")


class ServeConfigError(ValueError):
    """A serve setting has a value that is not allowed; the message names it and what is allowed."""


@dataclass
class ServeConfig:
    host: str = "0.0.0.0"               # address to bind (0.0.0.0: every interface; 127.0.0.1: this machine only)
    port: int = 8777                    # TCP port (8777: OpenVLA-OFT's deploy.py; openpi clients take any port)
    protocol: str = "both"              # both | websocket (openpi msgpack-numpy, any path but the HTTP routes) | rest (POST /act)
    mode: str = "chunk"                 # chunk: each request gets the whole [8, 7] chunk (client runs it open loop) | action: one action per request, the server keeps each session's queue
    batch_window_ms: float = 5.0        # after the first waiting request, wait this long for more before the batched forward
    max_batch: int = 8                  # at most this many requests (one per session) in one forward
    max_message_mb: float = 8.0         # largest request body / websocket message; larger: HTTP 413 / websocket close 1009
    max_image_side: int = 1024          # images larger than this on either side are refused (400 naming the field)
    max_sessions: int = 64              # open sessions at once (websocket connections + REST sessions); beyond: 503 / close 1013
    session_idle_s: float = 600.0       # a session without a request for this long is closed and its state freed
    prep_threads: int = 4               # threads that decode and pre-process requests (JPEG + resize) while the forward runs
    shutdown_timeout_s: float = 30.0    # on SIGINT / SIGTERM: wait this long for in-flight requests, then close

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ServeConfigError(f"serve.protocol must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if self.mode not in MODES:
            raise ServeConfigError(f"serve.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ServeConfigError(f"serve.host must be a host name or address; got {self.host!r}")
        for name, low in (("port", 0), ("max_batch", 1), ("max_image_side", 16), ("max_sessions", 1),
                          ("prep_threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ServeConfigError(f"serve.{name} must be an integer >= {low}; got {value!r}")
        if self.port > 65535:
            raise ServeConfigError(f"serve.port must be <= 65535; got {self.port}")
        for name, low in (("batch_window_ms", 0.0), ("max_message_mb", 0.001), ("session_idle_s", 0.001),
                          ("shutdown_timeout_s", 0.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                raise ServeConfigError(f"serve.{name} must be a number >= {low}; got {value!r}")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @classmethod
    def from_dict(cls, values: Any) -> "ServeConfig":
        return build_dataclass(cls, "serve", values, ServeConfigError)
