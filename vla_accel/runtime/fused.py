"""The operations of the accelerated forward, each with a fast path and, as its fallback, the model's own
functional form (vla_accel.model.llama: rms_norm, apply_rope, silu_mul; vit: add_layer_norm): one reference per op.

    ops = Ops(cfg, device, dtype)        # resolves gemm / attention / rowwise backends once
    y = ops.linear(x, w, b)              # kernels' dispatch table (FlashDecoding++ flat GEMM / GEMV) or cuBLAS
    h = ops.linear_residual(x, w, h)     # h + x @ w.T, the residual add in the GEMM epilogue (no extra pass)
    a = ops.gate_up_silu(x, w_gu)        # silu(x @ Wg.T) * (x @ Wu.T) from the fused [2I, K] weight
    y = ops.rms_norm(x, w, eps)          # one pass (Triton) instead of five (torch)
    y = ops.add_layer_norm(x, r, g, w, b, eps)   # vision: x += r * g in place, y = LayerNorm(x), one pass
    q, k = ops.rope(qkv, pos, cos, sin, heads)   # rotate q and k out of the fused QKV rows, one pass
    o = ops.attention(q, k, v, cu, max_seqlen)   # packed varlen, bidirectional
    o, mass = ops.attention_scored(q, k, v, cu, max_seqlen, rows)   # + key mass (kernels only)

Every fast path is host-sync free (CUDA-graph safe). `ops.describe()` says which backend serves what, and
`ops.notes` why a requested one was not available. Packed attention: q, k, v [T, H, d] (rows may be strided,
last dim contiguous); cu_seqlens int32 [n+1] covering all T rows (the runner's padding rows form one extra
sequence of their own, so every row is written with finite values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.llama import apply_rope, rms_norm, rope_cos_sin, silu_mul
from ..model.vit import add_layer_norm
from .config import RuntimeConfig, RuntimeConfigError


def _import_kernels():
    try:
        import vla_accel.kernels as K

        return K, None
    except Exception as err:  # noqa: BLE001 - any import failure means: not available here
        return None, f"{type(err).__name__}: {err}"


def _import_rowwise():
    try:
        from vla_accel.kernels import rowwise

        return rowwise, None
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"


def rope_table(max_pos: int, head_dim: int, theta: float, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin half-tables [max_pos, head_dim/2] in `dtype`: the model's llama.rope_cos_sin for positions
    0..max_pos-1 (both halves of its cat(freqs, freqs) are equal, so half the table is all of it)."""
    cos, sin = rope_cos_sin(torch.arange(max_pos, device=device)[None], head_dim, theta, dtype)  # [1, 1, P, d]
    half = head_dim // 2
    return cos[0, 0, :, :half].contiguous(), sin[0, 0, :, :half].contiguous()


def flash_varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.ops.aten, "_flash_attention_forward") and \
        torch.cuda.get_device_capability(device)[0] >= 8


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Ops:
    def __init__(self, cfg: RuntimeConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.notes: list[str] = []

        # ---- GEMMs
        K, err = (None, None)
        if cfg.gemm in ("auto", "kernels"):
            K, err = _import_kernels()
            if K is None and cfg.gemm == "kernels":
                raise RuntimeConfigError(f"runtime.gemm=kernels but vla_accel.kernels cannot be imported ({err}); "
                                         f"use runtime.gemm=torch")
            if K is None:
                self.notes.append(f"gemm: vla_accel.kernels not importable ({err}); using torch (cuBLAS)")
        self.K = K
        self.gemm = "kernels" if K is not None else "torch"
        self.table = None
        if K is not None:
            self.table = K.load_table(cfg.table) if cfg.table else K.default_table(self.device)
            if not self.table.rules:
                self.notes.append(f"gemm: dispatch table for '{self.table.gpu}' has no rules: every GEMM is cuBLAS")

        # ---- attention
        want = cfg.attention
        if want in ("auto", "kernels") and self.K is None and (cuda or want == "kernels"):
            self.K, err = _import_kernels()
            if self.K is None and want == "kernels":
                raise RuntimeConfigError(f"runtime.attention=kernels but vla_accel.kernels cannot be imported "
                                         f"({err}); use runtime.attention=flash or sdpa")
        if want == "auto":
            want = ("kernels" if cuda and self.K is not None else
                    "flash" if flash_varlen_available(self.device) else "sdpa")
        if want == "flash" and not flash_varlen_available(self.device):
            raise RuntimeConfigError("runtime.attention=flash needs a CUDA GPU of compute capability >= 8.0 and "
                                     "torch.ops.aten._flash_attention_forward; use runtime.attention=sdpa")
        if want == "kernels" and not cuda and not _interpreting():
            raise RuntimeConfigError("runtime.attention=kernels on CPU needs TRITON_INTERPRET=1 (set before the "
                                     "first import of vla_accel.kernels)")
        self.attn = want
        va = cfg.vision_attention
        if va == "auto":
            va = "flash" if flash_varlen_available(self.device) else "sdpa"
        if va == "flash" and not flash_varlen_available(self.device):
            raise RuntimeConfigError("runtime.vision_attention=flash needs a CUDA GPU (sm80+); use sdpa")
        if va == "kernels" and self.K is None:
            raise RuntimeConfigError("runtime.vision_attention=kernels needs vla_accel.kernels; use flash or sdpa")
        self.vision_attn = va
        self.scores = cfg.scores if cfg.scores != "auto" else ("kernel" if want == "kernels" else "exact")
        if self.scores == "kernel" and want != "kernels":
            raise RuntimeConfigError("runtime.scores=kernel takes the key mass from the attention kernel: it needs "
                                     "runtime.attention=kernels")

        # ---- row-wise ops
        rw = cfg.rowwise
        if rw == "auto":
            rw = "triton" if cuda else "torch"
        self.R = None
        if rw == "triton":
            if not cuda and not _interpreting():
                raise RuntimeConfigError("runtime.rowwise=triton on CPU needs TRITON_INTERPRET=1; use rowwise=torch")
            R, err = _import_rowwise()
            if R is None:
                if cfg.rowwise == "triton":
                    raise RuntimeConfigError(f"runtime.rowwise=triton but the Triton row-wise kernels cannot be "
                                             f"imported ({err}); use runtime.rowwise=torch")
                self.notes.append(f"rowwise: Triton kernels not importable ({err}); using torch")
                rw = "torch"
            self.R = R
        self.rowwise = rw

    def describe(self) -> dict:
        return {"gemm": self.gemm, "table": self.table.gpu if self.table is not None else None,
                "table_rules": len(self.table.rules) if self.table is not None else 0,
                "attention": self.attn, "vision_attention": self.vision_attn, "scores": self.scores,
                "rowwise": self.rowwise, "notes": list(self.notes)}

    # ------------------------------------------------------------------ GEMMs
    def linear(self, x, w, b=None):  # x: [M, K], w: [N, K] -> [M, N]
        if self.gemm == "kernels":
            return self.K.linear(x, w, bias=b, table=self.table)
        return F.linear(x, w, b)

    def linear_residual(self, x, w, res, b=None, inplace=False):  # res + x @ w.T (+ b)
        """inplace: the sum may overwrite `res` (cuBLAS then accumulates into it: torch.addmm out of place first
        copies `res`, a 5 MB copy per call at 608 rows). The runner passes it for residuals it owns."""
        if self.gemm == "kernels":
            return self.K.linear_residual(x, w, res, bias=b, table=self.table, inplace=inplace)
        if inplace and b is None:
            return res.addmm_(x, w.t())
        y = torch.addmm(res, x, w.t())
        return y if b is None else y + b

    def gate_up_silu(self, x, w_gu):  # x: [M, K], w_gu: [2I, K] -> [M, I]
        if self.gemm == "kernels":
            impl = self.K.choose(self.table, tuple(w_gu.shape), x.shape[0], "gate_up_silu")
            if impl != "cublas":
                return self.K.gate_up_silu(x, w_gu, table=self.table)
        return self.silu_mul(F.linear(x, w_gu))

    # ------------------------------------------------------------------ row-wise
    def rms_norm(self, x, w, eps):
        if self.rowwise == "triton":
            return self.R.rms_norm(x, w, eps)
        return rms_norm(x, w, eps)

    def add_layer_norm(self, x, r, g, w, b, eps):
        """x [T, D] += r * g (g: layer scale or None) IN PLACE; -> LayerNorm(x) * w + b."""
        if self.rowwise == "triton":
            return self.R.add_layer_norm(x, r, g, w, b, eps)
        updated, y = add_layer_norm(x, r, g, w, b, eps)
        x.copy_(updated)
        return y

    def silu_mul(self, gu):
        if self.rowwise == "triton":
            return self.R.silu_mul(gu)
        return silu_mul(*gu.chunk(2, dim=-1))

    def rope(self, qkv, positions, cos, sin, heads):  # -> q, k [T, H, d] contiguous
        if self.rowwise == "triton":
            return self.R.rope_split(qkv, positions, cos, sin, heads)
        T = qkv.shape[0]
        d = qkv.shape[1] // (3 * heads)
        c = cos[positions].repeat(1, 2)[:, None]  # [T, 1, d]: the full table row, broadcast over heads
        s = sin[positions].repeat(1, 2)[:, None]
        q = qkv[:, :heads * d].reshape(T, heads, d)
        k = qkv[:, heads * d:2 * heads * d].reshape(T, heads, d)
        return apply_rope(q, c, s), apply_rope(k, c, s)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, cu, max_seqlen: int, backend: str | None = None):
        """q, k, v: [T, H, d]; cu: int32 [n+1] (cu[-1] == T) -> [T, H, d]."""
        backend = backend or self.attn
        d = q.shape[-1]
        if backend == "sdpa_dense":  # n equal sequences of `max_seqlen` rows, no padding: torch SDPA picks the kernel
            T, H = q.shape[:2]
            n = T // max_seqlen
            q4, k4, v4 = (t.view(n, max_seqlen, H, d).transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(q4, k4, v4).transpose(1, 2).reshape(T, H, d)
        if backend == "kernels":
            if (d & (d - 1)) == 0:
                return self.K.attention(q, k, v, cu, max_seqlen)
            dp = 1 << (d - 1).bit_length()  # zero-pad the head dim to a power of two: q.k and p @ v unchanged
            qp, kp, vp = (F.pad(t, (0, dp - d)) for t in (q, k, v))
            return self.K.attention(qp, kp, vp, cu, max_seqlen, sm_scale=1.0 / math.sqrt(d))[..., :d]
        if backend == "flash":  # (Ops checked at construction that FA2 varlen is available)
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False,
                                                           False, scale=1.0 / math.sqrt(q.shape[-1]))[0]
        return self._attention_sdpa(q, k, v, cu)

    def attention_scored(self, q, k, v, cu, max_seqlen: int, score_rows):
        """-> (out [T, H, d], key_mass fp32 [T]); score_rows bool [T] (kernels backend only)."""
        return self.K.attention(q, k, v, cu, max_seqlen, score_rows=score_rows)

    @staticmethod
    def _attention_sdpa(q, k, v, cu):
        T, H, d = q.shape
        if q.device.type != "cuda":  # host-readable bounds: one SDPA per sequence, exactly the reference's math
            out = torch.empty_like(q)
            bounds = cu.tolist()
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e > s:
                    qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
                    out[s:e] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
            return out
        # graph-safe: one block-diagonal mask over the packed rows (O(T^2) work; fallback only)
        seg = torch.searchsorted(cu[1:].long(), torch.arange(T, device=q.device), right=True)
        mask = seg[:, None] == seg[None, :]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask[None, None])
        return o[0].transpose(0, 1)
