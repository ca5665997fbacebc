"""vla_accel: OpenVLA-OFT, faithful and fast.

    import vla_accel
    policy = vla_accel.load_policy("moojink/openvla-7b-oft-finetuned-libero-spatial", unnorm_key="libero_spatial")
    actions = policy.predict(obs, "put the bowl on the plate")   # np.ndarray [8, 7], env-ready

The names below load on first use (PEP 562), so processes that need only a part of the package
(simulator workers: vla_accel.envs, vla_accel.eval.workers) do not import torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_policy": "checkpoint", "wrap": "checkpoint", "random_policy": "checkpoint",
    "save_checkpoint": "checkpoint", "CheckpointError": "checkpoint",
    "Policy": "policy", "ChunkedActor": "policy",
    "OpenVLAOFT": "model.oft", "OFTConfig": "model.config", "oft_7b": "model.config", "oft_tiny": "model.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vla_accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
