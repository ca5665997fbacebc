"""vla_accel: OpenVLA-OFT, faithful and fast.

    import vla_accel
    policy = vla_accel.load_policy("moojink/openvla-7b-oft-finetuned-libero-spatial", unnorm_key="libero_spatial")
    actions = policy.predict(obs, "put the bowl on the plate")   # np.ndarray [8, 7], env-ready
"""

from .checkpoint import CheckpointError, load_policy, random_policy, save_checkpoint, wrap
from .model.config import OFTConfig, oft_7b, oft_tiny
from .model.oft import OpenVLAOFT
from .policy import ChunkedActor, Policy

__version__ = "0.1.0"
__all__ = ["load_policy", "wrap", "random_policy", "save_checkpoint", "CheckpointError", "Policy", "ChunkedActor",
           "OpenVLAOFT", "OFTConfig", "oft_7b", "oft_tiny"]
