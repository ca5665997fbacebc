"""Llama-2 backbone with EXPLICIT bidirectional attention (parameter names = HF LlamaModel).

OpenVLA-OFT decodes the whole action chunk in parallel and was trained with every position seeing
every other position. Stock transformers silently runs causal attention; here the mask is built
from `key_mask` alone (padding), never from position order.

Pruning: `forward(..., decisions=plan)` applies a `vla_accel.protocols.PruneDecisions` on the padded [B, S, D]
layout: before layer i the kept tokens (`keep_tokens`: one gather), at a score layer the key mass of the chosen
query rows (`key_mass_from_rows`: the rows against all keys, never an [S, S] matrix) goes back to the decisions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._device import to_device_async
from ..protocols import Keep, Rows
from .config import LlamaConfig


def rms_norm(x, weight, eps: float):  # x: [..., D]; normalized in fp32 like HF's LlamaRMSNorm, cast, then * weight
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):  # positions: [B, S] -> cos, sin [B, 1, S, d]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x: [B, H, S, d] (or [..., d] with cos, sin broadcasting to it)
    return x * cos + rotate_half(x) * sin


def silu_mul(gate, up):  # the MLP's SiLU(gate) * up
    return F.silu(gate) * up


def padding_bias(key_mask, dtype):  # key_mask: [B, S] bool (True = real token) -> additive [B, 1, 1, S]
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~key_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def key_mass_from_rows(q, k, bias, row_idx, row_valid):
    """Attention mass per key from selected query rows only.

    q, k: [B, H, S, d] (after RoPE); bias: [B, 1, 1, S] or None; row_idx: [B, R]; row_valid: [B, R]
    returns [B, S] fp32: softmax(q_r k^T / sqrt(d)) averaged over heads and valid rows r.
    """
    B, H, S, d = q.shape
    idx = row_idx[:, None, :, None].expand(B, H, row_idx.shape[1], d)
    qr = torch.gather(q, 2, idx).float()  # [B, H, R, d]
    logits = qr @ k.float().transpose(-1, -2) / d**0.5  # [B, H, R, S]
    if bias is not None:
        logits = logits + bias.float()
    p = logits.softmax(-1).mean(1)  # [B, R, S]
    w = row_valid.float()
    return (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def keep_tokens(h, keep: Keep):
    """The padded layout after a prune: h [B, S, D] -> (h [B, S', D], positions [B, S'], key_mask [B, S'] | None);
    padding entries hold a copy of the sample's first token (masked). One host -> device copy, one gather."""
    B, S2 = keep.index.shape
    both = to_device_async(np.concatenate([keep.index, keep.positions, keep.valid]), h.device)  # [3B, S'] int64
    h = torch.gather(h, 1, both[:B, :, None].expand(B, S2, h.shape[2]))
    return h, both[B:2 * B], None if keep.uniform else both[2 * B:] != 0


def score_rows_on(rows: Rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (host) -> (row_idx [B, R] long, row_valid [B, R] bool) on `device`, one copy."""
    B = rows.index.shape[0]
    both = to_device_async(np.concatenate([rows.index, rows.valid]), device)
    return both[:B], both[B:] != 0


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, self.heads, self.head_dim = cfg.hidden, cfg.heads, cfg.head_dim
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def qkv(self, x, cos, sin):  # x: [B, S, D] -> q, k, v: [B, H, S, d]
        B, S, _ = x.shape
        shape = (B, S, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, bias, rows=None):
        B, S, D = x.shape
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)  # bidirectional
        mass = None if rows is None else key_mass_from_rows(q, k, bias, *rows)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, D)), mass


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)

    def forward(self, h, cos, sin, bias, rows=None):
        a, mass = self.self_attn(self.input_layernorm(h), cos, sin, bias, rows)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, mass


class LlamaBackbone(nn.Module):
    """`language_model.model` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)

    def rope(self, positions, dtype):
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def forward(self, h, positions, key_mask=None, decisions=None):
        """h: [B, S, D] input embeddings; positions: [B, S] RoPE indices; key_mask: [B, S] bool;
        decisions: a PruneDecisions (None: every token through every layer).

        Returns (final-norm hidden states [B, S', D], positions [B, S'], key_mask [B, S'] | None);
        S' < S when the decisions dropped tokens.
        """
        for i, layer in enumerate(self.layers):
            rows = None
            if decisions is not None:
                keep = decisions.keep(i)
                if keep is not None:
                    h, positions, key_mask = keep_tokens(h, keep)
                r = decisions.rows(i)
                rows = None if r is None else score_rows_on(r, h.device)
            cos, sin = self.rope(positions, h.dtype)
            h, mass = layer(h, cos, sin, padding_bias(key_mask, h.dtype), rows)
            if mass is not None:
                decisions.scores(i, mass)
        return self.norm(h), positions, key_mask
