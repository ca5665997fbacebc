"""The roofline floor of one OFT forward: the weights it must read and the FLOPs it must do.

    w = weight_bytes(model)                          # {"vision", "projector", "backbone", "head", "total"}
    f = forward_flops(model.cfg, tokens)             # tokens: per sample, the rows entering each layer
    floor = floor_ms(w["total"], f["total"])         # max(bytes / 2.96 TB/s, FLOPs / 750 TFLOP/s)

Rates: the H100 measurements of docs/flashdecoding-pp.md (device copy 2.96e12 B/s counting read + write,
dense bf16 matmul 750e12 FLOP/s). Bytes: each weight read once (the embedding table only for the rows
looked up); activations are not counted. FLOPs: 2 per multiply-add of every linear layer, convolution and
attention product (QK^T and PV), all stages, nothing skipped (the runner's last-layer shortcut does less).
`stage_floor_ms` is the sum over stages of each stage's own max(bytes, FLOPs) term: stages run one after the
other, so it is a floor too, and the tighter one.
"""

from __future__ import annotations

from vla_accel.model.config import OFTConfig
from vla_accel.prune.flops import layer_flops as backbone_layer_flops

COPY_BW = 2.96e12  # B/s
MATMUL_RATE = 750e12  # FLOP/s


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(model) -> dict[str, float]:
    """Bytes of weights one forward reads, per stage."""
    el = next(model.parameters()).element_size()
    cfg: OFTConfig = model.cfg
    llm = model.llm
    backbone = (_numel(llm) - llm.embed_tokens.weight.numel()) * el
    backbone += 64 * cfg.llm.hidden * el  # ~the prompt rows + stop row looked up in the embedding table
    out = {
        "vision": float(_numel(model.vision_backbone) * el),
        "projector": float((_numel(model.projector) + _numel(model.proprio_projector)) * el),
        "backbone": float(backbone),
        "head": float(_numel(model.action_head) * el),
    }
    out["total"] = sum(out.values())
    return out


def vision_flops(cfg: OFTConfig) -> float:
    """Per sample: both towers on every camera image."""
    total = 0.0
    for t in cfg.towers:
        S = t.num_patches + int(t.class_token) + t.num_registers
        w, mlp = t.width, t.mlp_dim
        per_block = 2 * S * (3 * w * w + w * w + 2 * w * mlp) + 4 * S * S * w
        patch = 2 * t.num_patches * (3 * t.patch * t.patch) * w
        total += t.feature_depth * per_block + patch
    return total * cfg.num_images


def projector_flops(cfg: OFTConfig) -> float:
    v, D, n = cfg.vision_dim, cfg.llm.hidden, cfg.patches_per_image * cfg.num_images
    return 2 * n * (v * 4 * v + 4 * v * D + D * D) + 2 * (cfg.proprio_dim * D + D * D)


def layer_flops(cfg: OFTConfig, tokens: int) -> float:
    # one backbone layer with `tokens` rows: the same analytic count as the pruning statistics
    return float(backbone_layer_flops(tokens, cfg.llm.hidden, cfg.llm.intermediate))


def head_flops(cfg: OFTConfig) -> float:
    D, A, C = cfg.llm.hidden, cfg.action_dim, cfg.chunk
    return 2 * C * (A * D * D + 2 * D * D + D * A)


def forward_flops(cfg: OFTConfig, tokens: list[list[int]]) -> dict[str, float]:
    """tokens[b][l]: rows of sample b entering layer l (len = number of layers)."""
    for t in tokens:
        if len(t) != cfg.llm.layers:
            raise ValueError(f"need {cfg.llm.layers} per-layer token counts per sample, got {len(t)}")
    B = len(tokens)
    out = {
        "vision": vision_flops(cfg) * B,
        "projector": projector_flops(cfg) * B,
        "backbone": float(sum(layer_flops(cfg, n) for t in tokens for n in t)),
        "head": head_flops(cfg) * B,
    }
    out["total"] = sum(out.values())
    return out


def floor_ms(nbytes: float, flops: float, bw: float = COPY_BW, rate: float = MATMUL_RATE) -> float:
    return max(nbytes / bw, flops / rate) * 1e3


def floors(model, tokens: list[list[int]], bw: float = COPY_BW, rate: float = MATMUL_RATE) -> dict:
    """Whole-forward floor (the issue's definition) and the per-stage sum, with the terms behind them."""
    wb, fl = weight_bytes(model), forward_flops(model.cfg, tokens)
    stages = {}
    for s in ("vision", "projector", "backbone", "head"):
        stages[s] = floor_ms(wb[s], fl[s], bw, rate)
    return {"floor_ms": floor_ms(wb["total"], fl["total"], bw, rate),
            "stage_floor_ms": sum(stages.values()),
            "bytes_ms": wb["total"] / bw * 1e3, "flops_ms": fl["total"] / rate * 1e3,
            "stages_ms": stages, "weight_gb": wb["total"] / 1e9, "tflop": fl["total"] / 1e12,
            "tokens_mean": sum(map(sum, tokens)) / (len(tokens) * model.cfg.llm.layers)}
