"""SpecPrune on the tiny model: no-op equality, pruned forward = plain layers on the kept subset, and the
cheap scores = full attention matrices."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import vla_accel
from vla_accel.policy import ChunkedActor
from vla_accel.prune import SpecPrune, SpecPruneConfig
from vla_accel.prune.plan import PrunePlan, plan_for_batch

from test_prune_config import CONFIG_DIR

INSTRUCTIONS = ["put the bowl on the plate", "open the top drawer of the cabinet and put the bowl inside"]
# fp32 throughout; the pruned and the reference forward run the same ops on the same tokens, only padding /
# batch composition changes the summation order inside SDPA and matmuls
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", seed=3)


def make_obs(seed):
    rng = np.random.default_rng(seed)
    return {"full_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
            "state": rng.uniform(-0.1, 0.1, 8)}


def specprune_cfg(**changes) -> SpecPruneConfig:
    d = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "specprune.yaml"))
    for key, value in changes.items():
        part, field = key.split("__")
        d[part][field] = value
    return SpecPruneConfig.from_dict(d)


def test_disabled_pruning_equals_plain_actor(policy):
    cfg = specprune_cfg(static__enabled=False, dynamic__enabled=False)
    pruned, plain = SpecPrune(policy, cfg), ChunkedActor(policy)
    pruned.reset([0, 1])
    plain.reset([0, 1])
    for t in range(9):  # two queries per stream
        obs = [make_obs(2 * t), make_obs(2 * t + 1)]
        a, infos = pruned.act_batch(obs, INSTRUCTIONS, [0, 1])
        b, _ = plain.act_batch(obs, INSTRUCTIONS, [0, 1])
        assert np.array_equal(a, b)
        if infos[0]["queried"]:
            assert infos[0]["tokens_kept"] == infos[0]["tokens_full"] and infos[0]["flops_ratio"] == 1.0


def test_keep_everything_static_equals_plain_predict(policy):
    # scores are computed and the plan runs, but no patch may be dropped (cap 0) and nothing is cut deeper
    cfg = specprune_cfg(dynamic__enabled=False)
    cfg.static.changed.max_static = (0, 0)
    cfg.static.changed.max_static_fine = (0, 0)
    actor = SpecPrune(policy, cfg)
    obs = make_obs(7)
    assert np.array_equal(actor.predict(obs, INSTRUCTIONS[0]), policy.predict(obs, INSTRUCTIONS[0]))
    assert actor.last_info["kept_per_camera"] == [256, 256]


def reference_forward(policy, ids, pixels, proprio, kept: dict[int, torch.Tensor]):
    """One sample, plain layers: all tokens until a layer listed in `kept`, then only the tokens at those
    original positions (RoPE at the original positions). -> normalized actions [1, 8, 7]."""
    model, llm = policy.model, policy.model.llm
    ids_t, lens = policy.batch_ids([ids])
    seq = model.assemble(ids_t, lens, model.encode_images(pixels[None]), proprio[None])
    h, pos = seq.embeds, seq.positions
    for i, layer in enumerate(llm.layers):
        if i in kept:
            sel = torch.isin(pos[0], kept[i])
            h, pos = h[:, sel], pos[:, sel]
        cos, sin = llm.rope(pos, h.dtype)
        h, _ = layer(h, cos, sin, None)
    h = llm.norm(h)
    # 56 action states: from the 29871 token (58th from last) to one before the last placeholder
    return model.action_head(h[:, -58:-2]).float()


@torch.inference_mode()
def test_pruned_forward_equals_plain_layers_on_kept_subset(policy):
    cfg = specprune_cfg()
    actor = SpecPrune(policy, cfg)
    ids, pixels, props = policy.prepare([make_obs(11), make_obs(12)], INSTRUCTIONS)
    g = torch.Generator().manual_seed(0)
    changed = torch.rand(2, 512, generator=g) < torch.tensor([[0.15], [0.35]])
    global_prev = torch.rand(2, 512, generator=g) < 0.05
    _, lens = policy.batch_ids(ids)
    plan = plan_for_batch(cfg, actor.schedule, actor.dims, lens, k_local=torch.tensor([[16, 12], [25, 19]]),
                          similarity=(~changed).double(), max_static=torch.tensor([[200, 200], [220, 220]]),
                          global_prev=global_prev)
    got, _ = policy.predict_from_inputs(ids, pixels, props, decisions=plan)
    counts = [s["kept_per_layer"] for s in plan.summary()]
    assert counts[0] != counts[1] and counts[0][-1] < counts[0][0]  # pruned, and differently per sample
    for b in range(2):
        kept = {}
        for i, k in plan.kept.items():
            kept[i] = torch.from_numpy(k.positions[b, :k.counts[b]])
            assert torch.all(kept[i][1:] > kept[i][:-1])  # original order
            assert int((kept[i] > 512).sum()) == int(lens[b]) + 57  # every non-visual token survives
        assert len(kept) == len(plan.prune_layers)
        want = reference_forward(policy, ids[b], pixels[b], props[b], kept)
        torch.testing.assert_close(got[b:b + 1], want, **TOL)


@torch.inference_mode()
def test_cheap_scores_equal_full_attention_matrices(policy):
    cfg = specprune_cfg()
    actor = SpecPrune(policy, cfg)
    ids, pixels, props = policy.prepare([make_obs(21), make_obs(22)], INSTRUCTIONS)
    _, lens = policy.batch_ids(ids)
    similarity = torch.ones(2, 512)
    similarity[0, :100] = 0.0
    plan = PrunePlan(actor.dims, actor.schedule, static=cfg.static, dynamic=cfg.dynamic, prompt_lens=lens,
                     k_local=torch.tensor([[16, 12], [16, 12]]), similarity=similarity,
                     max_static=torch.tensor([[200, 200], [200, 200]]))
    llm = policy.model.llm
    inputs = {}  # what entered each scored layer: hidden states and the cos / sin of the positions
    hooks = [llm.layers[i].register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[:3]))
             for i in plan.score_layers]
    try:
        policy.predict_from_inputs(ids, pixels, props, decisions=plan)
    finally:
        for hk in hooks:
            hk.remove()
    assert plan.score_layers == [0, 1, 3]
    for i in plan.score_layers:
        h, cos, sin = inputs[i]
        prior = [j for j in plan.kept if j <= i]  # the tokens entering layer i: the latest Keep, else all
        if prior:
            k = plan.kept[max(prior)]
            pos, mask = torch.from_numpy(k.positions), None if k.uniform else torch.from_numpy(k.valid)
        else:
            total = lens + 570
            pos = torch.arange(int(total.max()))[None].expand(2, -1)
            mask = None if bool((total == total.max()).all()) else pos < total[:, None]
        layer = llm.layers[i]
        q, k, _ = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
        logits = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5  # [B, H, S, S]: the full matrices
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = logits.softmax(-1).mean(1)  # [B, S, S], mean over heads
        for b in range(2):
            valid = mask[b] if mask is not None else torch.ones_like(pos[b], dtype=torch.bool)
            P = int(lens[b])
            if i in cfg.static.layers:  # prompt tokens 1 + 9 .. P - 1 sit at positions 512 + 11 .. 512 + P
                rows = valid & (pos[b] >= 523) & (pos[b] <= 512 + P)
                assert int(rows.sum()) == P - 10
            else:  # every token after the 512 patches: proprio, prompt, 56 placeholders, stop
                rows = valid & (pos[b] >= 513)
                assert int(rows.sum()) == P + 57
            per_key = att[b][rows].mean(0)  # [S]
            vis = valid & (pos[b] >= 1) & (pos[b] <= 512)
            want = torch.full((512,), float("-inf"))
            want[pos[b][vis] - 1] = per_key[vis]
            torch.testing.assert_close(plan.visual_scores[i][b], want, atol=1e-7, rtol=1e-5)
    assert not plan.kept[2].uniform  # layer 3 ran on a padded, pruned batch
