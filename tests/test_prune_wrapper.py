"""SpecPrune as an actor: frame history -> changed patches, history -> global rule, controller -> flush and
fine-mode budgets, per-stream state, the demo on a synthetic trace."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vla_accel
from vla_accel import processing as P
from vla_accel.prune import SpecPrune
from vla_accel.prune.demo import main as demo_main, synthetic_trace, write_trace
from vla_accel.prune.static import GLOBAL

from test_prune_model import INSTRUCTIONS, make_obs, specprune_cfg


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", seed=5)


def slots(mask) -> set:
    return set(np.flatnonzero(np.asarray(mask)).tolist())


def invert_patch(img, p):
    r, c = divmod(p, 16)
    img[14 * r:14 * r + 14, 14 * c:14 * c + 14] = 255 - img[14 * r:14 * r + 14, 14 * c:14 * c + 14]


def test_changed_patches_from_the_frame_t_back():
    # 224 px inputs with crop and JPEG off: the model-input image is the observation itself
    policy = vla_accel.random_policy("tiny", center_crop=False, jpeg=False)
    cfg = specprune_cfg(dynamic__enabled=False)
    cfg.static.changed.gap_fixed = 2  # compare with the previous frame
    cfg.static.changed.max_static = (256, 256)  # every static patch may go: the changed set is exactly the moved
    cfg.controller.enabled = False  # stay coarse: the cap above holds for every query
    actor = SpecPrune(policy, cfg)
    rng = np.random.default_rng(0)
    f0 = {"full_image": rng.integers(30, 220, (224, 224, 3), dtype=np.uint8),
          "wrist_image": rng.integers(30, 220, (224, 224, 3), dtype=np.uint8), "state": np.zeros(8)}
    f1 = {k: np.array(v, copy=True) for k, v in f0.items()}
    invert_patch(f1["full_image"], 5)
    invert_patch(f1["wrist_image"], 7)
    f2 = {k: np.array(v, copy=True) for k, v in f1.items()}
    invert_patch(f2["full_image"], 9)
    got = []
    for obs in (f0, f1, f2):
        actor.predict(obs, INSTRUCTIONS[0])
        got.append(slots(actor.last_plan.changed[0].numpy()))
    assert got[0] == set()  # the first frame is compared with itself
    assert got[1] == {5, 256 + 7}  # f1 vs f0: camera 0 patch 5, camera 1 patch 7
    assert got[2] == {9}  # f2 vs f1 (not f0): only patch 9 of camera 0


def test_model_images_are_the_prepared_inputs(policy):
    actor = SpecPrune(policy, specprune_cfg())
    obs = make_obs(3)
    _, pixels, _ = policy.prepare([obs], INSTRUCTIONS[:1])
    images = actor._model_images(pixels)
    for c, key in enumerate(("full_image", "wrist_image")):
        assert np.array_equal(images[0, c], P.prepare_image(obs[key], 224, True, True))


def test_global_rule_carries_the_previous_top_tokens(policy):
    actor = SpecPrune(policy, specprune_cfg())
    actor.predict(make_obs(1), INSTRUCTIONS[0])
    first = actor.last_plan.global_next[0].numpy().copy()
    assert first[:256].sum() == 16 and first[256:].sum() == 12
    assert actor.last_plan.global_prev.sum() == 0  # nothing before the first inference
    actor.predict(make_obs(2), INSTRUCTIONS[0])
    plan = actor.last_plan
    assert np.array_equal(plan.global_prev[0].numpy(), first)
    assert np.array_equal((plan.rules[0].numpy() & GLOBAL) != 0, first)
    actor.reset()
    actor.predict(make_obs(3), INSTRUCTIONS[0])
    assert actor.last_plan.global_prev.sum() == 0


FAST = np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
SLOW = np.array([0.05, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])


def test_coarse_to_fine_flushes_and_raises_the_budget(policy):
    cfg = specprune_cfg(dynamic__enabled=False)
    cfg.controller.warmup_steps = 0
    actor = SpecPrune(policy, cfg)
    actor.reset([0, 1])
    obs = [make_obs(4), make_obs(5)]
    # step 0: both query (coarse K = 16 / 12); stream 0 runs FAST, stream 1 SLOW -> fine with 7 queued: flush
    _, infos = actor.act_batch(obs, INSTRUCTIONS, [0, 1], executed=np.stack([FAST, SLOW]))
    assert [i["queried"] for i in infos] == [True, True] and [i["mode"] for i in infos] == ["coarse", "coarse"]
    assert actor.last_plan.k_local.tolist() == [[16, 12], [16, 12]]
    assert [i["flushed"] for i in infos] == [False, True]
    assert len(actor.state(0).queue) == 7 and len(actor.state(1).queue) == 0
    # step 1: only stream 1 re-plans, in fine mode (K = 25 / 19, static cap 220)
    _, infos = actor.act_batch(obs, INSTRUCTIONS, [0, 1], executed=np.stack([FAST, SLOW]))
    assert [i["queried"] for i in infos] == [False, True]
    assert infos[1]["mode"] == "fine" and infos[1]["replan"] and infos[1]["batch_size"] == 1
    assert actor.last_plan.k_local.tolist() == [[25, 19]]
    # same frames (no earlier one yet): all 256 static, the fine cap lets 220 go, 36 per camera stay "changed"
    assert infos[1]["static_patches"] == [256, 256] and actor.last_plan.max_static.tolist() == [[220, 220]]
    assert actor.last_plan.changed.view(2, 256).sum(1).tolist() == [36, 36]
    # a reset of stream 1 clears its mode and queue; stream 0 keeps its queue
    actor.reset([1])
    assert actor.state(1).controller.mode == "coarse" and not actor.state(1).queue
    assert len(actor.state(0).queue) == 6


def test_demo_on_a_synthetic_trace(tmp_path, capsys):
    path = write_trace(tmp_path / "synthetic.npz", synthetic_trace(steps=10))
    out = tmp_path / "demo"
    demo_main(["--trace", str(path), "--out", str(out)])
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and [r["step"] for r in rows if r["queried"]] == [0, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["queries"] == 2 and 0 < summary["flops_ratio"] < 1
    assert all(k < f for k, f in zip(summary["tokens_kept"], summary["tokens_full"]))
    png = Image.open(summary["overlays"][0])
    assert png.size == (2 * 448 + 4, 448 + 30)
    assert "backbone FLOPs" in capsys.readouterr().out


def test_batched_query_matches_single_queries(policy):
    """Per-stream decisions do not leak across the batch: two streams in one forward = each alone."""
    cfg = specprune_cfg()
    batched, single = SpecPrune(policy, cfg), SpecPrune(policy, cfg)
    obs = [make_obs(8), make_obs(9)]
    a, infos = batched.act_batch(obs, INSTRUCTIONS, [0, 1])
    for i in range(2):
        single.reset([0])
        b, info = single.act_batch([obs[i]], [INSTRUCTIONS[i]], [0])
        assert info[0]["kept_per_layer"] == infos[i]["kept_per_layer"]
        torch.testing.assert_close(torch.tensor(a[i]), torch.tensor(b[0]), atol=1e-5, rtol=1e-5)
