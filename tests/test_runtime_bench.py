"""CPU: the benchmarks (`python -m benchmarks.e2e`, `benchmarks.profile_step`) run end to end on the tiny model
(emulated graphs) and the e2e equivalence checks pass at fp32 tolerance; the targets are data; no installed module
imports benchmarks/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.e2e import check_targets, load_targets, main as e2e


def tiny_trace(path: Path, steps: int = 3) -> Path:
    from vla_accel.envs.trace import save_trace

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    frames = []
    for t in range(steps):  # a slowly changing scene, so the changed-patch rule sees motion
        img = base.copy()
        img[:, 10 * t:10 * t + 20, 10:40] = 255 - img[:, 10 * t:10 * t + 20, 10:40]
        frames.append({"full_image": img[0], "wrist_image": img[1], "state": rng.normal(size=8) * 0.1,
                       "action": rng.normal(size=7) * 0.3})
    return save_trace(path / "trace.npz", frames, "put the bowl on the plate", {"suite": "test"})


@pytest.mark.slow
def test_bench_e2e_smoke(tmp_path):
    """Configurations (b)-(e) and the peer (--peer; torch.compile's "eager" backend stands in for inductor's
    max-autotune on the CPU, the CUDA-graph variant runs eagerly there)."""
    trace = tiny_trace(tmp_path)
    e2e(["--trace", str(trace), "--preset", "tiny", "--device", "cpu", "--steps", "3", "--allow-short",
              "--configs", "b,c,d,e", "--streams", "2", "--check-every", "1", "--out", str(tmp_path / "out"),
              "--peer", "--peer-backend", "eager", "--peer-reps", "2"])
    res = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert not res["errors"], res["errors"]
    assert {"b", "c", "d", "d'", "e", "e'"} <= set(res["configs"])
    for key in ("c", "d", "e"):
        assert res["checks"][key]["pass"], res["checks"][key]
    c, d = res["configs"]["c"], res["configs"]["d"]
    assert d["tokens_mean"] < c["tokens_mean"]  # SpecPrune pruned
    assert d["floor_at_mean_tokens_ms"] > 0 and len(d["tokens_per_layer_mean"]) == 8
    # floors from the run's ceilings: on a CPU the H100 fallback, named as such
    ceil = res["ceilings"]
    assert ceil["source"].startswith("H100 constants") and ceil["copy_bytes_per_s"] == 2.96e12
    terms = c["floor_terms"]
    assert terms["bytes_ms"] == pytest.approx(terms["weight_gb"] * 1e9 / ceil["copy_bytes_per_s"] * 1e3)
    assert terms["flops_ms"] == pytest.approx(terms["tflop"] * 1e12 / ceil["matmul_flops_per_s"] * 1e3)
    # the peer: both modes at the (d) and (c) token counts, checked against the eager body; our backbone split (the
    # peer targets' other figure) needs CUDA events: none on a CPU, so no ratio and no peer target there
    for role, tokens in (("d", round(d["tokens_mean"])), ("c", c["tokens_mean"])):
        for mode in ("ma", "graph"):
            p = res["configs"][f"peer_{mode}_{role}"]
            assert p["tokens"] == tokens and p["latency_ms"]["n"] == 2 and p["latency_ms"]["median"] > 0
            assert p["rel_vs_eager"] < 1e-5  # fp32, the same operations
            assert p["floor_ms"] == p["floor_terms"]["stages_ms"]["backbone"] > 0
            assert p["ours_backbone_ms"] is None and p["peer_over_ours"] is None
        ma = res["configs"][f"peer_ma_{role}"]
        assert ma["backend"] == "eager" and ma["compile_s"] > 0 and ma["mode"] == "max-autotune"
        assert "eager: no CUDA graphs" in res["configs"][f"peer_graph_{role}"]["note"]
    assert not any(name.startswith("backbone_") for name in res["targets"])
    md = (tmp_path / "out" / "e2e.md").read_text()
    assert md.startswith("# End-to-end") and "Ceilings (every floor below uses them)" in md and "peer_ma_d" in md


@pytest.mark.slow
def test_profile_smoke(tmp_path):
    """`python -m benchmarks.profile_step` on the tiny model on CPU: every section runs and is written (the GPU-only
    parts -- kernel timings, sync audit, traces -- are left out there, and say so)."""
    from benchmarks.profile_step import main as profile

    trace = tiny_trace(tmp_path)
    profile(["--trace", str(trace), "--preset", "tiny", "--device", "cpu", "--steps", "3",
             "--out", str(tmp_path / "p")])
    out = tmp_path / "p"
    summary = json.loads((out / "summary.json").read_text())
    assert {"vision", "c", "d", "d_replay", "d_host_breakdown"} <= set(summary)
    host = summary["d_host_breakdown"]
    assert host["PrunePlan.scores"]["calls_per_query"] == 3  # score layers 0, 1, 3 of the tiny schedule
    assert host["AccelRunner.forward"]["calls_per_query"] == 1 and host["_latency_ms_median"] > 0
    for name in ("kernels_c.txt", "host_d.txt", "host_d_ops.txt"):
        assert (out / name).stat().st_size > 0
    assert "GPU only" in (out / "ops_error.txt").read_text()


def test_bench_needs_a_long_trace(tmp_path):
    with pytest.raises(SystemExit, match="need >= 50 consecutive steps"):
        e2e(["--trace", str(tiny_trace(tmp_path)), "--preset", "tiny", "--device", "cpu"])


def test_targets_are_data(tmp_path):
    configs = {"c": {"latency_ms": {"median": 13.0}, "floor_ms": 10.0},
               "d": {"latency_ms": {"median": 5.0}, "floor_at_mean_tokens_ms": 4.0, "chunks_per_s": 200.0},
               "a": {"latency_ms": {"median": 40.0}}}
    got = check_targets(configs, load_targets())  # benchmarks/targets.json
    assert got["c_le_1.3x_floor"] == {"ratio": 1.3, "met": True}
    assert got["d_le_1.3x_floor_at_mean_tokens"] == {"ratio": 1.25, "met": True}
    assert got["d_ge_4x_faster_than_a"] == {"ratio": 8.0, "met": True}
    assert "e_ge_4x_chunks_per_s_of_d" not in got  # (e) not measured: left out
    assert "backbone_d_ge_1.6x_faster_than_max_autotune" not in got  # no --peer
    configs["c"]["split_ms"], configs["d"]["split_ms"] = {"backbone": 10.0}, {"backbone": 4.0}
    configs["peer_ma_c"], configs["peer_ma_d"] = {"latency_ms": {"median": 14.0}}, {"latency_ms": {"median": 6.0}}
    got = check_targets(configs, load_targets())
    assert got["backbone_c_ge_1.3x_faster_than_max_autotune"] == {"ratio": 1.4, "met": True}
    assert got["backbone_d_ge_1.6x_faster_than_max_autotune"] == {"ratio": 1.5, "met": False}
    mine = tmp_path / "t.json"
    mine.write_text(json.dumps({"e2e": [{"name": "c fast", "ratio": ["c.latency_ms.median", "c.floor_ms"],
                                         "at_most": 1.2}]}))
    assert check_targets(configs, load_targets(mine)) == {"c fast": {"ratio": 1.3, "met": False}}
    mine.write_text(json.dumps({"e2e": [{"name": "bad", "ratio": ["c.floor_ms"]}]}))
    with pytest.raises(ValueError, match="needs a name, ratio"):
        load_targets(mine)


def test_no_installed_module_imports_benchmarks():
    """benchmarks/ is run from a checkout; the installed package (vla_accel, kernels, envs, configs) never needs it."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("vla_accel", "kernels", "envs", "configs"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert offenders == []


def test_no_benchmark_module_shadows_the_standard_library():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a module there named like a standard one
    replaces it for every import: benchmarks/profile.py broke `import cProfile` (torch._dynamo) on the GPU."""
    names = {p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))
