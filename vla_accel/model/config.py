"""Configuration of the OpenVLA-OFT model: vision towers, Llama backbone, heads.

`OFTConfig.from_hf_config(d)` reads the official Prismatic `config.json` (as a dict). The official
file names the vision towers only by timm id, so the sizes of the two published towers are a table
here (`KNOWN_TOWERS`). For any other size, one explicit key in `config.json` gives them:

    "vla_accel_vision_towers": [
        {"width": 32, "depth": 3, "heads": 2, "mlp_ratio": 4.0},        # tower 0 (DINOv2-style)
        {"width": 48, "depth": 3, "heads": 2, "mlp_ratio": 3.7362}      # tower 1 (SigLIP-style)
    ]

one entry per entry of `timm_model_ids`, in the same order. The MLP width follows timm's rule
`int(width * mlp_ratio)`. Everything else about a tower (registers, LayerScale, class token) comes
from its family, recognised from the timm id ("dinov2" / "siglip").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

TOWER_SIZES_KEY = "vla_accel_vision_towers"


@dataclass(frozen=True)
class ViTConfig:
    family: str  # "dinov2" (class token + registers + LayerScale) or "siglip" (no prefix tokens)
    width: int  # embedding dim
    depth: int  # number of blocks in the checkpoint (the feature is taken after block depth-2)
    heads: int
    mlp_ratio: float  # MLP width = int(width * mlp_ratio), timm's rule
    patch: int = 14
    image_size: int = 224
    ln_eps: float = 1e-6
    timm_id: str = ""

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def num_registers(self) -> int:
        return 4 if self.family == "dinov2" else 0

    @property
    def class_token(self) -> bool:
        return self.family == "dinov2"

    @property
    def layer_scale(self) -> bool:
        return self.family == "dinov2"

    @property
    def feature_depth(self) -> int:
        # Prismatic takes the output of the second-to-last block: blocks 0 .. depth-2 run.
        return self.depth - 1


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab: int = 32064
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    pad_id: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class OFTConfig:
    towers: tuple[ViTConfig, ...]
    llm: LlamaConfig
    num_images: int = 2  # third-person + wrist
    action_dim: int = 7
    chunk: int = 8  # actions per forward pass
    proprio_dim: int = 8
    image_size: int = 224
    # Token ids of the Llama-2 tokenizer used by the action prompt.
    bos_id: int = 1
    stop_id: int = 2  # "</s>", appended after the placeholders
    empty_id: int = 29871  # "▁", appended to the prompt if it does not already end with it
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def vision_dim(self) -> int:
        return sum(t.width for t in self.towers)

    @property
    def patches_per_image(self) -> int:
        return self.towers[0].num_patches

    @property
    def num_patch_tokens(self) -> int:
        # 512 patch tokens + 1 proprio token ("NUM_PATCHES" in the reference code)
        return self.patches_per_image * self.num_images + 1

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_hf_config(d: dict[str, Any]) -> "OFTConfig":
        if "text_config" not in d:
            raise ValueError("config.json has no 'text_config' (expected an OpenVLA/Prismatic config)")
        tc = d["text_config"]
        llm = LlamaConfig(
            hidden=int(tc.get("hidden_size", 4096)),
            layers=int(tc.get("num_hidden_layers", 32)),
            heads=int(tc.get("num_attention_heads", 32)),
            kv_heads=int(tc.get("num_key_value_heads", tc.get("num_attention_heads", 32))),
            intermediate=int(tc.get("intermediate_size", 11008)),
            vocab=int(tc.get("vocab_size", 32064)),
            rms_eps=float(tc.get("rms_norm_eps", 1e-6)),
            rope_theta=float(tc.get("rope_theta", 10000.0)),
            max_positions=int(tc.get("max_position_embeddings", 2048)),
            pad_id=int(d.get("pad_token_id", tc.get("pad_token_id", 32000)) or 32000),
        )
        if llm.kv_heads != llm.heads:
            raise ValueError(f"grouped-query attention is not supported (heads={llm.heads}, kv_heads={llm.kv_heads})")
        ids = list(d.get("timm_model_ids") or [])
        if not ids:
            raise ValueError("config.json has no 'timm_model_ids' (expected the two fused vision towers)")
        sizes = d.get(TOWER_SIZES_KEY)
        if sizes is not None and len(sizes) != len(ids):
            raise ValueError(f"'{TOWER_SIZES_KEY}' has {len(sizes)} entries but 'timm_model_ids' has {len(ids)}")
        image_sizes = list(d.get("image_sizes") or [224] * len(ids))
        towers = []
        for i, tid in enumerate(ids):
            family = _family(tid)
            if sizes is not None:
                s = sizes[i]
                missing = [k for k in ("width", "depth", "heads") if k not in s]
                if missing:
                    raise ValueError(f"'{TOWER_SIZES_KEY}[{i}]' lacks {missing}; expected width, depth, heads, mlp_ratio")
                t = ViTConfig(family, int(s["width"]), int(s["depth"]), int(s["heads"]),
                              float(s.get("mlp_ratio", 4.0)), timm_id=tid)
            elif tid in KNOWN_TOWERS:
                t = replace(KNOWN_TOWERS[tid], timm_id=tid)
            else:
                raise ValueError(
                    f"unknown vision tower '{tid}': give its sizes with the config key '{TOWER_SIZES_KEY}' "
                    f"(known ids: {sorted(KNOWN_TOWERS)})")
            towers.append(replace(t, image_size=int(image_sizes[i])))
        if len({t.num_patches for t in towers}) != 1:
            raise ValueError("all vision towers must produce the same number of patches")
        return OFTConfig(towers=tuple(towers), llm=llm, image_size=towers[0].image_size, hf_config=dict(d))

    def to_hf_config(self) -> dict[str, Any]:
        """A Prismatic-style config.json for this model (what tests write into checkpoints)."""
        d = {
            "model_type": "openvla",
            "architectures": ["OpenVLAForActionPrediction"],
            "vision_backbone_id": "dinosiglip-vit-so-224px",
            "llm_backbone_id": "llama2-7b-pure",
            "arch_specifier": "no-align+fused-gelu-mlp",
            "use_fused_vision_backbone": True,
            "image_resize_strategy": "resize-naive",
            "timm_model_ids": [t.timm_id for t in self.towers],
            "timm_override_act_layers": [None] * len(self.towers),
            "image_sizes": [t.image_size for t in self.towers],
            "pad_token_id": self.llm.pad_id,
            "pad_to_multiple_of": 64,
            "text_config": {
                "model_type": "llama",
                "hidden_size": self.llm.hidden,
                "num_hidden_layers": self.llm.layers,
                "num_attention_heads": self.llm.heads,
                "num_key_value_heads": self.llm.kv_heads,
                "intermediate_size": self.llm.intermediate,
                "vocab_size": self.llm.vocab,
                "rms_norm_eps": self.llm.rms_eps,
                "rope_theta": self.llm.rope_theta,
                "max_position_embeddings": self.llm.max_positions,
                "pad_token_id": self.llm.pad_id,
            },
        }
        known = all(t.timm_id in KNOWN_TOWERS and replace(KNOWN_TOWERS[t.timm_id], timm_id=t.timm_id,
                                                         image_size=t.image_size) == t for t in self.towers)
        if not known:
            d[TOWER_SIZES_KEY] = [
                {"width": t.width, "depth": t.depth, "heads": t.heads, "mlp_ratio": t.mlp_ratio} for t in self.towers
            ]
        return d


def _family(timm_id: str) -> str:
    if "dinov2" in timm_id:
        return "dinov2"
    if "siglip" in timm_id:
        return "siglip"
    raise ValueError(f"vision tower '{timm_id}': only DINOv2 and SigLIP towers are supported")


DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"

# The two published towers (timm's definitions): width, depth, heads, mlp_ratio.
KNOWN_TOWERS: dict[str, ViTConfig] = {
    DINO_ID: ViTConfig("dinov2", 1024, 24, 16, 4.0, timm_id=DINO_ID),
    SIGLIP_ID: ViTConfig("siglip", 1152, 27, 16, 3.7362, timm_id=SIGLIP_ID),  # MLP 4304
}


def oft_7b() -> OFTConfig:
    """The published OpenVLA-OFT LIBERO model: DINOv2-L + SigLIP-so400m + Llama-2-7B."""
    return OFTConfig(towers=(KNOWN_TOWERS[DINO_ID], KNOWN_TOWERS[SIGLIP_ID]), llm=LlamaConfig())


def oft_tiny() -> OFTConfig:
    """Same architecture, tiny widths: for tests and the no-download demo run.

    Keeps everything that shapes the token layout (224 px images, 14 px patches -> 2 x 256 patches,
    vocab 32064 so the real token ids 1 / 2 / 29871 / 32000 are valid) and shrinks only widths/depths.
    """
    towers = (
        ViTConfig("dinov2", 32, 3, 2, 4.0, timm_id=DINO_ID),
        ViTConfig("siglip", 48, 3, 2, 3.7362, timm_id=SIGLIP_ID),
    )
    llm = LlamaConfig(hidden=64, layers=8, heads=4, kv_heads=4, intermediate=172, vocab=32064)
    return OFTConfig(towers=towers, llm=llm)


PRESETS = {"7b": oft_7b, "tiny": oft_tiny}


def preset(name: str) -> OFTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]()
