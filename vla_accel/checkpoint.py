"""Loading (and writing) OpenVLA-OFT checkpoints in the official on-disk layout.

A checkpoint directory holds:
  config.json                                   Prismatic config (text_config = Llama config)
  model.safetensors | model-0000N-of-0000M.safetensors + model.safetensors.index.json
  action_head--{STEP}_checkpoint.pt             DDP state dict: keys `module.model.*`
  proprio_projector--{STEP}_checkpoint.pt       DDP state dict: keys `module.fc1|fc2.*`
  dataset_statistics.json                       {dataset: {"action": {q01, q99, mask, ...}, "proprio": {...}}}
  preprocessor_config.json (optional)           per-tower normalization (`tvf_normalize_params`, else means/stds)
  tokenizer files (optional)                    loaded lazily on first text use

Weights stream tensor by tensor from memory-mapped safetensors into a model materialized directly
on the target device, so host memory stays near one copy of the weights.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model.config import OFTConfig, preset
from .model.oft import OpenVLAOFT
from .model.vit import ViT
from .policy import Policy
from .processing import ImageNorm
from .tokenizer import ByteTokenizer, LazyTokenizer

ACTION_HEAD_GLOB = "action_head--*_checkpoint.pt"
PROPRIO_GLOB = "proprio_projector--*_checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' or the torch dtype; anything else fails naming the choices."""
    value = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if value not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtypes); got {dtype!r}")
    return value


# ---------------------------------------------------------------------------- key handling
def unused_keys(cfg: OFTConfig) -> list[str]:
    """Prefixes of published checkpoint keys that inference never reads; the loader skips them silently."""
    out = ["language_model.lm_head."]
    for name, t in zip(("featurizer", "fused_featurizer"), cfg.towers):
        out += [f"vision_backbone.{name}.{p}" for p in ViT.unused_checkpoint_keys(t)]
    return out


# timm's LayerScale parameter name -> the published one (the official code renames `gamma` to `scale_factor`)
LEGACY_SUFFIXES = {".ls1.gamma": ".ls1.scale_factor", ".ls2.gamma": ".ls2.scale_factor"}


def canonical_key(key: str) -> str:
    """A checkpoint key in the published naming (`...ls1.gamma` -> `...ls1.scale_factor`); others unchanged."""
    for old, new in LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[:-len(old)] + new
    return key


def main_weights(model: OpenVLAOFT) -> torch.nn.Module:
    """The modules whose tensors `model.safetensors` holds, under their checkpoint prefixes."""
    return torch.nn.ModuleDict({"vision_backbone": model.vision_backbone, "projector": model.projector,
                                "language_model": model.language_model})


def strip_ddp(state: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_tensors(model: torch.nn.Module, items: Iterable[tuple[str, torch.Tensor]], *, ignore: list[str],
                 where: str, assign: bool = False) -> None:
    """Copies (or assigns) named tensors into `model`'s parameters/buffers, one at a time.

    Keys are read in the published naming (`canonical_key`: timm's LayerScale `gamma` is accepted too).
    Raises CheckpointError naming the key on a shape mismatch, a tensor given twice (under both names) or a
    parameter that got no tensor.
    """
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    seen, unexpected = set(), []
    for given, t in items:
        key = canonical_key(given)
        if key in seen:
            raise CheckpointError(f"{where}: '{key}' is given twice (as '{given}' and under its other name)")
        if key not in targets:
            if not any(key.startswith(p) for p in ignore) and not key.endswith("rotary_emb.inv_freq"):
                unexpected.append(key)
            continue
        dst = targets[key]
        if tuple(t.shape) != tuple(dst.shape):
            raise CheckpointError(f"{where}: shape mismatch for '{key}': checkpoint {tuple(t.shape)}, "
                                  f"model expects {tuple(dst.shape)} (does config.json describe these weights?)")
        if assign:  # share the given tensor; the caller moves the model to its device/dtype afterwards
            _assign(model, key, t.detach())
        else:
            with torch.no_grad():
                dst.copy_(t)
        seen.add(key)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"{where}: missing key(s) {missing[:10]}{more}")
    if unexpected:
        warnings.warn(f"{where}: {len(unexpected)} key(s) not used by the model, e.g. {unexpected[:5]}")


def _assign(model, key, tensor):
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(getattr(mod, attr), torch.nn.Parameter):
        setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(mod, attr, tensor)


def _safetensors_items(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read weight file '{f}': {e} (truncated or not a safetensors file?)") from e
        with handle:
            for key in handle.keys():
                try:
                    yield key, handle.get_tensor(key)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"cannot read tensor '{key}' from '{f}': {e} (truncated file?)") from e


def weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot parse '{index}': {e}") from e
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"'{index.name}' lists shard(s) {missing} that are not in '{root}'")
        return files
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"no weights in '{root}': expected model.safetensors or "
                          "model.safetensors.index.json + shards")


def _load_pt(root: Path, pattern: str, what: str) -> tuple[Path, dict]:
    found = sorted(glob.glob(str(root / pattern)))
    if not found:
        raise CheckpointError(f"no {what} file in '{root}' (expected '{pattern}')")
    if len(found) > 1:  # several training steps: take the highest
        found.sort(key=lambda p: int("".join(c for c in Path(p).name.split("--")[1] if c.isdigit()) or 0))
    path = Path(found[-1])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what} file '{path}': {e} (truncated or corrupt?)") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} file '{path}' does not hold a state dict")
    return path, strip_ddp(state)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {what}: '{path}'") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot parse {what} '{path}': {e}") from e


def resolve_source(source: str | os.PathLike) -> Path:
    """A local directory as is; anything else of the form 'org/name' through huggingface_hub."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    s = str(source)
    if p.exists():
        raise CheckpointError(f"'{s}' is a file; pass the checkpoint directory")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"could not fetch '{s}' from the hub ({type(e).__name__}: {e}); "
                                  f"download it elsewhere and pass the local directory") from e
    raise CheckpointError(f"checkpoint '{s}' not found: not a local directory, not a hub id 'org/name'")


# ---------------------------------------------------------------------------- public API
def build_model(cfg: OFTConfig, device, dtype) -> OpenVLAOFT:
    """Allocates the model on `device` without initializing weights (they are loaded next)."""
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    return model.to(dtype).to_empty(device=device)


def load_policy(source, *, device=None, dtype=None, unnorm_key: str | None = None, **policy_kwargs) -> Policy:
    """Loads an official OpenVLA-OFT checkpoint (local dir or hub id) into a ready Policy."""
    root = resolve_source(source)
    device = torch.device(device or default_device())
    dtype = _check_dtype(dtype or default_dtype(device))
    cfg = OFTConfig.from_hf_config(read_json(root / "config.json", "config.json"))
    stats_path = root / "dataset_statistics.json"
    norm_stats = read_json(stats_path, "dataset statistics") if stats_path.exists() else cfg.hf_config.get("norm_stats")
    if not norm_stats:
        if stats_path.exists():
            raise CheckpointError(f"no dataset statistics: '{stats_path}' holds none (an empty mapping)")
        raise CheckpointError(f"no dataset statistics: '{stats_path}' is missing and config.json has no norm_stats")
    files = weight_files(root)
    head_path, head_state = _load_pt(root, ACTION_HEAD_GLOB, "action head")
    prop_path, prop_state = _load_pt(root, PROPRIO_GLOB, "proprio projector")

    model = build_model(cfg, device, dtype)
    load_tensors(main_weights(model), _safetensors_items(files), ignore=unused_keys(cfg), where=str(root))
    load_tensors(model.action_head, head_state.items(), ignore=[], where=str(head_path))
    load_tensors(model.proprio_projector, prop_state.items(), ignore=[], where=str(prop_path))

    pre = root / "preprocessor_config.json"
    image_norm = ImageNorm.from_preprocessor_config(read_json(pre, "preprocessor config")) if pre.exists() else None
    return Policy(model, norm_stats=norm_stats, unnorm_key=unnorm_key, image_norm=image_norm,
                  tokenizer=LazyTokenizer(root), source=str(source), **policy_kwargs)


def wrap(vla, action_head, proprio_projector, *, unnorm_key: str | None = None, processor=None,
         tokenizer=None, device=None, dtype=None, **policy_kwargs) -> Policy:
    """Builds the same Policy from an official OpenVLA-OFT model object already in memory.

    `vla` needs `.config` (OpenVLAConfig or dict), `.vision_backbone`, `.projector`, `.language_model`
    and `.norm_stats`; `action_head` / `proprio_projector` are the official modules (DDP-wrapped or not).
    Tensors are shared with the given modules where device and dtype already match.
    """
    needed = ("config", "vision_backbone", "projector", "language_model", "norm_stats")
    lacking = [a for a in needed if not hasattr(vla, a)]
    if lacking:
        raise TypeError(f"wrap(): the model object lacks {lacking} (expected an OpenVLA-OFT model object)")
    conf = vla.config.to_dict() if hasattr(vla.config, "to_dict") else dict(vla.config)
    cfg = OFTConfig.from_hf_config(conf)
    ref = next(vla.language_model.parameters())
    device = torch.device(device or ref.device)
    dtype = dtype or ref.dtype

    def items():
        for prefix in ("vision_backbone", "projector", "language_model"):
            for k, v in getattr(vla, prefix).state_dict().items():
                yield f"{prefix}.{k}", v

    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    load_tensors(main_weights(model), items(), ignore=unused_keys(cfg), where="wrap(vla)", assign=True)
    load_tensors(model.action_head, strip_ddp(action_head.state_dict()).items(), ignore=[],
                 where="wrap(action_head)", assign=True)
    load_tensors(model.proprio_projector, strip_ddp(proprio_projector.state_dict()).items(), ignore=[],
                 where="wrap(proprio_projector)", assign=True)
    model = model.to(device=device, dtype=dtype)
    image_norm = None
    ip = getattr(processor, "image_processor", None)
    fields = ("tvf_normalize_params", "means", "stds")  # what PrismaticImageProcessor applies / stores
    if ip is not None and any(hasattr(ip, f) for f in fields):
        image_norm = ImageNorm.from_preprocessor_config({f: getattr(ip, f) for f in fields if hasattr(ip, f)})
    tokenizer = tokenizer or getattr(processor, "tokenizer", None)
    if tokenizer is not None and not hasattr(tokenizer, "encode"):
        raise TypeError("tokenizer must have an encode(text) -> ids method")
    return Policy(model, norm_stats=vla.norm_stats, unnorm_key=unnorm_key, image_norm=image_norm,
                  tokenizer=_HFTokenizer(tokenizer) if tokenizer is not None else None,
                  source="wrap", **policy_kwargs)


class _HFTokenizer:
    """Adapts a transformers tokenizer (callable) to the encode(text) -> ids interface."""

    def __init__(self, tok):
        self.tok = tok
        self.name = type(tok).__name__

    def encode(self, text: str) -> list[int]:
        if callable(self.tok):
            return list(self.tok(text, add_special_tokens=True)["input_ids"])
        return list(self.tok.encode(text))


def init_random_(model: OpenVLAOFT, seed: int = 0) -> OpenVLAOFT:
    """Random weights that keep activations tame: N(0, 0.02) matrices and embeddings, unit norm
    weights, zero biases, LayerScale 1e-5. Deterministic for a given seed and device."""
    from .model.llama import RMSNorm
    from .model.vit import LayerScale

    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, LayerScale):
                m.scale_factor.fill_(1e-5)
            else:
                for name, p in m.named_parameters(recurse=False):
                    if name == "bias":
                        p.zero_()
                    else:
                        p.normal_(0.0, 0.02, generator=g)
    return model


def synthetic_stats(cfg: OFTConfig) -> dict:
    """LIBERO-like bounds for a random policy (its actions mean nothing anyway)."""
    a, p = cfg.action_dim, cfg.proprio_dim
    if p == 8:  # eef pos (3), axis-angle (3), gripper qpos (2)
        proprio = {"q01": [-0.5, -0.5, 0.0, -3.2, -3.2, -3.2, 0.0, -0.05],
                   "q99": [0.5, 0.5, 1.5, 3.2, 3.2, 3.2, 0.05, 0.0]}
    else:
        proprio = {"q01": [-1.0] * p, "q99": [1.0] * p}
    action = {"q01": [-0.75] * (a - 1) + [0.0], "q99": [0.75] * (a - 1) + [1.0], "mask": [True] * (a - 1) + [False]}
    return {"random_no_noops": {"action": action, "proprio": proprio}}


def random_policy(preset_name: str = "tiny", *, device="cpu", dtype=torch.float32, seed: int = 0,
                  cfg: OFTConfig | None = None, **policy_kwargs) -> Policy:
    """A policy of the real architecture with RANDOM weights (no download): demos, tests, benchmarks."""
    cfg = cfg or preset(preset_name)
    dtype = _check_dtype(dtype)
    model = init_random_(build_model(cfg, torch.device(device), dtype), seed)
    return Policy(model, norm_stats=synthetic_stats(cfg), tokenizer=ByteTokenizer(), random_weights=True,
                  source=f"random:{preset_name}", **policy_kwargs)


def save_checkpoint(policy_or_model, root, *, norm_stats: dict | None = None, shards: int = 1, step: int = 150000,
                    image_norm: ImageNorm | None = None, dtype=None) -> Path:
    """Writes a model in the official on-disk layout (used by tests to make small checkpoints)."""
    model = getattr(policy_or_model, "model", policy_or_model)
    norm_stats = norm_stats or getattr(policy_or_model, "norm_stats", None)
    if norm_stats is None:
        raise ValueError("save_checkpoint needs norm_stats (or a Policy that has them)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (root / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    (root / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))
    if image_norm is not None:  # the published fields; the processor applies tvf_normalize_params
        (root / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "PrismaticImageProcessor", "means": image_norm.means, "stds": image_norm.stds,
             "tvf_normalize_params": [{"mean": m, "std": s, "inplace": False}
                                      for m, s in zip(image_norm.means, image_norm.stds)]}, indent=2))

    def prep(t):
        t = t.detach().to("cpu")
        return (t.to(dtype) if dtype is not None else t).contiguous()

    main = {f"{p}.{k}": prep(v) for p in ("vision_backbone", "projector", "language_model")
            for k, v in getattr(model, p).state_dict().items()}
    if shards <= 1:
        save_file(main, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = list(main)
        per = -(-len(keys) // shards)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: main[k] for k in keys[i * per:(i + 1) * per]}
            save_file(part, str(root / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(v.numel() * v.element_size() for v in main.values())
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    torch.save({f"module.{k}": prep(v) for k, v in model.action_head.state_dict().items()},
               root / f"action_head--{step}_checkpoint.pt")
    torch.save({f"module.{k}": prep(v) for k, v in model.proprio_projector.state_dict().items()},
               root / f"proprio_projector--{step}_checkpoint.pt")
    return root
