"""The plain PyTorch OpenVLA-OFT against transformers' Llama and hand-built layout expectations."""

import pytest
import torch

from vla_accel import random_policy
from vla_accel.model.config import LlamaConfig, OFTConfig, oft_7b, oft_tiny
from vla_accel.model.llama import LlamaBackbone, key_mass_from_rows
from vla_accel.model.oft import OpenVLAOFT

# fp32 on CPU: identical math up to summation order.
FP32 = dict(rtol=1e-5, atol=1e-5)


def _backbone(cfg, seed=0):
    torch.manual_seed(seed)
    m = LlamaBackbone(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("seq", [1, 37, 83])
def test_backbone_equals_transformers_llama_with_bidirectional_mask(seq):
    from transformers import LlamaConfig as HFConfig, LlamaModel

    cfg = LlamaConfig(hidden=64, layers=3, heads=4, kv_heads=4, intermediate=172, vocab=100, rms_eps=1e-6)
    ours = _backbone(cfg)
    hf = LlamaModel(HFConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=172, vocab_size=100, rms_norm_eps=1e-6, rope_theta=10000.0,
                             attn_implementation="sdpa")).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randn(2, seq, 64)
    pos = torch.arange(seq)[None].expand(2, seq)
    bidirectional = torch.zeros(2, 1, seq, seq)  # explicit: every query sees every key
    with torch.no_grad():
        ref = hf(inputs_embeds=x, attention_mask=bidirectional, position_ids=pos).last_hidden_state
        out, _, _ = ours(x, pos)
        causal = hf(inputs_embeds=x, position_ids=pos).last_hidden_state
    torch.testing.assert_close(out, ref, **FP32)
    if seq > 1:  # the stock (causal) model differs: the mask matters
        assert (out - causal).abs().max() > 1e-3


def test_padding_mask_isolates_samples():
    cfg = LlamaConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, vocab=50)
    m = _backbone(cfg)
    x = torch.randn(1, 10, 32)
    pos = torch.arange(10)[None]
    alone, _, _ = m(x, pos)
    padded = torch.cat([x, torch.randn(1, 5, 32)], dim=1)
    key_mask = torch.arange(15)[None] < 10
    out, _, _ = m(padded, torch.arange(15)[None], key_mask)
    torch.testing.assert_close(out[:, :10], alone, **FP32)


def test_key_mass_from_rows_equals_full_attention_matrix():
    torch.manual_seed(1)
    B, H, S, d = 2, 3, 20, 8
    q, k = torch.randn(B, H, S, d), torch.randn(B, H, S, d)
    rows = torch.tensor([[3, 7, 9], [15, 16, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    full = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)  # [B, H, S, S]
    expect = torch.stack([full[0][:, [3, 7, 9]].mean((0, 1)), full[1][:, [15, 16]].mean((0, 1))])
    torch.testing.assert_close(key_mass_from_rows(q, k, None, rows, valid), expect, **FP32)


def test_7b_config_matches_published_sizes():
    cfg = oft_7b()
    dino, siglip = cfg.towers
    assert (dino.width, dino.depth, dino.heads, dino.mlp_dim, dino.num_registers) == (1024, 24, 16, 4096, 4)
    assert (siglip.width, siglip.depth, siglip.heads, siglip.mlp_dim, siglip.num_registers) == (1152, 27, 16, 4304, 0)
    assert cfg.vision_dim == 2176 and cfg.num_patch_tokens == 513 and cfg.num_action_tokens == 56
    with torch.device("meta"):
        m = OpenVLAOFT(cfg)
    sd = m.state_dict()
    assert tuple(sd["projector.fc1.weight"].shape) == (8704, 2176)
    assert tuple(sd["projector.fc2.weight"].shape) == (4096, 8704)
    assert tuple(sd["action_head.model.fc1.weight"].shape) == (4096, 28672)
    assert tuple(sd["action_head.model.mlp_resnet_blocks.1.ffn.1.weight"].shape) == (4096, 4096)
    assert tuple(sd["proprio_projector.fc1.weight"].shape) == (4096, 8)
    assert tuple(sd["language_model.model.embed_tokens.weight"].shape) == (32064, 4096)
    assert "vision_backbone.featurizer.blocks.22.ls2.scale_factor" in sd
    assert "vision_backbone.featurizer.blocks.23.attn.qkv.weight" not in sd  # last block unused
    assert "vision_backbone.fused_featurizer.blocks.25.mlp.fc1.weight" in sd
    n_llm = sum(v.numel() for k, v in sd.items() if k.startswith("language_model."))
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two norms
    assert n_llm == 32064 * 4096 + 32 * per_layer + 4096  # Llama-2-7B body (no lm_head): 6.61e9


# What inference deliberately does not build (published keys the loader must skip): the towers' last
# blocks and final norms, SigLIP's attention-pool head, the LM head.
NOT_BUILT_7B = ("vision_backbone.featurizer.blocks.23.", "vision_backbone.featurizer.norm.",
                "vision_backbone.fused_featurizer.blocks.26.", "vision_backbone.fused_featurizer.norm.",
                "vision_backbone.fused_featurizer.attn_pool.", "language_model.lm_head.")


def test_7b_state_dict_matches_the_published_keys(published_keys):
    """Name for name and shape for shape against tests/fixtures/oft_7b_keys.txt (derived from the official
    code, not from this package), at 7B sizes on the meta device."""
    from vla_accel.checkpoint import main_weights, unused_keys

    cfg = oft_7b()
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    published = published_keys["model.safetensors"]
    not_built = {k: s for k, s in published.items() if k.startswith(NOT_BUILT_7B)}
    ours = {k: tuple(v.shape) for k, v in main_weights(model).state_dict().items()}
    assert ours == {k: s for k, s in published.items() if k not in not_built}
    assert all(any(k.startswith(p) for k in not_built) for p in NOT_BUILT_7B)  # each group exists (44 tensors)
    assert len(not_built) == 14 + 2 + 12 + 2 + 13 + 1
    assert sorted(unused_keys(cfg)) == sorted(NOT_BUILT_7B)  # exactly what the loader skips
    for part in ("action_head", "proprio_projector"):  # the .pt files, saved from DDP
        ours = {f"module.{k}": tuple(v.shape) for k, v in getattr(model, part).state_dict().items()}
        assert ours == published_keys[part]


def test_tower_sizes_key_round_trips_through_config_json():
    cfg = oft_tiny()
    d = cfg.to_hf_config()
    assert d["vla_accel_vision_towers"][1] == {"width": 48, "depth": 3, "heads": 2, "mlp_ratio": 3.7362}
    again = OFTConfig.from_hf_config(d)
    assert again.towers == cfg.towers and again.llm == cfg.llm
    assert "vla_accel_vision_towers" not in oft_7b().to_hf_config()  # published towers: timm ids suffice


def test_unknown_tower_without_sizes_is_a_clear_error():
    d = oft_tiny().to_hf_config()
    del d["vla_accel_vision_towers"]
    d["timm_model_ids"] = ["vit_base_patch14_dinov2", "vit_so400m_patch14_siglip_224"]
    with pytest.raises(ValueError, match="vla_accel_vision_towers"):
        OFTConfig.from_hf_config(d)


def test_sequence_layout_placeholders_and_action_window():
    policy = random_policy("tiny", seed=3)
    model = policy.model
    torch.manual_seed(0)
    ids = torch.tensor([[1, 10, 11, 12]])  # as tokenized: BOS + 3 tokens, no 29871 yet
    pixels = torch.randn(1, 12, 224, 224)
    proprio = torch.rand(1, 8) * 2 - 1
    seen = []  # the backbone's input (h, positions)
    hook = model.llm.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        norm, act_h = policy.predict_from_inputs(ids, pixels, proprio)
    finally:
        hook.remove()
    h, pos = seen[0]
    E = model.llm.embed_tokens.weight
    # P = 5 prompt tokens once 29871 is appended -> 1 + 512 + 1 + 4 + 56 + 1 = 575 positions
    assert h.shape == (1, 575, 64) and pos[0].tolist() == list(range(575))
    torch.testing.assert_close(h[0, 0], E[1])
    torch.testing.assert_close(h[0, 1:513], model.encode_images(pixels)[0])
    torch.testing.assert_close(h[0, 513], model.proprio_projector(proprio)[0])
    torch.testing.assert_close(h[0, 514:518], E[[10, 11, 12, 29871]])
    assert torch.count_nonzero(h[0, 518:574]) == 0  # the 56 placeholders are zero
    torch.testing.assert_close(h[0, 574], E[2])  # stop token
    # window = [NUM_PATCHES + NUM_PROMPT_TOKENS, +56) = [513 + 4, 573): starts at 29871, one before the last placeholder
    final, _, _ = model.llm(h, pos)
    torch.testing.assert_close(act_h, final[:, 517:573], **FP32)
    torch.testing.assert_close(norm, model.action_head(final[:, 517:573]), **FP32)


def test_prompt_already_ending_with_29871_is_not_extended():
    policy = random_policy("tiny", seed=3)
    px, pr = torch.randn(1, 12, 224, 224), torch.zeros(1, 8)
    a, _ = policy.predict_from_inputs([[1, 10, 11, 12, 29871]], px, pr)
    b, _ = policy.predict_from_inputs([[1, 10, 11, 12]], px, pr)
    c, _ = policy.predict_from_inputs([[1, 10, 11, 12, 29871, 29871]], px, pr)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0  # a second 29871 is a real extra token


def test_ragged_batch_equals_single_samples():
    policy = random_policy("tiny", seed=5)
    torch.manual_seed(0)
    ids = [[1, 10, 11, 12, 13, 14, 15], [1, 20, 21]]
    px, pr = torch.randn(2, 12, 224, 224), torch.rand(2, 8)
    batch, hid = policy.predict_from_inputs(ids, px, pr)
    for i in range(2):
        one, h1 = policy.predict_from_inputs([ids[i]], px[i:i + 1], pr[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], one, **FP32)
        torch.testing.assert_close(hid[i:i + 1], h1, **FP32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (timm loads only with a working torchvision)")
@pytest.mark.parametrize("timm_id", ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"])
def test_tower_equals_timm(timm_id):
    timm = pytest.importorskip("timm")
    from vla_accel.checkpoint import load_tensors
    from vla_accel.model.config import KNOWN_TOWERS
    from vla_accel.model.vit import ViT

    cfg = KNOWN_TOWERS[timm_id]
    ref = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=224).cuda().eval()
    ours = ViT(cfg).cuda().eval()
    load_tensors(ours, ref.state_dict().items(), ignore=ViT.unused_checkpoint_keys(cfg), where=timm_id)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expect = ref.get_intermediate_layers(x, n={len(ref.blocks) - 2})[0]
        got = ours(x)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)  # fp32 (TF32 off by default for matmul)
