"""Each SpecPrune rule alone on hand-made inputs: changed patches, frame gap, top-K, importance, controller."""

import numpy as np
import pytest
import torch

from vla_accel.prune.changed import frame_gap, patch_similarity
from vla_accel.prune.config import ControllerConfig
from vla_accel.prune.controller import ActionController
from vla_accel.prune.dynamic import dynamic_keep, keep_count, rank_weights, update_importance
from vla_accel.prune.flops import backbone_flops, layer_flops
from vla_accel.prune.overlay import overlay_image
from vla_accel.prune.static import CHANGED, GLOBAL, LOCAL, changed_with_cap, topk_per_camera


def ids(mask) -> set:
    return set(np.flatnonzero(np.asarray(mask)).tolist())


# ---------------------------------------------------------------- changed patches
def test_patch_similarity_flags_exactly_the_changed_patches():
    rng = np.random.default_rng(0)
    prev = rng.integers(20, 230, (224, 224, 3), dtype=np.uint8)
    cur = prev.copy()
    cur[14 * 2:14 * 3, 14 * 5:14 * 6] = 255 - cur[14 * 2:14 * 3, 14 * 5:14 * 6]  # patch row 2, col 5 = 37
    cur[14 * 15:, 14 * 15:] = 0                                                   # patch 255 -> black
    sim = patch_similarity(cur, prev)
    assert sim.shape == (256,)
    assert ids(sim < 0.986) == {37, 255}
    assert np.all(sim[[p for p in range(256) if p not in (37, 255)]] == pytest.approx(1.0))
    # uniform scaling keeps the direction: cosine 1 (the rule looks at pattern, not brightness)
    assert patch_similarity((prev // 2) * 2, prev // 2)[0] == pytest.approx(1.0)
    black = np.zeros((28, 28, 3), np.uint8)
    assert patch_similarity(black, black).tolist() == [1.0] * 4


def test_changed_rule_cap_prefers_least_similar_then_most_attended():
    # one camera of 8 patches (+ a second camera of 8 with nothing static); threshold 0.986
    sim = torch.tensor([[0.99, 0.5, 1.0, 0.987, 0.986, 0.9859, 1.0, 1.0] + [0.1] * 8], dtype=torch.float64)
    att = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.05] + [0.0] * 8])
    cap = lambda c: torch.tensor([[c, 8]])  # noqa: E731
    changed = lambda c: ids(changed_with_cap(sim, att, 0.986, cap(c), 2)[0, :8])  # noqa: E731
    # static: 0, 2, 3, 4, 6, 7 (six); changed for sure: 1, 5
    assert changed(8) == changed(6) == {1, 5}
    # cap 4: two static patches stay: the least similar, 4 (0.986) and 3 (0.987)
    assert changed(4) == {1, 5, 4, 3}
    # cap 2: next 0 (0.99), then among the identical ones (2, 6, 7 at 1.0) the most attended, 6 (0.7)
    assert changed(2) == {1, 5, 4, 3, 0, 6}
    assert changed(1) == {1, 5, 4, 3, 0, 6, 2}
    assert changed(0) == set(range(8))
    # absent tokens (-inf) are the last to be exempted among equals
    att2 = att.clone()
    att2[0, 6] = float("-inf")
    assert ids(changed_with_cap(sim, att2, 0.986, cap(2), 2)[0, :8]) == {1, 5, 4, 3, 0, 2}


@pytest.mark.parametrize("moved, expected", [
    (0.0, 6),    # int(7.33) + 3 = 10 -> capped at 6
    (3.0, 6),    # int(4.67) + 3 = 7 -> 6
    (5.0, 5),    # int(2.89) + 3
    (7.0, 4),    # int(1.11) + 3
    (9.0, 3),    # int(-0.67) = 0 -> 3
    (12.0, 1),   # int(-3.33) = -3 -> 0 -> clamped to gap_min 1
])
def test_frame_gap(moved, expected):
    assert frame_gap(moved, 1, 6) == expected


# ---------------------------------------------------------------- local top-K
def test_topk_per_camera_with_absent_tokens_and_per_sample_k():
    ninf = float("-inf")
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.9, ninf, 0.5, 0.6],
                           [0.1, 0.4, 0.3, 0.2, 0.9, ninf, 0.5, 0.6]])
    k = torch.tensor([[2, 1], [0, 5]])
    sel = topk_per_camera(scores, k, n_cams=2)
    assert ids(sel[0]) == {1, 2, 4}
    assert ids(sel[1]) == {4, 6, 7}  # k larger than the present tokens: all present ones, never the absent


# ---------------------------------------------------------------- dynamic importance
def test_rank_weights_ema_and_keep():
    # one camera of 4 slots (+ a second camera of 4): present 0, 1, 2 and 4, 5
    scores = torch.tensor([[0.2, 0.5, 0.1, 9.0, 0.3, 0.1, 0.0, 0.0]])
    pres = torch.tensor([[True, True, True, False, True, True, False, False]])
    w = rank_weights(scores, pres, 2, w_max=1.0, w_min=0.0)
    # cam 0: ranks 1 (0.5), 0 (0.2), 2 (0.1) of n=3 -> 1.0, 0.5, 0.0; cam 1: 4 then 5 of n=2 -> 1.0, 0.0
    assert w.tolist() == [[0.5, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    imp = torch.full((1, 8), 0.4)
    new = update_importance(imp, scores, pres, 2, alpha=0.5, weight=1.0, w_max=1.0, w_min=0.0)
    # imp + 0.5 * (w - imp) where present; 0.4 elsewhere
    assert new[0].tolist() == pytest.approx([0.45, 0.7, 0.2, 0.4, 0.7, 0.2, 0.4, 0.4])
    # keep floor(0.6 * 5) = 3 of the 5 present: 0.7 (1), 0.7 (4), 0.45 (0)
    assert ids(dynamic_keep(new, pres, 0.6, 0)[0]) == {0, 1, 4}
    assert ids(dynamic_keep(new, pres, 0.6, 4)[0]) == {0, 1, 4, 2}  # floor of 4 (tie 2 / 5 -> lower slot)
    assert keep_count(torch.tensor([100, 70, 60, 40]), 0.8, 60).tolist() == [80, 60, 60, 40]


# ---------------------------------------------------------------- controller
FAST = [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1]   # v = 0.5: coarse
SLOW = [0.1, 0.1, 0.0, 0.0, 0.0, 0.0, -1]   # v = 0.14 < 0.4: fine
UP = [0.5, 0.0, 0.3, 0.0, 0.0, 0.0, -1]     # v_z = 0.3 > 0.2: leaves fine
TURN = [0.5, 0.0, 0.0, 0.4, 0.0, 0.0, -1]   # v = 0.5 (no entry), v_rot = 0.4 > 0.3: leaves fine at a boundary
XYZ_SMALL = [0.05, 0.05, -0.5, 0.1, 0.0, 0.0, -1]  # v = 0.5 but v_xy, v_z, v_rot small: fine


def run(ctrl, script):
    """script: (action, queue_empty) pairs -> list of (mode after, flush)."""
    return [(ctrl.observe(np.array(a, float), q), ctrl.mode)[::-1] for a, q in script]


def test_controller_script():
    c = ActionController(ControllerConfig(warmup_steps=2))
    out = run(c, [(SLOW, False), (SLOW, False),           # warm-up: counted, mode stays coarse
                  (FAST, False),                          # coarse
                  (SLOW, False),                          # coarse -> fine with actions queued: flush
                  (FAST, False),                          # fine stays (no z / rot trigger)
                  (TURN, False),                          # rotation but not at a boundary: stays fine
                  (TURN, True),                           # rotation at a chunk boundary: coarse
                  (XYZ_SMALL, True),                      # fine via the xy/z/rot rule; queue empty: no flush
                  (UP, False),                            # z up: coarse
                  (FAST, True)])
    assert out == [("coarse", False), ("coarse", False), ("coarse", False), ("fine", True), ("fine", False),
                   ("fine", False), ("coarse", False), ("fine", False), ("coarse", False), ("coarse", False)]
    c.reset()
    assert c.mode == "coarse" and c.steps == 0


def test_controller_off_and_no_flush():
    assert run(ActionController(ControllerConfig(enabled=False, warmup_steps=0)), [(SLOW, False)]) == \
        [("coarse", False)]
    assert run(ActionController(ControllerConfig(flush_on_fine=False, warmup_steps=0)), [(SLOW, False)]) == \
        [("fine", False)]


# ---------------------------------------------------------------- FLOPs and overlay
def test_flops_formula():
    # D = 2, I = 3, n = 5: 2*5*(4*4 + 3*2*3) + 4*5*5*2 = 340 + 200
    assert layer_flops(5, 2, 3) == 540
    # one layer of 5 tokens scoring 2 rows (2*2*5*2 = 40) + one of 3 tokens: 2*3*34 + 4*9*2 = 204 + 72
    assert backbone_flops([5, 3], 2, 3, [2, 0]) == 540 + 40 + 276


def test_overlay_marks_fates():
    img = np.full((28, 28, 3), 100, np.uint8)  # 4 patches of 14 px
    rules = np.array([LOCAL, CHANGED | GLOBAL, 0, CHANGED], np.uint8)
    fate = np.array([-1, -1, 1, 5])  # kept, kept, dropped after static layer 1, dropped after layer 5
    out = overlay_image(img, rules, fate, static_layers=(0, 1), alpha=0.5).astype(int)
    inner = lambda p: out[(p // 2) * 14 + 7, (p % 2) * 14 + 7]  # noqa: E731
    assert inner(0).tolist() == [73, 152, 106]        # 0.5*100 + 0.5*(46, 204, 113): local green
    assert inner(1).tolist() == [171, 128, 59]        # global orange wins over changed
    assert inner(2).tolist() == [33, 33, 33]          # dimmed to a third
    assert inner(3).tolist() == [62, 62, 62]          # 0.5 * (0.5*100 + 0.5*150): grey, half dimmed
    assert out[0, 0].tolist() == [46, 204, 113]       # kept patches are outlined
