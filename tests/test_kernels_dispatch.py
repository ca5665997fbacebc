"""Dispatch table, choose(), rule building, config names, tuner shapes and phi calibration (no kernels run)."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton's interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vla_accel.kernels import DispatchTable, GemmConfig, GemvConfig, calibrate_phi, choose, load_table  # noqa: E402
from vla_accel.kernels.calibrate import SoftmaxCalibration, default_safe_range  # noqa: E402
from vla_accel.kernels.table import gpu_slug  # noqa: E402
from vla_accel.kernels.tune import (  # noqa: E402
    build_rules,
    candidates,
    compile_jobs,
    compile_signature,
    llm_dims_from_hf,
    model_linear_shapes,
)

FLAT_S = GemmConfig(64, 16, 128, 4, 4, 4).name
FLAT_L = GemmConfig(128, 128, 64, 8, 4, 1).name
GEMV = GemvConfig(16, 512, 4).name


@pytest.fixture
def table():
    return DispatchTable(gpu="Test GPU", dtype="bfloat16", rules={
        "linear:4096x4096": [(1, GEMV), (64, FLAT_S), (256, FLAT_L), (600, "cublas")],
        "gate_up_silu:22016x4096": [(128, FLAT_S)],
    })


@pytest.mark.parametrize("m, expected", [
    (1, GEMV), (2, FLAT_S), (64, FLAT_S), (65, FLAT_L), (256, FLAT_L), (257, "cublas"), (600, "cublas"),
    (601, "cublas"),  # beyond the last rule: the safe default
    (0, "cublas"),
])
def test_choose_intervals(table, m, expected):
    assert choose(table, (4096, 4096), m) == expected


def test_choose_defaults(table):
    assert choose(None, (4096, 4096), 8) == "cublas"
    assert choose(table, (1234, 4096), 8) == "cublas"  # unknown shape
    assert choose(table, (22016, 4096), 8, op="gate_up_silu") == FLAT_S
    assert choose(table, (22016, 4096), 129, op="gate_up_silu") == "cublas"
    # the residual op borrows the plain rules of its shape, a shape-less op does not borrow
    assert choose(table, (4096, 4096), 100, op="linear_residual") == FLAT_L
    assert choose(table, (22016, 4096), 8, op="linear") == "cublas"
    with pytest.raises(ValueError, match="valid ops"):
        choose(table, (4096, 4096), 8, op="conv")


def test_choose_is_pure(table):
    before = json.dumps(table.to_dict(), sort_keys=True)
    results = [choose(table, (4096, 4096), m) for m in range(1, 700)]
    assert results == [choose(table, (4096, 4096), m) for m in range(1, 700)]
    assert json.dumps(table.to_dict(), sort_keys=True) == before


def test_table_roundtrip_and_switch_points(table, tmp_path):
    path = tmp_path / "t.json"
    table.save(path)
    again = load_table(path)
    assert again.rules == table.rules and again.gpu == "Test GPU" and again.dtype == "bfloat16"
    assert again.switch_points("linear:4096x4096") == [(2, "gemv", "flat"), (257, "flat", "cublas")]
    assert json.loads(path.read_text())["switch_points"]["linear:4096x4096"] == [[2, "gemv", "flat"],
                                                                                [257, "flat", "cublas"]]


def test_table_validation():
    with pytest.raises(ValueError, match="valid families"):
        DispatchTable(rules={"linear:8x8": [(4, "magic")]})
    with pytest.raises(ValueError, match="strictly increasing"):
        DispatchTable(rules={"linear:8x8": [(8, "cublas"), (4, "cublas")]})
    with pytest.raises(ValueError, match="unknown op"):
        DispatchTable(rules={"matmul:8x8": [(8, "cublas")]})
    with pytest.raises(ValueError, match="not a dispatch table"):
        DispatchTable.from_dict({"rules": {}})


def test_build_rules_picks_fastest_and_merges():
    points = [
        (1, {"cublas": 10.0, GEMV: 5.0, FLAT_S: 6.0}),
        (8, {"cublas": 10.0, FLAT_S: 6.0}),
        (16, {"cublas": 10.0, FLAT_S: 7.0, FLAT_L: 9.0}),
        (256, {"cublas": 10.0, FLAT_L: 9.95}),  # within the 1% margin: cuBLAS stays
        (600, {"cublas": 10.0, FLAT_L: 12.0}),
    ]
    assert build_rules(points) == [(1, GEMV), (16, FLAT_S), (600, "cublas")]
    assert build_rules(points, margin=0.0) == [(1, GEMV), (16, FLAT_S), (256, FLAT_L), (600, "cublas")]
    # a measured repeat spread larger than the margin is the bar instead: 9 us vs 10 is 10 % faster
    spread = [(16, {"cublas": 10.0, FLAT_L: 9.0}, 0.05), (32, {"cublas": 10.0, FLAT_L: 9.0}, 0.12)]
    assert build_rules(spread) == [(16, FLAT_L), (32, "cublas")]


def test_pick_keeps_cublas_unless_faster_beyond_margin_and_spread():
    from vla_accel.kernels.tune import pick

    assert pick({"cublas": 10.0, FLAT_L: 9.8}) == FLAT_L  # 2 % > the 1 % margin
    assert pick({"cublas": 10.0, FLAT_L: 9.8}, spread=0.03) == "cublas"  # but within a 3 % spread
    assert pick({"cublas": 10.0, FLAT_L: 9.9}) == "cublas"  # exactly at the margin: cuBLAS
    assert pick({"cublas": 10.0, FLAT_L: 11.0, GEMV: 12.0}) == "cublas"
    assert pick({FLAT_L: 11.0, GEMV: 12.0}) == FLAT_L  # no cuBLAS time: the fastest


def test_config_names_roundtrip():
    for cfg in (GemmConfig(), GemmConfig(128, 256, 64, 8, 3, 2)):
        assert GemmConfig.parse(cfg.name) == cfg
    assert GemvConfig.parse(GemvConfig(8, 1024, 4).name) == GemvConfig(8, 1024, 4)
    for bad in ("flat:bn64", "gemv:bn16.bk512.w4", "flat:bn64.bm16.bk128.w4.s4.k0", "flat:"):
        with pytest.raises(ValueError, match="bad kernel config name"):
            GemmConfig.parse(bad)


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_llama_7b_shapes():
    """The tuner's keys are the runtime's calls: QKV plain, O and down with the residual, gate|up with SiLU."""
    shapes = {s.name: (s.op, s.n, s.k) for s in model_linear_shapes(4096, 11008, 32)}
    assert shapes == {"qkv": ("linear", 12288, 4096), "o": ("linear_residual", 4096, 4096),
                      "down": ("linear_residual", 4096, 11008), "gate_up": ("gate_up_silu", 22016, 4096)}


def test_vit_shapes_from_the_preset():
    """vla-accel-tune passes both towers of the 7B preset; their linears carry a bias and their own M grid."""
    from vla_accel.kernels.tune import parse_args, shapes_from_args
    from vla_accel.runtime.tune import tuner_argv

    args = parse_args(tuner_argv(["--preset", "7b"]))
    assert args.vit == [[1024, 4096, 522], [1152, 4304, 512]]  # DINOv2-L (1 + 4 + 256 tokens), SigLIP: x 2 images
    shapes = {s.name: s for s in shapes_from_args(args)}
    assert {k: (s.n, s.k) for k, s in shapes.items() if k.startswith("vit1152")} == {
        "vit1152_qkv": (3456, 1152), "vit1152_proj": (1152, 1152), "vit1152_fc1": (4304, 1152),
        "vit1152_fc2": (1152, 4304)}
    assert shapes["vit1024_fc1"].ms == (522, 4176) and shapes["vit1024_fc1"].bias  # batch 1 and 8
    assert shapes["vit1024_fc1"].key == "linear:4096x1024" and not shapes["qkv"].bias and shapes["qkv"].ms == ()
    only = shapes_from_args(parse_args(["--dims", "8", "16", "2", "--vit", "4", "8", "10", "--vit-batches", "3",
                                        "--only", "vit4_fc2"]))
    assert [(s.name, s.n, s.k, s.ms) for s in only] == [("vit4_fc2", 4, 8, (30,))]
    with pytest.raises(SystemExit, match="no such shape"):
        shapes_from_args(parse_args(["--dims", "8", "16", "2", "--only", "gate"]))
    with pytest.raises(SystemExit):
        parse_args(["--dims", "8", "16", "2", "--vit", "4", "0", "10"])


def test_dims_from_bare_text_config():
    d = {"text_config": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
                         "num_key_value_heads": 2}}
    assert llm_dims_from_hf(d) == (256, 688, 4, 2)
    qkv = model_linear_shapes(*llm_dims_from_hf(d))[0]
    assert (qkv.n, qkv.k) == (256 + 2 * 2 * 64, 256)  # grouped K/V heads shrink the fused projection
    with pytest.raises(ValueError, match="intermediate_size"):
        llm_dims_from_hf({"text_config": {"hidden_size": 8, "num_attention_heads": 2}})


def test_candidates_are_valid_and_include_cublas():
    """Without a GPU the candidates are listed as for an H100 / H200 (sm_90): GEMV at M <= 4, the flat GEMM up to
    M = 128, the Hopper GEMM from M = 33."""
    for m in (1, 8, 83, 150, 300, 600):
        for op, n, k in (("linear_residual", 4096, 11008), ("gate_up_silu", 22016, 4096)):
            names = candidates(op, n, k, m, 132)
            assert names[0] == "cublas" and len(set(names)) == len(names)
            DispatchTable(rules={f"{op}:{n}x{k}": [(m, name) for name in names[1:2]]})  # validates the name
            families = {name.partition(":")[0] for name in names[1:]}
            assert ("gemv" in families) == (m <= 4)
            assert ("flat" in families) == (m <= 128)
            assert ("hopper" in families) == (m >= 33)


def test_compile_jobs_one_run_per_kernel_variant():
    shapes = model_linear_shapes(4096, 11008, 32)[1:2]  # the O projection
    jobs = compile_jobs(shapes, [8, 16, 208, 608], torch.bfloat16, 132)
    sigs = [compile_signature(j.op, j.k, j.m, j.impl, j.bias) for j in jobs]
    assert len(sigs) == len(set(sigs))
    names = {(m, name) for m in (8, 16, 208, 608) for name in candidates("linear_residual", 4096, 4096, m, 132)[1:]}
    assert {compile_signature("linear_residual", 4096, m, name) for m, name in names} == set(sigs)
    assert len(jobs) < len(names)  # m = 8 and 16 share tiles; split factors, stream-K and M share one kernel
    assert {j.impl.partition(":")[0] for j in jobs} == {"flat", "hopper"}
    # a bias is a different kernel (the towers' linears)
    assert compile_signature("linear", 1024, 522, jobs[-1].impl, True) != compile_signature(
        "linear", 1024, 522, jobs[-1].impl, False)


# ---------------------------------------------------------------- calibration

def test_calibrate_phi_covers_a_narrow_distribution():
    lo, hi = default_safe_range(torch.float16)
    rm = torch.linspace(3.0, 9.0, 1000)  # spread 6 < window 12
    cal = calibrate_phi(rm, dtype=torch.float16)
    assert cal.coverage == 1.0 and cal.rows == 1000
    assert lo <= 3.0 - cal.phi and 9.0 - cal.phi <= hi
    assert abs((3.0 - cal.phi - lo) - (hi - (9.0 - cal.phi))) < 1e-5  # centred in the slack


def test_calibrate_phi_prefers_the_larger_cluster(tmp_path):
    rm = torch.cat([torch.full((900,), 5.0), torch.full((100,), 40.0), torch.tensor([float("-inf")])])
    cal = calibrate_phi(rm, dtype=torch.float16)  # window 12 cannot hold both clusters
    assert abs(cal.coverage - 0.9) < 1e-6 and cal.rows == 1000
    assert cal.lo <= 5.0 - cal.phi <= cal.hi
    cal.save(tmp_path / "phi.json")
    assert SoftmaxCalibration.load(tmp_path / "phi.json") == cal


# ---------------------------------------------------------------- attention tile configs in the table

def test_choose_attention_and_roundtrip(tmp_path):
    from vla_accel.kernels import AttentionConfig, choose_attention
    small, big = AttentionConfig(32, 64, 4, 3).name, AttentionConfig(64, 64, 4, 3).name
    table = DispatchTable(gpu="Test GPU", attention={"d128": [(128, small), (768, big)]})
    assert choose_attention(table, 128, 64) == small
    assert choose_attention(table, 128, 129) == big
    assert choose_attention(table, 128, 769) is None  # beyond the tuned lengths: the launcher's default
    assert choose_attention(table, 64, 64) is None
    assert choose_attention(None, 128, 64) is None
    table.save(tmp_path / "t.json")
    assert load_table(tmp_path / "t.json").attention == table.attention
    assert AttentionConfig.parse(big) == AttentionConfig(64, 64, 4, 3)
    with pytest.raises(ValueError, match="bad attention config name"):
        DispatchTable(attention={"d128": [(64, "attn:bm64")]})
    with pytest.raises(ValueError, match="bad attention config name"):  # tile sizes must be positive
        AttentionConfig.parse("attn:bm0.bn64.w4.s3")


def test_linear_residual_inplace_cublas():
    """inplace=True with cuBLAS accumulates into the residual itself (no copy of it); the sum is unchanged."""
    from vla_accel.kernels import linear_residual

    g = torch.Generator().manual_seed(3)
    x, w, r = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(5, 6, generator=g)
    want = r + x @ w.t()
    res = r.clone()
    got = linear_residual(x, w, res, impl="cublas", inplace=True)
    assert got.data_ptr() == res.data_ptr()
    torch.testing.assert_close(got, want)
    out = linear_residual(x, w, r, impl="cublas")  # the default leaves the residual alone
    assert out.data_ptr() != r.data_ptr()
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------- layering, registry, where tables live
def test_kernels_import_nothing_of_vla_accel_outside_themselves():
    """kernels/ (vla_accel.kernels) sits at the bottom: its imports, read with ast, name no other vla_accel module
    (absolute `vla_accel.x` with x != kernels, or a relative import climbing out of the package)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kernels"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] == "vla_accel" and not n.startswith("vla_accel.kernels")]
    assert offenders == []


def test_a_new_family_plugs_in_through_the_registry(tmp_path):
    """One register() call: the table accepts the family's names, run_impl runs them, the tuner times them."""
    from vla_accel.kernels import FAMILIES, GemmFamily, register, run_impl
    from vla_accel.kernels.registry import family_of, parse_impl

    def parse(name):
        if name != "twice:x1":
            raise ValueError(f"bad twice config name '{name}'")
        return 2.0

    calls = []

    def run(x, w, config, *, bias=None, residual=None, gated=False, inplace=False):
        calls.append(config)
        return config * (x @ w.t())

    register(GemmFamily("twice", parse, run, candidates=lambda op, n, k, m, sms: ["twice:x1"] if m <= 8 else [],
                        example="twice:x1"))
    try:
        with pytest.raises(ValueError, match="registered already"):
            register(GemmFamily("twice", parse, run))
        table = DispatchTable(gpu="t", dtype="float32", rules={"linear:6x8": [(8, "twice:x1")]})
        x, w = torch.randn(3, 8), torch.randn(6, 8)
        assert choose(table, (6, 8), 3) == "twice:x1"
        torch.testing.assert_close(run_impl("twice:x1", x, w), 2 * x @ w.t())
        assert calls == [2.0]
        assert "twice:x1" in candidates("linear", 6, 8, 4, 132)
        assert "twice:x1" not in candidates("linear", 6, 8, 64, 132)
        with pytest.raises(ValueError, match="bad twice config name"):
            DispatchTable(rules={"linear:6x8": [(8, "twice:x2")]})
    finally:
        FAMILIES.pop("twice")
        family_of.cache_clear()
        parse_impl.cache_clear()
    with pytest.raises(ValueError, match="unknown implementation 'twice:x1'; valid families"):
        run_impl("twice:x1", x, w)


def test_tuned_table_comes_from_the_user_cache_first(tmp_path, monkeypatch):
    from vla_accel.kernels.table import TABLE_DIR, table_for_gpu, table_path, user_table_dir, user_table_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_table_dir() == tmp_path / "vla_accel" / "tables"
    h100 = "NVIDIA H100 80GB HBM3"
    assert table_path(h100) == TABLE_DIR / "nvidia-h100-80gb-hbm3.json"  # nothing tuned here: the packaged one
    assert table_for_gpu(h100).rules  # (packaged rules)
    assert table_for_gpu("Test GPU 9000").rules == {} and table_path("Test GPU 9000") is None
    mine = DispatchTable(gpu=h100, rules={"linear:8x8": [(4, "cublas")]})
    mine.save(user_table_path(h100))
    assert table_path(h100) == tmp_path / "vla_accel" / "tables" / "nvidia-h100-80gb-hbm3.json"
    assert table_for_gpu(h100).rules == {"linear:8x8": [(4, "cublas")]}
    DispatchTable(gpu=h100, rules={"linear:8x8": [(2, "cublas")]}).save(user_table_path(h100))  # re-tuned
    assert table_for_gpu(h100).rules == {"linear:8x8": [(2, "cublas")]}
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_table_dir() == tmp_path / "home" / ".cache" / "vla_accel" / "tables"


def test_tuner_writes_where_asked_or_into_the_user_cache(tmp_path, monkeypatch):
    from pathlib import Path

    from vla_accel.kernels.tune import dims_from_args, output_path, parse_args
    from vla_accel.runtime.tune import tuner_argv

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = parse_args(["--dims", "4096", "11008", "32"])
    assert dims_from_args(args) == (4096, 11008, 32, 32)
    want = tmp_path / "vla_accel" / "tables" / "nvidia-h100-80gb-hbm3.json"
    assert output_path(args, "NVIDIA H100 80GB HBM3") == want
    assert output_path(parse_args(["--dims", "8", "16", "2", "--out", "t.json"]), "x") == Path("t.json")
    with pytest.raises(SystemExit):
        parse_args([])  # shapes are required: --dims or --config
    with pytest.raises(SystemExit):
        parse_args(["--dims", "8", "16"])
    # vla-accel-tune maps the project's presets onto --dims
    towers = ["--vit", "1024", "4096", "522", "--vit", "1152", "4304", "512"]
    assert tuner_argv(["--preset", "7b", "--m", "1"]) == ["--m", "1", "--dims", "4096", "11008", "32", "32"] + towers
    assert tuner_argv([]) == ["--dims", "4096", "11008", "32", "32"] + towers  # default: 7b
    assert tuner_argv(["--config", "c.json"]) == ["--config", "c.json"]
