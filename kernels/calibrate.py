"""Calibration of the unified-max softmax: one fixed offset phi per model, chosen from real logits.

    lse = row_logsumexp(q, k, cu_seqlens)              # [T, H] log-sum-exp of each row's scaled logits
    cal = calibrate_phi(lse, dtype=torch.bfloat16)      # phi centring the most rows inside the safe window
    cal.save("phi.json"); cal = SoftmaxCalibration.load("phi.json")
    attention(q, k, v, cu, L, phi=cal.phi, safe_range=cal.safe_range)

Units: scaled logits x = q.k * sm_scale (natural-log units, as in the FlashDecoding++ paper). A row is
safe when lse - phi lies in [lo, hi], lse = log sum_j exp(x_j) its log-sum-exp (the kernel reads it off the
softmax denominator it accumulates anyway, so the unified pass needs no per-block row maximum). Since
max_j x_j <= lse <= max_j x_j + log(n_keys):
  - hi bounds every exp(x - phi) and the fp32 sums away from overflow; for fp16 inputs the probabilities
    are rounded to fp16 for the p @ v product, so hi stays under ln(65504) = 11.09;
  - lo keeps the row's largest term above exp(lo - log n_keys), a normal number of the product dtype for
    n_keys up to ~2000 (fp16) or far beyond (bf16 / fp32), so the row keeps the relative precision of the
    ordinary online softmax; entries far below the maximum underflow harmlessly, as in any softmax.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# (lo, hi) of lse - phi, natural-log units, per input dtype (see the module docstring).
_SAFE_RANGES = {
    torch.bfloat16: (-60.0, 40.0),  # sums <= exp(40) = 2e17 << fp32 max; max term >= exp(-60 - ln 1e4) = 1e-30
    torch.float32: (-60.0, 40.0),
    torch.float16: (-2.0, 10.0),  # terms <= exp(10) = 22026 < 65504; max term >= exp(-2 - ln 2000) = 7e-5
}


def default_safe_range(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in _SAFE_RANGES:
        raise ValueError(f"no safe range for {dtype}; known: {sorted(map(str, _SAFE_RANGES))}")
    return _SAFE_RANGES[dtype]


@dataclass(frozen=True)
class SoftmaxCalibration:
    phi: float  # fixed softmax offset (scaled-logit units)
    lo: float  # safe window of (row log-sum-exp - phi)
    hi: float
    dtype: str  # input dtype the window was chosen for, e.g. "bfloat16"
    coverage: float  # fraction of calibration rows inside the window
    rows: int  # calibration rows seen

    @property
    def safe_range(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> "SoftmaxCalibration":
        d = json.loads(Path(path).read_text())
        return SoftmaxCalibration(float(d["phi"]), float(d["lo"]), float(d["hi"]), str(d["dtype"]),
                                  float(d["coverage"]), int(d["rows"]))


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, *, causal: bool = False,
                  sm_scale: float | None = None) -> torch.Tensor:
    """log sum_j exp(scaled logit) of every (row, head): fp32 [T, H]. q, k: [T, H, D]; cu_seqlens int32 [B+1]."""
    t, h, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.full((t, h), float("-inf"), dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        s = q[start:end].float().transpose(0, 1) @ k[start:end].float().permute(1, 2, 0) * scale  # [H, L, L]
        if causal:
            n = end - start
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[start:end] = torch.logsumexp(s, dim=-1).transpose(0, 1)
    return out


def calibrate_phi(row_lse: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                  safe_range: tuple[float, float] | None = None) -> SoftmaxCalibration:
    """phi that puts the most rows' log-sum-exp inside [phi + lo, phi + hi], centred in the slack.

    row_lse: any shape, the log-sum-exp of each calibration row's scaled logits (e.g. row_logsumexp over
    real inputs and all layers).
    """
    lo, hi = safe_range if safe_range is not None else default_safe_range(dtype)
    r = row_lse.detach().flatten().float()
    r = r[torch.isfinite(r)].sort().values.cpu()
    if r.numel() == 0:
        raise ValueError("calibrate_phi needs at least one finite row value")
    width = hi - lo
    ends = torch.searchsorted(r, r + width, right=True)  # rows covered by a window starting at r[i]
    counts = ends - torch.arange(r.numel())
    i = int(counts.argmax())
    first, last = float(r[i]), float(r[int(ends[i]) - 1])
    phi = 0.5 * (first + last) - 0.5 * (lo + hi)  # centre the covered rows inside the window
    inside = ((r - phi >= lo) & (r - phi <= hi)).float().mean().item()
    return SoftmaxCalibration(phi=phi, lo=lo, hi=hi, dtype=str(dtype).replace("torch.", ""), coverage=inside,
                              rows=int(r.numel()))
