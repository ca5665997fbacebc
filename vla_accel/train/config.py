"""Typed settings of `vla-accel-train`, built from the Hydra config (configs/train/*.yaml) and validated.

Every field is commented here and in the YAML files; unknown fields fail with the list of known ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from vla_accel._config import build_dataclass, to_plain
from vla_accel.model.config import DINO_ID, SIGLIP_ID, LlamaConfig, OFTConfig, ViTConfig


class TrainConfigError(ValueError):
    """A training setting has a value that is not allowed; the message names it and what is allowed."""


def _positive(name: str, value, kind=int, allow_zero: bool = False) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else isinstance(value, (int, float))
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise TrainConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                               f"{'integer' if kind is int else 'number'}, got {value!r}")


@dataclass
class TowerSize:
    width: int  # embedding dim
    depth: int  # blocks in the checkpoint (the feature is taken after block depth-2, so depth-1 run)
    heads: int
    mlp_ratio: float = 4.0  # MLP width = int(width * mlp_ratio) (timm's rule)


@dataclass
class ModelSize:
    """A small configuration of the OpenVLA-OFT architecture (both towers, projector, Llama, heads)."""

    dino: dict = field(default_factory=lambda: {"width": 32, "depth": 3, "heads": 2, "mlp_ratio": 4.0})
    siglip: dict = field(default_factory=lambda: {"width": 48, "depth": 3, "heads": 2, "mlp_ratio": 3.7362})
    hidden: int = 64  # Llama hidden size
    layers: int = 8  # Llama layers (SpecPrune's layer schedule is chosen per depth: configs/prune layers_for_depth)
    heads: int = 4  # attention heads (no GQA)
    intermediate: int = 172  # SiLU-gated MLP width (Llama-2: 2.6875 x hidden)
    layer_scale_init: float = 0.1  # DINOv2 LayerScale start value (from scratch; the released tower's are learned)

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "intermediate"):
            _positive(f"train.model.{name}", getattr(self, name))
        if self.hidden % self.heads:
            raise TrainConfigError(f"train.model.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for tower in ("dino", "siglip"):
            t = build_dataclass(TowerSize, f"train.model.{tower}", getattr(self, tower), TrainConfigError)
            for k in ("width", "depth", "heads"):
                _positive(f"train.model.{tower}.{k}", getattr(t, k))
            if t.depth < 2:
                raise TrainConfigError(f"train.model.{tower}.depth must be >= 2 (the feature is the second-to-last block)")
            if t.width % t.heads:
                raise TrainConfigError(f"train.model.{tower}.width ({t.width}) must be divisible by heads ({t.heads})")

    def oft_config(self) -> OFTConfig:
        towers = tuple(ViTConfig(family, int(t["width"]), int(t["depth"]), int(t["heads"]),
                                 float(t.get("mlp_ratio", 4.0)), timm_id=tid)
                       for family, t, tid in (("dinov2", self.dino, DINO_ID), ("siglip", self.siglip, SIGLIP_ID)))
        llm = LlamaConfig(hidden=self.hidden, layers=self.layers, heads=self.heads, kv_heads=self.heads,
                          intermediate=self.intermediate)
        return OFTConfig(towers=towers, llm=llm)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    name: str = "object_tiny"  # label of this setting (the file stem)
    demos: str | None = None  # REQUIRED: demo folder written by vla-accel-demos (holds <suite>/task*_ep*.npz)
    suite: str = "libero_object"  # demos of this suite; statistics are saved as "<suite>_no_noops"
    model: dict = field(default_factory=dict)  # ModelSize fields
    steps: int = 2000  # optimizer steps
    batch_size: int = 32
    lr: float = 3e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay on matrices (norms, biases, embeddings: none)
    warmup_steps: int = 100  # linear warm-up from 0
    decay_step: int | None = None  # multiply the learning rate by decay_factor from this step on (OFT: 100000); null: never
    decay_factor: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    crop_scale: float = 0.9  # area of the random crop (the recipe: 0.9; evaluation takes the centered one)
    random_crop: bool = True  # false: always the center crop (no augmentation)
    color_jitter: bool = False  # the recipe's brightness/contrast/saturation/hue jitter (see augment.py)
    val_episodes_per_task: int = 1  # episodes per task held out for a validation L1 (0 = none)
    val_every: int = 250  # steps between validation passes
    log_every: int = 10  # steps between lines in loss.jsonl
    save_every: int = 500  # steps between checkpoints (also at the end, and at max_minutes)
    max_minutes: float | None = None  # time budget: after 30 steps, fewer steps (schedule scaled) if `steps` would not fit; stop and save at the limit; null: none
    frames_on_device: str = "auto"  # auto (CUDA: the decoded frames live on the GPU if they take < half its free memory) | true | false
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bfloat16 autocast on cuda, fp32 on cpu) | bfloat16 | off
    threads: int | None = None  # torch CPU threads; null: torch's default
    decode_workers: int = 1  # processes decoding demo frames at start-up
    seed: int = 0  # weights, batch order and augmentation
    progress: bool = True  # progress bar

    def __post_init__(self):
        if self.demos in (None, "", "???"):
            raise TrainConfigError("train.demos is required: the folder written by vla-accel-demos, "
                                   "e.g. train.demos=/work/data/demos")
        self.model_size = build_dataclass(ModelSize, "train.model", self.model, TrainConfigError)
        for name in ("steps", "batch_size", "log_every", "save_every", "val_every", "decode_workers"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "val_episodes_per_task", "seed"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("lr", "decay_factor"):
            _positive(f"train.{name}", getattr(self, name), kind=float)
        for name in ("weight_decay", "grad_clip"):
            _positive(f"train.{name}", getattr(self, name), kind=float, allow_zero=True)
        if self.decay_step is not None:
            _positive("train.decay_step", self.decay_step)
        if not 0 < self.crop_scale <= 1:
            raise TrainConfigError(f"train.crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.max_minutes is not None:
            _positive("train.max_minutes", self.max_minutes, kind=float)
        if self.threads is not None:
            _positive("train.threads", self.threads)
        if not _DEVICE_RE.match(str(self.device)):
            raise TrainConfigError(f"train.device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")
        if isinstance(self.frames_on_device, bool):  # YAML true / false
            self.frames_on_device = str(self.frames_on_device).lower()
        if self.frames_on_device not in ("auto", "true", "false"):
            raise TrainConfigError(f"train.frames_on_device must be one of auto, true, false; got {self.frames_on_device!r}")
        if self.amp not in ("auto", "bfloat16", "off"):
            raise TrainConfigError(f"train.amp must be one of auto, bfloat16, off; got {self.amp!r}")

    @property
    def dataset_name(self) -> str:
        return f"{self.suite}_no_noops"


def train_config(values: Mapping[str, Any] | Any) -> TrainConfig:
    """TrainConfig from the `train` node of the Hydra config (or a plain mapping)."""
    return build_dataclass(TrainConfig, "train", to_plain(values), TrainConfigError)
