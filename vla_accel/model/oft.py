"""OpenVLA-OFT: one forward pass -> the whole normalized action chunk (parallel decoding).

Sequence fed to the Llama backbone, per sample (P = prompt length incl. BOS and the trailing 29871):
    [BOS] [256 third-person patches] [256 wrist patches] [proprio] [prompt[1:P]] [56 zeros] [</s>]
    positions 0 .. P+569; all attention bidirectional.
Action hidden states: the 56 final-norm states starting at the last prompt token (29871), i.e.
    [513 + P - 1, 513 + P - 1 + 56) -- shifted one left of the placeholders, as in training.
Because every non-visual token sits after the visual ones, that window is also "the 58th-from-last
to the 2nd-from-last valid token", which stays true when visual tokens are pruned.

Batches may mix prompt lengths: sequences are right-padded and a key mask hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import OFTConfig
from .heads import FusedMLPProjector, L1RegressionActionHead, ProprioProjector
from .llama import LlamaBackbone
from .vit import ViT


class FusedVisionBackbone(nn.Module):
    """`vision_backbone.featurizer` (DINOv2) + `vision_backbone.fused_featurizer` (SigLIP)."""

    def __init__(self, cfg: OFTConfig):
        super().__init__()
        self.featurizer = ViT(cfg.towers[0])
        self.fused_featurizer = ViT(cfg.towers[1])

    def forward(self, pixels):  # pixels: [B, 6, 224, 224] (3 DINOv2-normalized + 3 SigLIP-normalized)
        a, b = torch.split(pixels, [3, 3], dim=1)
        return torch.cat([self.featurizer(a), self.fused_featurizer(b)], dim=2)  # [B, 256, 2176]


class LanguageModel(nn.Module):
    """`language_model.*`; only `.model` is used (lm_head is not needed for L1 regression)."""

    def __init__(self, cfg: OFTConfig):
        super().__init__()
        self.model = LlamaBackbone(cfg.llm)


@dataclass
class Sequence:
    """The assembled backbone input of a batch."""

    embeds: torch.Tensor  # [B, S, D]
    positions: torch.Tensor  # [B, S] long
    key_mask: torch.Tensor | None  # [B, S] bool, None when no padding
    lengths: torch.Tensor  # [B] valid length per sample


class OpenVLAOFT(nn.Module):
    def __init__(self, cfg: OFTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.llm.hidden
        self.vision_backbone = FusedVisionBackbone(cfg)
        self.projector = FusedMLPProjector(cfg.vision_dim, D)
        self.language_model = LanguageModel(cfg)
        self.proprio_projector = ProprioProjector(D, cfg.proprio_dim)
        self.action_head = L1RegressionActionHead(D, cfg.action_dim, cfg.chunk)

    @property
    def llm(self) -> LlamaBackbone:
        return self.language_model.model

    # ---------------------------------------------------------------- pieces
    def encode_images(self, pixel_values):  # [B, 6*num_images, 224, 224] -> [B, 256*num_images, D]
        images = torch.split(pixel_values, [6] * self.cfg.num_images, dim=1)
        feats = torch.cat([self.vision_backbone(img) for img in images], dim=1)
        return self.projector(feats)

    def assemble(self, input_ids, prompt_lens, patch_embeds, proprio) -> Sequence:
        """input_ids: [B, P_max] prompts (BOS ... 29871), right-padded; prompt_lens: [B];
        patch_embeds: [B, 512, D]; proprio: [B, 8] normalized."""
        B, P_max = input_ids.shape
        D, A = self.cfg.llm.hidden, self.cfg.num_action_tokens
        dev, dtype = patch_embeds.device, patch_embeds.dtype
        prompt_lens = torch.as_tensor(prompt_lens).cpu()  # (read on the host: no device round trips)
        tok = self.llm.embed_tokens(input_ids).to(dtype)  # [B, P_max, D]
        prop = self.proprio_projector(proprio.to(dtype))[:, None]  # [B, 1, D]
        stop = self.llm.embed_tokens.weight[self.cfg.stop_id].to(dtype)
        n_vis = patch_embeds.shape[1] + 1
        lengths = prompt_lens + n_vis + A + 1  # BOS + patches + proprio + prompt[1:] + 56 + stop
        S = int(lengths.max())
        embeds = torch.zeros(B, S, D, dtype=dtype, device=dev)  # placeholders stay zero
        embeds[:, 0] = tok[:, 0]
        embeds[:, 1:1 + n_vis] = torch.cat([patch_embeds, prop], dim=1)
        for b in range(B):  # prompt tokens after BOS, then the stop token, at per-sample offsets
            p = int(prompt_lens[b])
            embeds[b, 1 + n_vis:n_vis + p] = tok[b, 1:p]
            embeds[b, int(lengths[b]) - 1] = stop
        positions = torch.arange(S, device=dev)[None].expand(B, S)
        lengths_dev = lengths.to(dev)
        key_mask = None
        if bool((lengths != S).any()):
            key_mask = positions < lengths_dev[:, None]
        return Sequence(embeds, positions, key_mask, lengths_dev)

    def action_window(self, hidden, key_mask):
        """hidden: [B, S', D] final-norm states -> [B, 56, D] (works on pruned sequences)."""
        B, S, D = hidden.shape
        A = self.cfg.num_action_tokens
        valid = torch.full((B,), S, device=hidden.device) if key_mask is None else key_mask.sum(1)
        start = valid - A - 2  # the 29871 token: window ends one before the last placeholder
        idx = start[:, None] + torch.arange(A, device=hidden.device)[None]
        return torch.gather(hidden, 1, idx[..., None].expand(B, A, D))

    # ---------------------------------------------------------------- forward
    def describe(self) -> dict:
        return {"executor": "reference"}

    def forward(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        """The reference executor (vla_accel.protocols.Executor): prompt_lens [B] (host; None: every prompt fills
        input_ids); decisions: PruneDecisions or None.
        -> (normalized actions [B, 8, 7] fp32, action hidden states [B, 56, D])."""
        if prompt_lens is None:
            prompt_lens = torch.full((input_ids.shape[0],), input_ids.shape[1])
        seq = self.assemble(input_ids, prompt_lens, self.encode_images(pixel_values), proprio)
        hidden, _, key_mask = self.llm(seq.embeds, seq.positions, seq.key_mask, decisions=decisions)
        act_h = self.action_window(hidden, key_mask)
        return self.action_head(act_h).float(), act_h
