"""Executors of the OFT forward: `reference` (the plain PyTorch model) and `accel` (AccelRunner).

    from vla_accel.runtime import make_executor
    fast = make_executor(policy, {"name": "accel"})     # or an omegaconf node of configs/runtime/<name>.yaml
    fast.predict(obs, instruction)                      # through the runner; `policy` itself is unchanged

`accel` builds an AccelRunner from `policy.model` and returns `policy.with_executor(runner)`; `reference` returns
the policy as it is. Without CUDA, `accel` runs in a clearly labelled CPU mode (`runtime.on_cpu`: emulate = graphs
replaced by recorded eager calls over the same static buffers, for tests; eager; or error) --
`policy.describe()["executor"]` ("accel-emulate-cpu", ...) and `["runtime"]` say which.
"""

from __future__ import annotations

from typing import Any

from .config import RuntimeConfig, RuntimeConfigError
from .graphs import GraphCache, GraphCaptureError
from .runner import AccelRunner, segments


def make_executor(policy, runtime_cfg: Any = None):
    """The policy with the executor named by `runtime_cfg` (dict / omegaconf node / RuntimeConfig)."""
    cfg = runtime_cfg if isinstance(runtime_cfg, RuntimeConfig) else RuntimeConfig.from_dict(runtime_cfg or {})
    if cfg.name == "reference":
        return policy
    return policy.with_executor(AccelRunner(policy.model, cfg))


__all__ = ["make_executor", "AccelRunner", "RuntimeConfig", "RuntimeConfigError", "GraphCache", "GraphCaptureError",
           "segments"]
