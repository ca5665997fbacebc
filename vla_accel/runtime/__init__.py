"""Executors of the OFT forward: `reference` (the plain PyTorch model) and `accel` (AccelRunner).

    from vla_accel.runtime import make_executor
    policy = make_executor(policy, {"name": "accel"})     # or an omegaconf node of configs/runtime/<name>.yaml
    policy.predict(obs, instruction)                      # now through the runner (policy.executor)

`accel` builds an AccelRunner from `policy.model` and installs it as `policy.executor` (executor_name
"accel"); `reference` leaves the policy as it is. Without CUDA, `accel` runs in a clearly labelled CPU mode
(`runtime.on_cpu`: emulate = graphs replaced by recorded eager calls over the same static buffers, for tests;
eager; or error) -- `policy.executor.mode` and `policy.describe()["runtime"]` say which.
"""

from __future__ import annotations

from typing import Any

from .config import RuntimeConfig, RuntimeConfigError
from .graphs import GraphCache, GraphCaptureError
from .runner import AccelRunner, hook_segments


def make_executor(policy, runtime_cfg: Any = None):
    """Installs the executor named by `runtime_cfg` (dict / omegaconf node / RuntimeConfig) on `policy`."""
    cfg = runtime_cfg if isinstance(runtime_cfg, RuntimeConfig) else RuntimeConfig.from_dict(runtime_cfg or {})
    if cfg.name == "reference":
        return policy
    runner = AccelRunner(policy.model, cfg)
    policy.executor = runner
    policy.executor_name = "accel" if runner.mode == "cuda" else f"accel-{runner.mode}-cpu"
    describe = policy.describe

    def describe_with_runtime():  # the policy's own description + what the runner resolved
        d = describe()
        d["runtime"] = {k: v for k, v in runner.describe().items() if k != "graphs"}
        return d

    policy.describe = describe_with_runtime
    return policy


__all__ = ["make_executor", "AccelRunner", "RuntimeConfig", "RuntimeConfigError", "GraphCache", "GraphCaptureError",
           "hook_segments"]
