"""Fixtures describing the published OpenVLA-OFT 7B checkpoint, derived from public sources only.

    python scripts/make_oft_fixtures.py keys                  # -> tests/fixtures/oft_7b_keys.txt (stdlib only)
    python scripts/make_oft_fixtures.py config --official DIR # -> tests/fixtures/oft_7b_config.json
    python scripts/make_oft_fixtures.py check [--official DIR]  # instantiate the official modules, compare

`keys` writes every tensor name and shape of the checkpoint's three weight files, from the module trees
the official code builds (nothing here imports vla_accel):
  * moojink/openvla-oft prismatic/extern/hf/modeling_prismatic.py: `PrismaticVisionBackbone` makes
    `featurizer` / `fused_featurizer` with timm.create_model(id, pretrained=False, num_classes=0,
    img_size=224, act_layer=None) and renames every LayerScale `gamma` to `scale_factor`;
    `PrismaticProjector` (fused) is fc1 (vision_dim -> 4 vision_dim), fc2 (-> llm_dim), fc3 (llm_dim ->
    llm_dim); the LLM is AutoModelForCausalLM.from_config(text_config), i.e. LlamaForCausalLM.
  * timm 0.9.10 (the version the official repository pins) timm/models/vision_transformer.py:
    VisionTransformer (cls_token, reg_token, pos_embed [1, patches (+ prefix unless no_embed_class), D],
    patch_embed.proj Conv2d(3, D, 14, 14) with bias, blocks.N.{norm1, attn.qkv, attn.proj, ls1, norm2,
    mlp.fc1, mlp.fc2, ls2}, final `norm`, and for global_pool='map' an AttentionPoolLatent `attn_pool`
    (latent [1, 1, D], q, kv, proj, norm, mlp.fc1/fc2; timm/layers/attention_pool.py)); `head` is
    Identity for num_classes=0. vit_large_patch14_reg4_dinov2: D 1024, depth 24, 16 heads, LayerScale
    (init_values 1e-5), 4 registers, no_embed_class. vit_so400m_patch14_siglip_224: D 1152, depth 27,
    mlp_ratio 3.7362 (MLP int(1152 * 3.7362) = 4304), no class token, global_pool 'map'.
  * transformers 4.40.1 (the official fork's base) models/llama/modeling_llama.py: model.embed_tokens,
    model.layers.N.{self_attn.{q,k,v,o}_proj (no bias), mlp.{gate,up,down}_proj (no bias),
    input_layernorm, post_attention_layernorm}, model.norm, lm_head (untied); rotary inv_freq is a
    non-persistent buffer. Sizes: LlamaConfig defaults (hidden 4096, 32 layers, MLP 11008) with
    vocab 32000 + 64 = 32064 (convert_openvla_weights_to_hf.py pads to pad_to_multiple_of).
  * prismatic/models/action_heads.py (L1RegressionActionHead: MLPResNet(2 blocks, 7 * 4096 -> 4096 -> 7))
    and prismatic/models/projectors.py (ProprioProjector: fc1 8 -> 4096, fc2 4096 -> 4096), saved from
    DDP by vla-scripts/finetune.py, hence the `module.` prefix.

`config` runs the official configuration_prismatic.py (from a checkout: `fetch github:moojink/openvla-oft`)
the way vla-scripts/extern/convert_openvla_weights_to_hf.py does and serializes it like save_pretrained
(needs transformers; the published files were written by 4.40.1). `norm_stats` is left out: the
published config carries the base model's Open X-Embodiment statistics, which the loader does not use
when dataset_statistics.json is present.

`check` builds the official modules and compares their state dicts with the committed keys file: with
--official, the checkout's PrismaticVisionBackbone, PrismaticProjector, L1RegressionActionHead and
ProprioProjector; without it, the same timm calls and LayerScale rename, and plain Linear projector layers;
the Llama LM through transformers' AutoModelForCausalLM on the meta device either way. It needs timm
(0.9.x; modeling_prismatic.py refuses others) and torchvision, which CI does not have; the towers are
built on the CPU (~3 GB of memory, a minute or two).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
KEYS_FILE = FIXTURES / "oft_7b_keys.txt"
CONFIG_FILE = FIXTURES / "oft_7b_config.json"
FILES = ("model.safetensors", "action_head", "proprio_projector")  # the keys file's sections

DINO = dict(width=1024, depth=24, mlp=4096, registers=4, class_token=True, layer_scale=True, attn_pool=False)
SIGLIP = dict(width=1152, depth=27, mlp=4304, registers=0, class_token=False, layer_scale=False, attn_pool=True)
PATCHES, PATCH = 256, 14  # (224 / 14) ** 2, no_embed_class / no prefix tokens: pos_embed covers patches only
LLM = dict(hidden=4096, layers=32, mlp=11008, vocab=32064)
ACTION_DIM, PROPRIO_DIM = 7, 8


# ----------------------------------------------------------------------------- derivation (keys)
def linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (out_f, in_f))] + ([(f"{prefix}.bias", (out_f,))] if bias else [])


def layer_norm(prefix: str, dim: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def vit(prefix: str, t: dict) -> list[tuple[str, tuple]]:
    d = t["width"]
    out = []
    if t["class_token"]:
        out.append((f"{prefix}.cls_token", (1, 1, d)))
    if t["registers"]:
        out.append((f"{prefix}.reg_token", (1, t["registers"], d)))
    out.append((f"{prefix}.pos_embed", (1, PATCHES, d)))
    out += [(f"{prefix}.patch_embed.proj.weight", (d, 3, PATCH, PATCH)), (f"{prefix}.patch_embed.proj.bias", (d,))]
    for i in range(t["depth"]):
        b = f"{prefix}.blocks.{i}"
        out += layer_norm(f"{b}.norm1", d) + linear(f"{b}.attn.qkv", 3 * d, d) + linear(f"{b}.attn.proj", d, d)
        out += [(f"{b}.ls1.scale_factor", (d,))] if t["layer_scale"] else []
        out += layer_norm(f"{b}.norm2", d) + linear(f"{b}.mlp.fc1", t["mlp"], d) + linear(f"{b}.mlp.fc2", d, t["mlp"])
        out += [(f"{b}.ls2.scale_factor", (d,))] if t["layer_scale"] else []
    out += layer_norm(f"{prefix}.norm", d)
    if t["attn_pool"]:
        p = f"{prefix}.attn_pool"
        out += [(f"{p}.latent", (1, 1, d))] + linear(f"{p}.q", d, d) + linear(f"{p}.kv", 2 * d, d)
        out += linear(f"{p}.proj", d, d) + layer_norm(f"{p}.norm", d)
        out += linear(f"{p}.mlp.fc1", t["mlp"], d) + linear(f"{p}.mlp.fc2", d, t["mlp"])
    return out


def llama(prefix: str) -> list[tuple[str, tuple]]:
    h, m = LLM["hidden"], LLM["mlp"]
    out = [(f"{prefix}.model.embed_tokens.weight", (LLM["vocab"], h))]
    for i in range(LLM["layers"]):
        b = f"{prefix}.model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += linear(f"{b}.self_attn.{name}", h, h, bias=False)
        out += linear(f"{b}.mlp.gate_proj", m, h, False) + linear(f"{b}.mlp.up_proj", m, h, False)
        out += linear(f"{b}.mlp.down_proj", h, m, False)
        out += [(f"{b}.input_layernorm.weight", (h,)), (f"{b}.post_attention_layernorm.weight", (h,))]
    return out + [(f"{prefix}.model.norm.weight", (h,)), (f"{prefix}.lm_head.weight", (LLM["vocab"], h))]


def derived_keys() -> dict[str, dict[str, tuple]]:
    vision = DINO["width"] + SIGLIP["width"]
    h = LLM["hidden"]
    main = vit("vision_backbone.featurizer", DINO) + vit("vision_backbone.fused_featurizer", SIGLIP)
    main += linear("projector.fc1", 4 * vision, vision) + linear("projector.fc2", h, 4 * vision)
    main += linear("projector.fc3", h, h) + llama("language_model")
    head = layer_norm("module.model.layer_norm1", ACTION_DIM * h) + linear("module.model.fc1", h, ACTION_DIM * h)
    for i in range(2):  # MLPResNetBlock.ffn = Sequential(LayerNorm, Linear, ReLU)
        head += layer_norm(f"module.model.mlp_resnet_blocks.{i}.ffn.0", h)
        head += linear(f"module.model.mlp_resnet_blocks.{i}.ffn.1", h, h)
    head += layer_norm("module.model.layer_norm2", h) + linear("module.model.fc2", ACTION_DIM, h)
    proprio = linear("module.fc1", h, PROPRIO_DIM) + linear("module.fc2", h, h)
    return {name: dict(sorted(items)) for name, items in zip(FILES, (main, head, proprio))}


HEADER = """\
# Every tensor of the published OpenVLA-OFT 7B LIBERO checkpoint (moojink/openvla-7b-oft-finetuned-libero-*):
# `name shape` per line (shape comma-separated), one section per file:
#   [model.safetensors]   the HF weights (sharded as model-0000N-of-0000M.safetensors in the release)
#   [action_head]         action_head--{STEP}_checkpoint.pt (torch state dict saved from DDP: `module.`)
#   [proprio_projector]   proprio_projector--{STEP}_checkpoint.pt (idem)
# Derived by scripts/make_oft_fixtures.py (its docstring names the sources) from the module trees the
# official code builds: moojink/openvla-oft modeling_prismatic.py (timm towers with LayerScale `gamma`
# renamed `scale_factor`, fused projector fc1-fc3, AutoModelForCausalLM), timm 0.9.10
# vision_transformer.py / attention_pool.py, transformers 4.40.1 modeling_llama.py, action_heads.py and
# projectors.py, with the 7B sizes of configuration_prismatic.py + convert_openvla_weights_to_hf.py
# (vocab 32000 + 64). Cross-checked by instantiating those modules (`make_oft_fixtures.py check`).
# Not confirmed from a public source: the published shard boundaries (irrelevant to the names) and the
# tensors' stored dtype (bf16 per the conversion script). Keys that inference does not use (the last
# ViT blocks, the towers' final `norm`, SigLIP's `attn_pool`, `language_model.lm_head`) are listed:
# the loader must accept and ignore them (tests/test_checkpoint.py).
"""


def write_keys(path: Path = KEYS_FILE) -> None:
    lines = [HEADER]
    for name, items in derived_keys().items():
        lines.append(f"[{name}]")
        lines += [f"{k} {','.join(map(str, s))}" for k, s in items.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}: " + ", ".join(f"{n} {len(v)} tensors" for n, v in derived_keys().items()))


def read_keys(path: Path = KEYS_FILE) -> dict[str, dict[str, tuple]]:
    out, section = {}, None
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        name, shape = line.split()
        section[name] = tuple(int(v) for v in shape.split(","))
    return out


# ----------------------------------------------------------------------------- official code (config, check)
def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_config(checkout: Path) -> dict:
    """configuration_prismatic.OpenVLAConfig built and patched as convert_openvla_weights_to_hf.py does for
    openvla-7b, serialized like save_pretrained (to_diff_dict), without norm_stats."""
    import torch

    cfg_mod = _load(checkout / "prismatic/extern/hf/configuration_prismatic.py", "configuration_prismatic")
    cfg = cfg_mod.OpenVLAConfig(vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
                                arch_specifier="no-align+fused-gelu-mlp", image_resize_strategy="resize-naive",
                                llm_max_length=2048, torch_dtype=torch.bfloat16, norm_stats=None)
    cfg.text_config.vocab_size += cfg.pad_to_multiple_of
    cfg.text_config.pad_token_id = cfg.pad_token_id
    cfg.text_config.torch_dtype = torch.bfloat16
    cfg.architectures = ["OpenVLAForActionPrediction"]
    cfg.auto_map = {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    d = json.loads(cfg.to_json_string(use_diff=True))
    d.pop("norm_stats", None)
    return d


def official_keys(checkout: Path | None) -> dict[str, dict[str, tuple]]:
    """State dicts of the modules the official code builds (see the module docstring)."""
    import timm
    import torch
    from timm.models.vision_transformer import LayerScale
    from transformers import AutoModelForCausalLM, LlamaConfig

    def shapes(module, prefix=""):
        return {f"{prefix}{k}": tuple(v.shape) for k, v in module.state_dict().items()}

    ids = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    if checkout is not None:  # the official class itself (random init of ~0.7B parameters on the CPU)
        hf = importlib.import_module("prismatic.extern.hf.modeling_prismatic")
        main = shapes(hf.PrismaticVisionBackbone(True, [224, 224], ids, [None, None]), "vision_backbone.")
    else:  # its calls: _create_featurizer's timm.create_model and ls_apply_patch's rename
        main = {}
        for name, timm_id in zip(("featurizer", "fused_featurizer"), ids):
            tower = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=224, act_layer=None,
                                      weight_init="skip")  # skip: only the slow random init
            for m in tower.modules():
                if isinstance(m, LayerScale):
                    m.scale_factor = torch.nn.Parameter(m.gamma.detach())
                    del m.gamma
            main.update(shapes(tower, f"vision_backbone.{name}."))
            del tower
    vision = 1024 + 1152
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32064, pad_token_id=32000))
        main.update(shapes(lm, "language_model."))
        if checkout is not None:
            main.update(shapes(hf.PrismaticProjector(True, vision_dim=vision, llm_dim=4096), "projector."))
        else:
            for i, (o, n) in enumerate(((4 * vision, vision), (4096, 4 * vision), (4096, 4096)), 1):
                main.update(shapes(torch.nn.Linear(n, o), f"projector.fc{i}."))
    out = {"model.safetensors": main}
    if checkout is not None:
        proj = importlib.import_module("prismatic.models.projectors")
        heads = importlib.import_module("prismatic.models.action_heads")
        with torch.device("meta"):
            out["action_head"] = shapes(heads.L1RegressionActionHead(4096, 4096, ACTION_DIM), "module.")
            out["proprio_projector"] = shapes(proj.ProprioProjector(4096, PROPRIO_DIM), "module.")
    return out


def _official_package(checkout: Path) -> None:
    """Makes `prismatic.extern.hf.*` and `prismatic.models.*` importable from the checkout without running
    the package __init__ files (they pull in training dependencies); the few names modeling_prismatic.py /
    action_heads.py import from elsewhere are provided: the constants from their file, the rest unused."""
    root = checkout / "prismatic"
    for name, folder in (("prismatic", root), ("prismatic.extern", root / "extern"),
                         ("prismatic.extern.hf", root / "extern/hf"), ("prismatic.models", root / "models"),
                         ("prismatic.vla", root / "vla"), ("prismatic.training", None)):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)] if folder else []
        sys.modules[name] = pkg
    _load(root / "vla/constants.py", "prismatic.vla.constants")
    train_utils = types.ModuleType("prismatic.training.train_utils")
    train_utils.get_current_action_mask = train_utils.get_next_actions_mask = None  # training only
    sys.modules["prismatic.training.train_utils"] = train_utils
    ddim = types.ModuleType("diffusers.schedulers.scheduling_ddim")  # only the diffusion head uses it
    ddim.DDIMScheduler = None
    for name in ("diffusers", "diffusers.schedulers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules.setdefault("diffusers.schedulers.scheduling_ddim", ddim)


def check(checkout: Path | None) -> int:
    if checkout is not None:
        _official_package(checkout)
    got, want = official_keys(checkout), read_keys()
    bad = 0
    for section, keys in got.items():
        ref = want[section]
        missing, extra = sorted(set(ref) - set(keys)), sorted(set(keys) - set(ref))
        shape = sorted(k for k in set(ref) & set(keys) if ref[k] != keys[k])
        print(f"[{section}] official {len(keys)} tensors, fixture {len(ref)}: "
              f"{len(missing)} only in the fixture, {len(extra)} only in the official modules, "
              f"{len(shape)} shape mismatches")
        for k in (missing + extra + shape)[:20]:
            print("   ", k, ref.get(k), keys.get(k))
        bad += len(missing) + len(extra) + len(shape)
    print("MATCH" if bad == 0 else f"MISMATCH ({bad})")
    return int(bad != 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("keys", "config", "check"))
    ap.add_argument("--official", type=Path, help="a checkout of github.com/moojink/openvla-oft")
    args = ap.parse_args(argv)
    if args.what == "keys":
        write_keys()
    elif args.what == "config":
        if args.official is None:
            ap.error("config needs --official (a checkout of moojink/openvla-oft)")
        import transformers

        d = official_config(args.official)
        CONFIG_FILE.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        print(f"wrote {CONFIG_FILE} (transformers {transformers.__version__})")
    else:
        return check(args.official)
    return 0


if __name__ == "__main__":
    sys.exit(main())
