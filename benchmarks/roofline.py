"""The roofline floor of one OFT forward: the weights it must read and the FLOPs it must do; and the two ceilings
it is measured against, taken from the device at the start of each run.

    c = ceilings(torch.device("cuda"))               # {"copy_bytes_per_s", "matmul_flops_per_s", "source", ...}
    w = weight_bytes(model)                          # {"vision", "projector", "backbone", "head", "total"}
    f = forward_flops(model.cfg, tokens)             # tokens: per sample, the rows entering each layer
    floor = floor_ms(w["total"], f["total"], c["copy_bytes_per_s"], c["matmul_flops_per_s"])

Ceilings (`measure_ceilings`): device-to-device copy of a 1 GiB buffer (bytes read + bytes written per second) and
a bf16 8192^3 matmul on random data (2 * 8192^3 FLOPs per call), each the median of 10 calls timed alone after 3
warm-ups. The H100 figures of docs/flashdecoding-pp.md (copy 2.96e12 B/s, matmul 750e12 FLOP/s) stay only as the
fallback: on a CPU, or when the measurement fails (`ceilings` says which in "source").
Bytes: each weight read once (the embedding table only for the rows looked up); activations are not counted.
FLOPs: 2 per multiply-add of every linear layer, convolution and attention product (QK^T and PV), all stages,
nothing skipped (the runner's last-layer shortcut does less). `stage_floor_ms` is the sum over stages of each
stage's own max(bytes, FLOPs) term: stages run one after the other, so it is a floor too, and the tighter one.
"""

from __future__ import annotations

import statistics
import time

import torch

from vla_accel.model.config import OFTConfig
from vla_accel.prune.flops import layer_flops as backbone_layer_flops

COPY_BW = 2.96e12  # B/s, H100 (the fallback)
MATMUL_RATE = 750e12  # FLOP/s, H100 (the fallback)
FALLBACK = "H100 constants of docs/flashdecoding-pp.md"


def rates_from_times(copy_bytes: int, copy_s: float, size: int, matmul_s: float) -> tuple[float, float]:
    """(copy rate in B/s counting bytes read + bytes written, matmul rate in FLOP/s of one size^3 product)."""
    return 2 * copy_bytes / copy_s, 2 * size ** 3 / matmul_s


def _median_s(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of one call of fn, each call timed alone (CUDA events on a GPU, the host clock on a CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure_ceilings(device: torch.device, *, copy_bytes: int = 2**30, size: int = 8192,
                     dtype: torch.dtype = torch.bfloat16, warmup: int = 3, reps: int = 10) -> dict:
    """Copy bandwidth and matmul rate of `device`, measured now (see the module docstring)."""
    def copy_s() -> float:
        src = torch.randn(copy_bytes // 2, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return _median_s(lambda: dst.copy_(src), device, warmup, reps)

    def matmul_s() -> float:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        return _median_s(lambda: a @ b, device, warmup, reps)

    copy_rate, matmul_rate = rates_from_times(copy_bytes // 2 * 2, copy_s(), size, matmul_s())
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the buffers are gone with the helpers' frames
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"copy_bytes_per_s": copy_rate, "matmul_flops_per_s": matmul_rate, "source": f"measured on {name}",
            "copy_buffer_bytes": copy_bytes, "matmul_size": size, "matmul_dtype": str(dtype).replace("torch.", "")}


def ceilings(device: torch.device | str) -> dict:
    """The ceilings every floor of a run uses: measured on a CUDA device; on a CPU, or if the measurement fails,
    the H100 constants ("source" says which, and why)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return measure_ceilings(device)
        except Exception as e:  # noqa: BLE001 - the run goes on with the fallback, which the result file names
            why = f"measurement failed: {type(e).__name__}: {e}"[:200]
    else:
        why = f"no measurement on {device.type}"
    return {"copy_bytes_per_s": COPY_BW, "matmul_flops_per_s": MATMUL_RATE, "source": f"{FALLBACK} ({why})"}


def describe(c: dict) -> str:
    """One line: both ceilings and where they come from."""
    return (f"copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
            f"{c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['source']})")


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
