"""Backbone weights in the runner's layout: Q|K|V and gate|up concatenated once, at build time.

    layers = fuse_backbone(model.llm, share=True)   # [LayerWeights] per decoder layer

share=True makes the fused buffer the storage of the model's own parameters: q_proj / k_proj / v_proj (and
gate_proj / up_proj) become row views of it, so the reference model keeps working on the same numbers and
the 7B needs no second copy (~9 GB). The values never change; only where they live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerWeights:
    qkv: torch.Tensor  # [3D, D]  rows: q, k, v
    o: torch.Tensor  # [D, D]
    gu: torch.Tensor  # [2I, D]  rows: gate, up
    down: torch.Tensor  # [D, I]
    ln1: torch.Tensor  # [D] input_layernorm
    ln2: torch.Tensor  # [D] post_attention_layernorm


def fuse_rows(linears: list[nn.Linear], share: bool) -> torch.Tensor:
    """cat of the linears' weights along the output rows; with share, each linear's weight becomes a view."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("fuse_rows: biases are not supported (Llama projections have none)")
    weights = [lin.weight.detach() for lin in linears]
    if _adjacent(weights):  # fused before (an earlier runner on this model): reuse the common storage
        base = weights[0]
        return base.as_strided((sum(w.shape[0] for w in weights), base.shape[1]), (base.shape[1], 1))
    with torch.no_grad():
        fused = torch.cat(weights, dim=0)
    if share:
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[row:row + n], requires_grad=lin.weight.requires_grad)
            row += n
    return fused


def _adjacent(weights: list[torch.Tensor]) -> bool:
    """True when the weights already lie back to back in one storage, in order."""
    base, off = weights[0], 0
    for w in weights:
        if (not w.is_contiguous() or w.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
                or w.data_ptr() != base.data_ptr() + off * w.element_size()):
            return False
        off += w.numel()
    return True


def layer_scale(module: nn.Module) -> torch.Tensor | None:
    """A tower block's layer scale (LayerScale's one parameter) or None (nn.Identity: no layer scale)."""
    return next(module.parameters(), None)


def fuse_backbone(llm, share: bool = True) -> list[LayerWeights]:
    out = []
    for layer in llm.layers:
        a, m = layer.self_attn, layer.mlp
        out.append(LayerWeights(
            qkv=fuse_rows([a.q_proj, a.k_proj, a.v_proj], share),
            o=a.o_proj.weight,
            gu=fuse_rows([m.gate_proj, m.up_proj], share),
            down=m.down_proj.weight,
            ln1=layer.input_layernorm.weight,
            ln2=layer.post_attention_layernorm.weight,
        ))
    return out
