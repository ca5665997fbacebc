"""Vision towers: a plain ViT whose parameter names match timm's VisionTransformer.

Two families are used by OpenVLA-OFT:
  dinov2: class token + 4 register tokens, LayerScale, pos-embed on patches only (timm no_embed_class)
  siglip: no prefix tokens, no LayerScale
LayerScale's parameter is `scale_factor`, as in the published checkpoints (the official code renames timm's
`gamma`, which Hugging Face loaders would rewrite); the loader also accepts timm's `gamma`.
The feature is the output of the second-to-last block with prefix tokens dropped and no final norm
(Prismatic's `get_intermediate_layers(n={depth - 2})`). Only blocks 0..depth-2 are built; the last
block, the final norm and SigLIP's attention-pool head of a checkpoint are not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, N, D]
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, d]
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, timm's default


def add_layer_norm(x, r, scale, weight, bias, eps: float):
    """A block's residual update followed by the next LayerNorm, as the blocks compute it: x + r * scale
    (LayerScale's product, rounded, then the sum; scale None: x + r), then F.layer_norm.
    x, r: [..., D]; scale, weight, bias: [D] -> (updated residual, normalized)."""
    x = x + (r if scale is None else r * scale)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), 1e-5))  # published key `...ls1.scale_factor`

    def forward(self, x):
        return x * self.scale_factor


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.heads)
        self.ls1 = LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_dim)
        self.ls2 = LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x):  # x: [B, 3, H, W] -> [B, N, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d))
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.num_registers:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.feature_depth))

    @property
    def num_prefix(self) -> int:
        return int(self.cfg.class_token) + self.cfg.num_registers

    def forward(self, x):  # x: [B, 3, 224, 224] normalized -> [B, 256, D] patch features
        x = self.patch_embed(x) + self.pos_embed
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.num_registers:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x[:, self.num_prefix:]

    @staticmethod
    def unused_checkpoint_keys(cfg: ViTConfig) -> list[str]:
        """Key prefixes of a published checkpoint's tower that inference never uses: the last block, the
        final norm and (SigLIP) the attention-pool head; tests/fixtures/oft_7b_keys.txt lists every key."""
        return [f"blocks.{cfg.depth - 1}.", "norm."] + (["attn_pool."] if cfg.family == "siglip" else [])
