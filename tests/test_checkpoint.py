"""Loading checkpoints written in the official on-disk layout, and every bad input the loader names."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vla_accel
from vla_accel import CheckpointError, load_policy, random_policy, save_checkpoint, wrap
from vla_accel.checkpoint import load_tensors, main_weights, strip_ddp, unused_keys
from vla_accel.model.config import OFTConfig, oft_7b
from vla_accel.model.oft import OpenVLAOFT
from vla_accel.processing import ImageNorm

INSTR = "put the black bowl on the plate"
FIXTURES = Path(__file__).parent / "fixtures"


def obs(seed=0, size=256):
    r = np.random.default_rng(seed)
    return {"full_image": r.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "wrist_image": r.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "state": r.uniform(-0.2, 0.2, 8)}


def stats_for(*names):
    base = random_policy("tiny").norm_stats["random_no_noops"]
    return {n: base for n in names}


def write_tiny_tokenizer(root):
    """A tiny Llama-style (Metaspace, BOS-prefixed) fast tokenizer saved like the official files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vla_accel.tokenizer import action_prompt

    words = action_prompt("put black bowl on plate").split(" ")  # Metaspace splits on spaces only
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"▁{w}": 100 + i for i, w in enumerate(dict.fromkeys(words))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(root))


@pytest.fixture(scope="module")
def source():
    return random_policy("tiny", seed=11)


@pytest.fixture(scope="module")
def expected(source):
    return source.predict(obs(), INSTR)


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_single_and_sharded(tmp_path, source, expected, shards):
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("libero_spatial_no_noops"), shards=shards)
    names = sorted(p.name for p in root.iterdir())
    if shards == 1:
        assert "model.safetensors" in names
    else:
        assert "model.safetensors.index.json" in names and "model-00003-of-00003.safetensors" in names
    head = torch.load(root / "action_head--150000_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.model.") for k in head)  # DDP layout, as published
    policy = load_policy(root, device="cpu", dtype=torch.float32, unnorm_key="libero_spatial")
    assert policy.unnorm_key == "libero_spatial_no_noops"
    policy.tokenizer = source.tokenizer  # no tokenizer files in this checkpoint
    np.testing.assert_array_equal(policy.predict(obs(), INSTR), expected)


def test_loads_without_tokenizer_and_fails_clearly_on_first_text_use(tmp_path, source):
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("libero_goal_no_noops"))
    policy = load_policy(root, device="cpu")
    with pytest.raises(RuntimeError, match="tokenizer"):
        policy.predict(obs(), INSTR)
    # the lower-level entry point needs no tokenizer
    norm, hid = policy.predict_from_inputs([[1, 5, 6]], torch.zeros(1, 12, 224, 224), torch.zeros(1, 8))
    assert norm.shape == (1, 8, 7) and hid.shape == (1, 56, 64)


def test_tokenizer_files_are_used(tmp_path, source):
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("libero_10_no_noops"))
    write_tiny_tokenizer(root)
    policy = load_policy(root, device="cpu", dtype=torch.float32)
    ids = policy.tokenizer.encode("In: What action should the robot take to put black bowl on plate?\nOut:")
    assert ids == [1] + list(range(100, 113))  # BOS + 13 known words ("plate?\nOut:" is one word)
    a = policy.predict(obs(), "Put black bowl on plate")  # instruction is lower-cased
    b, _ = policy.predict_from_inputs([ids], *policy.prepare([obs()], [INSTR])[1:])
    np.testing.assert_array_equal(a, policy.postprocess(b[0].numpy()))


def test_preprocessor_config_sets_image_normalization(tmp_path, source):
    other = ImageNorm(means=((0.25, 0.5, 0.75), (0.5, 0.5, 0.5)), stds=((0.1, 0.2, 0.3), (0.5, 0.5, 0.5)))
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("x"), image_norm=other)
    assert load_policy(root, device="cpu").image_norm == other
    # without a preprocessor_config.json: the published processor's values (bf16-rounded ImageNet)
    default = load_policy(save_checkpoint(source, tmp_path / "c2", norm_stats=stats_for("x")), device="cpu")
    assert default.image_norm.means[0] == (0.484375, 0.455078125, 0.40625)
    assert default.image_norm.stds[0] == (0.228515625, 0.2236328125, 0.224609375)


# ------------------------------------------------------------------------- the published artifacts
def test_published_preprocessor_config_normalizes_with_tvf_params():
    """The processor applies `tvf_normalize_params` (bf16-rounded), not the `means`/`stds` stored beside them."""
    d = json.loads((FIXTURES / "oft_7b_preprocessor_config.json").read_text())
    norm = ImageNorm.from_preprocessor_config(d)
    assert norm.means == ((0.484375, 0.455078125, 0.40625), (0.5, 0.5, 0.5))
    assert norm.stds == ((0.228515625, 0.2236328125, 0.224609375), (0.5, 0.5, 0.5))
    assert tuple(d["means"][0]) == (0.485, 0.456, 0.406)  # what an old reader would have used
    with pytest.raises(ValueError, match="tvf_normalize_params"):
        ImageNorm.from_preprocessor_config({"tvf_normalize_params": [{"mean": [0.5] * 3}]})


def test_published_config_json_reads_as_the_7b_model():
    """The published config.json names the towers by timm id and stores only the diff of text_config
    against Llama's defaults; the loader must arrive at the 7B sizes."""
    d = json.loads((FIXTURES / "oft_7b_config.json").read_text())
    assert set(d["text_config"]) == {"model_type", "pad_token_id", "torch_dtype", "vocab_size"}
    cfg = OFTConfig.from_hf_config(d)
    want = oft_7b()
    assert cfg.towers == want.towers
    assert cfg.llm == want.llm and cfg.llm.vocab == 32064 and cfg.llm.pad_id == 32000
    assert cfg.image_size == 224 and cfg.vision_dim == 2176


def test_loader_takes_every_published_tensor_at_7b(published_keys):
    """Every tensor of the published files, as meta tensors: each is loaded or deliberately skipped
    (no missing key, no shape mismatch, no "not used" warning)."""
    cfg = oft_7b()
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    parts = {"model.safetensors": (main_weights(model), unused_keys(cfg)),
             "action_head": (model.action_head, []), "proprio_projector": (model.proprio_projector, [])}
    for part, (module, ignore) in parts.items():
        state = strip_ddp({k: torch.empty(s, device="meta") for k, s in published_keys[part].items()})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_tensors(module, state.items(), ignore=ignore, where=part, assign=True)


def _edit_weights(root, fn):
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    save_file(fn(tensors), str(path))


def _published_unused(published, cfg):
    """The published keys inference skips, with the 7B towers' last-block index mapped to cfg's; values
    are placeholders (skipped keys are never read)."""
    big, out = oft_7b(), {}
    for key in published:
        if not any(key.startswith(p) for p in unused_keys(big)):
            continue
        for name, b, t in zip(("featurizer", "fused_featurizer"), big.towers, cfg.towers):
            key = key.replace(f"vision_backbone.{name}.blocks.{b.depth - 1}.",
                              f"vision_backbone.{name}.blocks.{t.depth - 1}.")
        out[key] = torch.zeros(1)
    return out


@pytest.mark.parametrize("layer_scale", ["scale_factor", "gamma"])
def test_checkpoint_with_either_layer_scale_name_and_the_unused_tensors_loads(
        tmp_path, source, expected, published_keys, layer_scale):
    """Published checkpoints name LayerScale `scale_factor` (timm's name, `gamma`, is accepted too) and hold
    tensors inference does not use; both load, silently, to the same predictions."""
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("libero_spatial_no_noops"))
    saved = load_file(str(root / "model.safetensors"))
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in saved
    assert not any(k.endswith(".gamma") for k in saved)
    unused = _published_unused(published_keys["model.safetensors"], source.cfg)
    assert len(unused) == 44 and not set(unused) & set(saved)

    def edit(t):
        t = {k.replace(".scale_factor", f".{layer_scale}"): v for k, v in t.items()}
        return {**t, **unused}

    _edit_weights(root, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = load_policy(root, device="cpu", dtype=torch.float32)
    policy.tokenizer = source.tokenizer
    np.testing.assert_array_equal(policy.predict(obs(), INSTR), expected)


def test_layer_scale_under_both_names_is_an_error(tmp_path, source):
    root = save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats_for("x"))
    key = "vision_backbone.featurizer.blocks.0.ls2.scale_factor"
    _edit_weights(root, lambda t: {**t, key.replace("scale_factor", "gamma"): t[key].clone()})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls2\.scale_factor' is given twice"):
        load_policy(root, device="cpu")


# ------------------------------------------------------------------------- bad input
@pytest.fixture
def ckpt(tmp_path, source):
    stats = stats_for("libero_spatial_no_noops", "libero_object_no_noops")
    return save_checkpoint(source, tmp_path / "ckpt", norm_stats=stats, shards=2)


def test_missing_action_head_file(ckpt):
    (ckpt / "action_head--150000_checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no action head file .*action_head--\*_checkpoint.pt"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def test_truncated_weight_file(ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def test_truncated_proprio_file(ckpt):
    f = ckpt / "proprio_projector--150000_checkpoint.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="proprio projector file"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def test_missing_shard(ckpt):
    (ckpt / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def _rewrite(ckpt, fn):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        t = load_file(str(ckpt / name))
        fn(t)
        save_file(t, str(ckpt / name))


def test_missing_key_is_named(ckpt):
    key = "language_model.model.layers.3.mlp.up_proj.weight"
    _rewrite(ckpt, lambda t: t.pop(key, None))
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.3\.mlp\.up_proj\.weight"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def test_shape_mismatch_is_named(ckpt):
    key = "projector.fc3.weight"

    def bad(t):
        if key in t:
            t[key] = torch.zeros(64, 63)

    _rewrite(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'projector\.fc3\.weight'.*\(64, 63\).*\(64, 64\)"):
        load_policy(ckpt, device="cpu", unnorm_key="libero_spatial")


def test_unnorm_key_errors_list_available(ckpt):
    listed = r"unknown unnorm_key 'libero_90'.*libero_object_no_noops.*libero_spatial_no_noops"
    with pytest.raises(ValueError, match=listed):
        load_policy(ckpt, device="cpu", unnorm_key="libero_90")
    with pytest.raises(ValueError, match="pass unnorm_key=one of"):
        load_policy(ckpt, device="cpu")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_policy(tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_policy(tmp_path / "empty", device="cpu")


def test_bad_observations(source):
    good = obs()
    with pytest.raises(TypeError, match=r"full_image.*uint8"):
        source.predict({**good, "full_image": good["full_image"].astype(np.float32)}, INSTR)
    with pytest.raises(ValueError, match=r"wrist_image.*\[H, W, 3\].*\(256, 256\)"):
        source.predict({**good, "wrist_image": good["wrist_image"][..., 0]}, INSTR)
    with pytest.raises(ValueError, match=r"NaN/inf at indices \[2\]"):
        source.predict({**good, "state": np.array([0, 0, np.nan, 0, 0, 0, 0, 0.0])}, INSTR)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        source.predict({**good, "state": np.zeros(7)}, INSTR)
    with pytest.raises(KeyError, match="wrist_image"):
        source.predict({"full_image": good["full_image"], "state": good["state"]}, INSTR)


# ------------------------------------------------------------------------- wrap()
class _Official(torch.nn.Module):
    """Stands in for an official OpenVLAForActionPrediction object: same submodule names and keys."""

    def __init__(self, src):
        super().__init__()
        m = src.model
        self.vision_backbone = m.vision_backbone
        self.projector = m.projector
        self.language_model = m.language_model
        self.config = m.cfg.to_hf_config()
        self.norm_stats = src.norm_stats


class _DDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_wrap_official_object_matches_and_shares_weights(source, expected):
    import copy

    src = copy.deepcopy(source)
    vla = _Official(src)
    policy = wrap(vla, _DDP(src.model.action_head), src.model.proprio_projector, tokenizer=source.tokenizer)
    np.testing.assert_array_equal(policy.predict(obs(), INSTR), expected)
    w = policy.model.llm.layers[0].mlp.up_proj.weight
    assert w.data_ptr() == vla.language_model.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_wrap_takes_the_processors_tvf_normalize_params(source):
    """An official PrismaticImageProcessor applies tvf_normalize_params; its means/stds are only stored."""
    import copy
    from types import SimpleNamespace

    d = json.loads((FIXTURES / "oft_7b_preprocessor_config.json").read_text())
    processor = SimpleNamespace(image_processor=SimpleNamespace(**d), tokenizer=source.tokenizer)
    src = copy.deepcopy(source)
    policy = wrap(_Official(src), src.model.action_head, src.model.proprio_projector, processor=processor)
    assert policy.image_norm == ImageNorm.from_preprocessor_config(d)
    assert policy.image_norm.means[0] == (0.484375, 0.455078125, 0.40625)


def test_wrap_rejects_other_objects():
    with pytest.raises(TypeError, match="vision_backbone"):
        wrap(torch.nn.Linear(2, 2), None, None)


def test_public_api_names():
    for name in ("load_policy", "wrap", "random_policy", "Policy", "ChunkedActor"):
        assert hasattr(vla_accel, name)
