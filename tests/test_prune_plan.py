"""The pruning plan driven by hand-made attention: exact token sets per rule and their union, batching.

A toy layout: 2 cameras x 6 patches (visual slots 0..11 at positions 1..12), proprio at 13, prompt tokens
from 14, then 3 tail tokens (placeholders + stop). 4 layers: static scoring after layers 0 and 1,
importance at layers 0 and 2, a dynamic cut after layer 2.
"""

import math

import numpy as np
import pytest
import torch

from vla_accel.model.llama import keep_tokens
from vla_accel.prune.config import DynamicConfig, LayerSchedule, StaticConfig
from vla_accel.prune.plan import Dims, PrunePlan
from vla_accel.prune.static import CHANGED, GLOBAL, LOCAL

DIMS = Dims(num_layers=4, hidden=8, intermediate=16, num_images=2, patches_per_image=6, num_tail=3)
SCHED = LayerSchedule(static_layers=(0, 1), score_layers=(0, 2), dynamic_layers=(2,))
STATIC = StaticConfig(layers=(0, 1), topk=(1, 1), topk_fine=(1, 1), first_factor=2, query_skip=1,
                      global_topk=(1, 1))
DYNAMIC = DynamicConfig(layers=(2,), score_layers=(0, 2), keep_ratio=0.6, min_visual=2, ema_alpha=0.5,
                        rank_weight_max=1.0, rank_weight_min=0.0, depth_sharpness=10.0)

# attention mass per visual slot at each scored layer (the same for both samples); absent slots are ignored
MASS = {
    0: [0.10, 0.40, 0.30, 0.20, 0.05, 0.01, 0.05, 0.02, 0.50, 0.30, 0.01, 0.03],
    1: {0: 0.1, 1: 0.5, 2: 0.2, 7: 0.1, 8: 0.05, 9: 0.2, 10: 0.3},
    2: {0: 0.3, 1: 0.1, 7: 0.2, 8: 0.1, 10: 0.4},
}


def mass_for(layer, positions, key_mask):
    values = MASS[layer]
    values = dict(enumerate(values)) if isinstance(values, list) else values
    out = torch.zeros(positions.shape)
    for b in range(positions.shape[0]):
        for j in range(positions.shape[1]):
            slot = int(positions[b, j]) - 1
            if (key_mask is None or key_mask[b, j]) and slot in values:
                out[b, j] = values[slot]
    return out


def slots(mask) -> set:
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.fixture(scope="module")
def driven():
    """Sample 0: prompt length 4, K = 1 per camera. Sample 1: prompt length 6, K = 0 (local rule off).
    Both: changed = {0, 10}, global (previous inference) = {7}."""
    lens = torch.tensor([4, 6])
    similarity = torch.ones(2, 12)
    similarity[:, [0, 10]] = 0.5  # changed; every other patch static, and the cap (6) lets all of them go
    global_prev = torch.zeros(2, 12, dtype=torch.bool)
    global_prev[:, 7] = True
    plan = PrunePlan(DIMS, SCHED, static=STATIC, dynamic=DYNAMIC, prompt_lens=lens,
                     k_local=torch.tensor([[1, 1], [0, 0]]), similarity=similarity,
                     max_static=torch.tensor([[6, 6], [6, 6]]), global_prev=global_prev)
    total = lens + 12 + 1 + 3  # BOS + prompt[1:] + 12 patches + proprio + 3 tail
    S = int(total.max())
    positions = torch.arange(S)[None].expand(2, S)
    key_mask = positions < total[:, None]
    h = positions[..., None].float().expand(2, S, DIMS.hidden).clone()  # h carries its own position
    rows, seen = {}, {}
    for i in range(DIMS.num_layers):  # a minimal executor on the padded layout (the reference's keep_tokens)
        keep = plan.keep(i)
        if keep is not None:
            h, positions, key_mask = keep_tokens(h, keep)
        seen[i] = (h, positions, key_mask)
        r = plan.rows(i)
        if r is not None:
            rows[i] = (torch.from_numpy(r.index), torch.from_numpy(r.valid))
            plan.scores(i, mass_for(i, positions, key_mask))
    return plan, rows, seen


def test_static_sets_per_stage(driven):
    plan, _, _ = driven
    # sample 0, after layer 0: changed {0,10} | global {7} | top-2 per camera {1,2} and {8,9}
    assert slots(plan.keep_visual[0][0]) == {0, 1, 2, 7, 8, 9, 10}
    # after layer 1: top-1 of layer 0 ({1}, {8}) | top-1 of layer 1 among present ({1}, {10}) | changed | global
    assert slots(plan.keep_visual[1][0]) == {0, 1, 7, 8, 10}
    # sample 1 (no local rule): changed | global only
    assert slots(plan.keep_visual[0][1]) == {0, 7, 10}
    assert slots(plan.keep_visual[1][1]) == {0, 7, 10}


def test_rules_fates_and_global_history(driven):
    plan, _, _ = driven
    rules = plan.rules.tolist()
    assert {s: r for s, r in enumerate(rules[0]) if r} == {0: CHANGED, 1: LOCAL, 7: GLOBAL, 8: LOCAL,
                                                           10: CHANGED | LOCAL}
    assert {s: r for s, r in enumerate(rules[1]) if r} == {0: CHANGED, 7: GLOBAL, 10: CHANGED}
    fate = plan.dropped_after.tolist()
    assert {s: f for s, f in enumerate(fate[0]) if f != -1} == {3: 0, 4: 0, 5: 0, 6: 0, 11: 0, 2: 1, 9: 1,
                                                                1: 2, 8: 2}
    assert {s: f for s, f in enumerate(fate[1]) if f != -1} == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 8: 0, 9: 0,
                                                                11: 0, 7: 2}
    # next inference's global set: top-1 per camera of the last scoring layer among present tokens
    assert slots(plan.global_next[0]) == {1, 10}
    assert slots(plan.global_next[1]) == {0, 10}


def test_importance_and_dynamic_cut(driven):
    plan, _, _ = driven
    lw = lambda layer: 1 / (1 + math.exp(-10 * (4 - layer)))  # noqa: E731  sigmoid(sharpness * (L - l))
    # sample 0, layer 0 rank weights (1 - r/5 per camera): slot0 0.4, 1 1.0, 7 0.2, 8 1.0, 10 0.0
    # layer 2 among present: cam0 {0: 1.0, 1: 0.0}, cam1 {10: 1.0, 7: 0.5, 8: 0.0}; EMA with alpha 0.5 from 0
    exp0 = {0: 0.1 * lw(0) + 0.5 * lw(2), 1: 0.25 * lw(0), 7: 0.05 * lw(0) + 0.25 * lw(2), 8: 0.25 * lw(0),
            10: 0.5 * lw(2)}
    for s, v in exp0.items():
        assert plan.importance[0, s].item() == pytest.approx(v, rel=1e-6)
    # keep floor(0.6 * 5) = 3 of sample 0's 5: {0, 10, 7}; sample 1 keeps max(2, floor(0.6 * 3)) = 2: {0, 10}
    assert slots(plan.keep_visual[2][0]) == {0, 7, 10}
    assert slots(plan.keep_visual[2][1]) == {0, 10}


def test_rows_and_compaction(driven):
    plan, rows, seen = driven
    # layer 0, prompt rows after query_skip=1: positions 15, 16 (sample 0) and 15..18 (sample 1)
    idx, valid = rows[0]
    assert idx[0][valid[0]].tolist() == [15, 16] and idx[1][valid[1]].tolist() == [15, 16, 17, 18]
    # layer 1: the same tokens, now behind 7 (sample 0) and 3 (sample 1) visual tokens
    idx, valid = rows[1]
    assert idx[0][valid[0]].tolist() == [10, 11] and idx[1][valid[1]].tolist() == [6, 7, 8, 9]
    # layer 2 (importance only): every non-visual token: proprio + prompt[1:] + 3 tail
    assert rows[2][1].sum(1).tolist() == [1 + 3 + 3, 1 + 5 + 3]
    # entering layer 3: kept tokens in original order, re-padded, carrying their own rows of h
    h, pos, mask = seen[3]
    assert pos[0][mask[0]].tolist() == [0, 1, 8, 11] + list(range(13, 20))
    assert pos[1][mask[1]].tolist() == [0, 1, 11] + list(range(13, 22))
    assert torch.equal(h[..., 0][mask], pos[mask].float())
    assert np.array_equal(plan.kept[3].positions, pos.numpy()) and np.array_equal(plan.kept[3].valid, mask.numpy())


def test_summary_counts_and_flops(driven):
    plan, _, _ = driven
    s0, s1 = plan.summary()
    assert s0["kept_per_layer"] == [20, 15, 13, 11] and s1["kept_per_layer"] == [22, 13, 13, 12]
    assert s0["kept_per_camera"] == [1, 2] and s1["kept_per_camera"] == [1, 1]
    assert s0["kept_static_per_camera"] == [2, 3] and s1["kept_static_per_camera"] == [1, 2]
    assert s0["kept_by_rule"] == {"changed": 2, "global": 1, "local": 3}
    # per layer 1280 n + 32 n^2 (D = 8, I = 16); score rows 16 * R * n: 2 x 20, 2 x 15, 7 x 13
    full = 4 * (1280 * 20 + 32 * 400)
    pruned = sum(1280 * n + 32 * n * n for n in (20, 15, 13, 11)) + 16 * (2 * 20 + 2 * 15 + 7 * 13)
    assert (s0["flops_full"], s0["flops"]) == (full, pruned)
    assert s0["flops_ratio"] == pytest.approx(pruned / full)
