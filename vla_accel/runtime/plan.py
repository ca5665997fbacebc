"""KeepPlan: a pruning plan given as plain tensors, applied through the llama hook protocol.

    plan = KeepPlan({2: (positions [B, S2], mask [B, S2] | None), 6: (...)})
    model(ids, pixels, proprio, prompt_lens, hook=plan)       # reference
    runner(ids, pixels, proprio, prompt_lens, hook=plan)      # accelerated runtime: the same tokens

Entry i names the ORIGINAL positions of the tokens that enter layer i (right-padded per sample where `mask` is
False; mask None = no padding), as `PrunePlan.kept_positions[i]` / `kept_mask[i]` record them. Kept tokens
keep their order and their RoPE positions. `KeepPlan.from_prune_plan(p)` replays the decisions of a
SpecPrune forward on another executor (how the benchmark checks that both executors compute the same
function on the same pruned sequences).
"""

from __future__ import annotations

import torch


class KeepPlan:
    def __init__(self, keep: dict[int, tuple[torch.Tensor, torch.Tensor | None]], *, max_position: int | None = None,
                 validate: bool = True):
        """max_position: an upper bound of every original position (default: read from `keep` once, here);
        validate=False skips the check that kept positions exist (it reads a flag back from the device:
        a host sync per pruned layer)."""
        if any(int(i) < 1 for i in keep):
            raise ValueError(f"KeepPlan: tokens can be dropped only before layers >= 1; got {sorted(keep)}")
        self.keep = {int(i): v for i, v in keep.items()}
        self.prune_layers = sorted(i - 1 for i in self.keep)  # runner hint: pieces end after these layers
        self.score_layers: list[int] = []
        if max_position is None:
            max_position = max((int(p.max()) for p, _ in self.keep.values()), default=0) + 2048
        self.max_position, self.validate = int(max_position), validate

    @staticmethod
    def from_prune_plan(plan, **kw) -> "KeepPlan":
        return KeepPlan({i: (plan.kept_positions[i], plan.kept_mask.get(i)) for i in plan.kept_positions}, **kw)

    def before_layer(self, i, h, positions, key_mask):
        if i not in self.keep:
            return h, positions, key_mask
        kpos, kmask = self.keep[i]
        kpos = kpos.to(h.device)
        B, S = positions.shape
        # index of each kept original position in the current sequence
        inv = torch.full((B, self.max_position + 2), S, dtype=torch.long, device=h.device)
        valid = torch.ones_like(positions, dtype=torch.bool) if key_mask is None else key_mask
        cur = torch.where(valid, positions, torch.full_like(positions, inv.shape[1] - 1))
        inv.scatter_(1, cur, torch.arange(S, device=h.device).expand(B, S).contiguous())
        idx = inv.gather(1, kpos.clamp(0, inv.shape[1] - 2))
        kvalid = torch.ones_like(kpos, dtype=torch.bool) if kmask is None else kmask.to(h.device)
        if self.validate and bool(((idx >= S) & kvalid).any()):
            raise ValueError(f"KeepPlan: layer {i} keeps positions that are not in the current sequence")
        idx = torch.where(kvalid, idx, torch.zeros_like(idx))
        h = torch.gather(h, 1, idx[..., None].expand(B, idx.shape[1], h.shape[2]))
        return h, kpos, (None if kmask is None else kmask.to(h.device))

    def score_rows(self, i, positions, key_mask):
        return None

    def on_scores(self, i, key_mass, positions, key_mask):  # never asked for (no score rows)
        pass
