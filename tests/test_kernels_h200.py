"""Issue 15, phase 2 (no GPU): the Hopper family in the registry, the packaged dispatch tables' validity, the H200
table's provenance (benchmarks/hopper_table.py from the committed benchmark result), the tuner's compile wall
limit, and the arithmetic of the measured ceilings (benchmarks/roofline.py)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton's interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.hopper_table import close_kinds, table_from_result  # noqa: E402
from vla_accel.kernels import (  # noqa: E402
    FAMILIES,
    flat_gemm_hopper as hopper,  # noqa: E402
    load_table,
)
from vla_accel.kernels.registry import (  # noqa: E402
    HOPPER_MIN_M,
    HOPPER_TUNE_KINDS,
    hopper_kind,
    parse_impl,
)
from vla_accel.kernels.table import OPS, TABLE_DIR, choose, gpu_slug  # noqa: E402
from vla_accel.kernels.tune import CompileJob, candidates, compile_signature, pick, precompile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H200_RESULT = ROOT / "benchmarks" / "results" / "gemm_hopper_nvidia-h200_2026-11-30.json"
TABLES = sorted(TABLE_DIR.glob("*.json"))
# the runtime's calls at the 7B shapes, and the towers' linears: (op, n, k)
SHAPES = [("linear", 12288, 4096), ("linear_residual", 4096, 4096), ("gate_up_silu", 22016, 4096),
          ("linear_residual", 4096, 11008), ("linear", 3072, 1024), ("linear", 1152, 4304)]


# ---------------------------------------------------------------- the registry entry

def test_hopper_family_is_registered():
    family = FAMILIES["hopper"]
    assert list(FAMILIES)[-1] == "hopper" and family.compile_key is not None
    for cfg in (hopper.HopperGemmConfig(), hopper.HopperGemmConfig(64, 256, 64, 8, 4, split_k=4),
                hopper.HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1, tma=False)):
        fam, parsed = parse_impl(cfg.name)
        assert fam is family and parsed == cfg
    with pytest.raises(ValueError, match="bad Hopper GEMM config name"):
        parse_impl("hopper:bm128.bn128")
    parse_impl(family.example)


@pytest.mark.parametrize("op, n, k", SHAPES)
@pytest.mark.parametrize("m", [1, 32, 33, 64, 208, 608, 4176])
def test_hopper_candidates_are_the_pruned_kinds(op, n, k, m):
    """The tuner times the kinds of HOPPER_TUNE_KINDS among flat_gemm_hopper.candidates (none warp-specialised),
    from M = 33 on; each names a config the launcher accepts for the shape."""
    gated = op == "gate_up_silu"
    names = [c for c in candidates(op, n, k, m, 132) if c.startswith("hopper:")]
    full = [c.name for c in hopper.candidates(m, n // 2 if gated else n, k, gated=gated, num_sms=132)]
    if m < HOPPER_MIN_M:
        assert names == []
        return
    assert names and set(names) <= set(full)
    assert len(names) < len(full)  # pruned: ws1, sk2 and more are out
    for name in names:
        cfg = hopper.HopperGemmConfig.parse(name)
        assert hopper_kind(cfg) in HOPPER_TUNE_KINDS and not cfg.warp_spec
    assert {c for c in full if hopper_kind(hopper.HopperGemmConfig.parse(c)) in HOPPER_TUNE_KINDS} == set(names)


def test_hopper_compile_key_ignores_the_schedule():
    """split-K / stream-K are run-time scalars: one compiled kernel per tile, load path, epilogue (and bias)."""
    dp, split, sk = (hopper.HopperGemmConfig(128, 128, 64, 8, 4, split_k=s, stream_k=t).name
                     for s, t in ((1, 0), (3, 0), (1, 1)))
    sig = {compile_signature("linear", 4096, m, name) for name in (dp, split, sk) for m in (64, 208, 608)}
    assert len(sig) == 1
    others = [hopper.HopperGemmConfig(128, 128, 64, 8, 4, tma=False).name,
              hopper.HopperGemmConfig(128, 256, 64, 8, 3).name]
    assert len({compile_signature("linear", 4096, 208, n) for n in [dp] + others}) == 3
    assert compile_signature("gate_up_silu", 4096, 208, dp) != compile_signature("linear", 4096, 208, dp)
    assert compile_signature("linear", 4096, 208, dp, bias=True) != compile_signature("linear", 4096, 208, dp)


def test_warp_specialisation_refused_on_triton_before_3_7(monkeypatch):
    """ws1 hangs Triton 3.6 on sm_90 (H200 run of 2026-11-30): refused on a GPU before 3.7, with a clear error."""
    monkeypatch.setattr(hopper, "triton_version", lambda: (3, 6))
    assert not hopper.warp_spec_usable("cuda") and hopper.warp_spec_usable("cpu")
    monkeypatch.setattr(hopper, "triton_version", lambda: (3, 7))
    assert hopper.warp_spec_usable("cuda")


def test_hopper_tune_kinds_come_from_the_h200_run():
    """HOPPER_TUNE_KINDS is what benchmarks/hopper_table.py --kinds derives from the committed H200 result."""
    assert close_kinds(json.loads(H200_RESULT.read_text())) == HOPPER_TUNE_KINDS


# ---------------------------------------------------------------- the packaged tables

@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_packaged_table_is_valid(path):
    """Every rule names a registered implementation with a valid config (DispatchTable validates on load); every
    kernel of ours is one the tuner would time at the rule's M on sm_90 (hence one it compiles), for the shape's op;
    every key is an op of the runtime with positive N, K; rules increase in M."""
    table = load_table(path)
    assert table.rules and table.dtype == "bfloat16" and path.name == f"{gpu_slug(table.gpu)}.json"
    for key, rules in table.rules.items():
        op, _, nk = key.partition(":")
        n, k = map(int, nk.split("x"))
        assert op in OPS and n > 0 and k > 0
        for m_max, impl in rules:
            if impl != "cublas":
                assert impl in candidates(op, n, k, m_max, 132), (key, m_max, impl)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_packaged_table_picks_ours_only_where_measured_faster(path):
    """Every rule of ours rests on a point of the table's own profile where it beat cuBLAS by more than the margin
    and the repeat spread (kernels.tune.pick), at the rule's M; cuBLAS elsewhere."""
    table = load_table(path)
    margin = table.meta.get("margin", 0.01)
    for key, rules in table.rules.items():
        points = {r["m"]: r for r in table.meta["profile"][key]}
        for m_max, impl in rules:
            if impl == "cublas":
                continue
            row = points[m_max]
            assert pick(row["times_us"], row.get("spread", 0.0), margin) == impl, (key, m_max)


def test_h200_table_derived_from_the_committed_result():
    """`python -m benchmarks.hopper_table <result> --out ...` on the committed H200 benchmark result: every rule at a
    measured M (or just below the first one, cuBLAS); cuBLAS wherever ours was not faster beyond the spread. The
    packaged kernels/tables/nvidia-h200.json is that table until a vla-accel-tune run on the H200 replaces it."""
    result = json.loads(H200_RESULT.read_text())
    derived = table_from_result(result, source=str(H200_RESULT.relative_to(ROOT)))
    packaged = load_table(TABLE_DIR / "nvidia-h200.json")
    assert packaged.gpu == derived.gpu == "NVIDIA H200"
    if packaged.meta.get("derived_by") == "python -m benchmarks.hopper_table":
        assert packaged.rules == derived.rules
        assert packaged.meta["source"] == "benchmarks/results/gemm_hopper_nvidia-h200_2026-11-30.json"
    measured = {}
    for p in result["points"]:
        measured.setdefault(derived_key(p), set()).add(p["m"])
    assert set(derived.rules) == set(measured)
    for key, rules in derived.rules.items():
        first = min(measured[key])
        for m_max, impl in rules:
            assert m_max in measured[key] or (m_max == first - 1 and impl == "cublas"), (key, m_max)
    # the phase-1 finding: ours only at gate|up M = 64 and 128 (2.5-3.6 % faster); cuBLAS at M = 768 (the 1.4 %
    # there is within cuBLAS's 2.8 % repeat spread) and everywhere else
    ours = {(k, m) for k, rules in derived.rules.items() for m, impl in rules if impl != "cublas"}
    assert ours == {("gate_up_silu:22016x4096", 64), ("gate_up_silu:22016x4096", 128)}
    assert choose(derived, (22016, 4096), 56, "gate_up_silu") == "cublas"  # not measured below 64
    assert choose(derived, (22016, 4096), 100, "gate_up_silu").startswith("hopper:bm128")
    assert choose(derived, (22016, 4096), 768, "gate_up_silu") == "cublas"
    assert choose(derived, (4096, 4096), 208, "linear_residual") == "cublas"


def derived_key(point: dict) -> str:
    op = {"none": "linear", "bias": "linear", "residual": "linear_residual", "gated": "gate_up_silu"}[point["epilogue"]]
    return f"{op}:{point['n']}x{point['k']}"


# ---------------------------------------------------------------- the tuner's compile phase

@pytest.mark.slow
def test_precompile_drops_what_hangs_within_the_wall_limit():
    """A job without a result by the wall limit fails and its process is killed; the others' results stand."""
    from compile_stub import sleepy_job

    jobs = [CompileJob("linear", 8, 8, 1, impl, "bfloat16") for impl in ("ok", "hang", "bad", "ok2")]
    t0 = time.time()
    failed = precompile(jobs, workers=2, timeout_s=45.0, worker=sleepy_job)  # (workers start in ~5-20 s here)
    assert time.time() - t0 < 90  # not the hung job's 600 s
    assert {j.impl: e for j, e in failed.items()} == {
        "hang": "no result within 45 s (a hung compiler or kernel, or too little time)", "bad": "RuntimeError: bad"}


# ---------------------------------------------------------------- ceilings (benchmarks/roofline.py)

def test_ceiling_arithmetic():
    from benchmarks.roofline import COPY_BW, MATMUL_RATE, ceilings, floor_ms, measure_ceilings, rates_from_times

    copy, mm = rates_from_times(2**30, 0.5e-3, 8192, 1.4e-3)
    assert copy == pytest.approx(2 * 2**30 / 0.5e-3)  # bytes read + bytes written
    assert mm == pytest.approx(2 * 8192**3 / 1.4e-3)  # 785 TFLOP/s
    assert floor_ms(4e9, 1e12, copy, mm) == pytest.approx(max(4e9 / copy, 1e12 / mm) * 1e3)
    fallback = ceilings("cpu")  # no measurement on a CPU: the H100 constants, said so
    assert (fallback["copy_bytes_per_s"], fallback["matmul_flops_per_s"]) == (COPY_BW, MATMUL_RATE)
    assert fallback["source"].startswith("H100 constants") and "cpu" in fallback["source"]
    small = measure_ceilings(torch.device("cpu"), copy_bytes=2**20, size=64, dtype=torch.float32, warmup=1, reps=3)
    assert small["copy_bytes_per_s"] > 0 and small["matmul_flops_per_s"] > 0 and small["source"] == "measured on cpu"


# ---------------------------------------------------------------- the tuner's profiling loop (CPU, interpreter)

@pytest.mark.slow
def test_profile_loop_checks_every_candidate_and_respects_the_budget():
    """The tuner's loop as the H200 runs it, on small shapes: every candidate of every family runs once against
    cuBLAS (the residual ops in place, the towers with a bias), cuBLAS and the fastest candidate are timed twice,
    and past the budget only cuBLAS is timed. The timer here is a stand-in (the real one needs CUDA graphs)."""
    from vla_accel.kernels.tune import Budget, LinearShape, build_table, profile

    calls = []

    def timer(fn, n_calls):  # 2 us for cuBLAS's first timing, 1 us for everything after: ties go to cuBLAS
        calls.append(n_calls)
        return 2.0 if len(calls) == 1 else 1.0

    shapes = [LinearShape("o", "linear_residual", 48, 64), LinearShape("gate_up", "gate_up_silu", 96, 64),
              LinearShape("vit_fc1", "linear", 40, 32, True, (40,))]
    prof = profile(shapes, [3, 40], torch.float32, log=lambda *a: None, device="cpu", timer=timer)
    assert list(prof) == ["linear_residual:48x64", "gate_up_silu:96x64", "linear:40x32"]
    assert [r["m"] for r in prof["linear:40x32"]] == [40]  # the tower's own M grid
    for key, rows in prof.items():
        op, _, nk = key.partition(":")
        n, k = map(int, nk.split("x"))
        for row in rows:
            names = candidates(op, n, k, row["m"], 132)[1:]
            assert set(row["errors"]) == set(names) and row["skipped"] == 0
            assert max(row["errors"].values()) < 1e-4, row["errors"]  # fp32 against cuBLAS's fp32
            assert set(row["times_us"]) == set(names) | {"cublas"} and len(row["cublas_us"]) == 2
    first = prof["linear_residual:48x64"][0]
    assert first["cublas_us"] == [2.0, 1.0] and first["spread"] == 1.0 and first["times_us"]["cublas"] == 1.0
    assert all(len(v) == 2 for row in prof["gate_up_silu:96x64"] for v in row["repeat_us"].values())
    table = build_table(prof, gpu="cpu", dtype="float32", margin=0.01, meta={})
    assert all(impl == "cublas" for rules in table.rules.values() for _, impl in rules)

    over = Budget(1e-9)  # spent at once: cuBLAS only, the rest counted as not timed
    time.sleep(0.01)
    prof = profile(shapes[:1], [40], torch.float32, log=lambda *a: None, device="cpu", timer=timer, budget=over)
    row = prof["linear_residual:48x64"][0]
    assert set(row["times_us"]) == {"cublas"}
    assert row["skipped"] == len(candidates("linear_residual", 48, 64, 40, 132)) - 1
