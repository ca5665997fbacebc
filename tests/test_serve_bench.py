"""benchmarks/serve_bench.py runs end to end on CPU with the tiny preset, as a script from the checkout (the GPU
run uses the 7B architecture): both sides answer, the served side answers every request, the files are written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from serve_clients import REPO, free_port

pytestmark = pytest.mark.slow


def test_serve_bench_smoke(tmp_path):
    rng = np.random.default_rng(0)
    T = 6
    trace = tmp_path / "trace.npz"  # the layout of vla_accel.envs.trace
    np.savez_compressed(trace, full_image=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                        wrist_image=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                        state=rng.normal(size=(T, 8)).astype(np.float32), action=rng.normal(size=(T, 7)),
                        instruction=np.array("put the bowl on the plate"), meta=np.array("{}"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_bench.py"), "--trace", str(trace),
                           "--preset", "tiny", "--device", "cpu", "--steps", "2", "--clients", "2",
                           "--windows-ms", "0,5",
                           "--port", str(free_port()), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "serve_bench.json").read_text())
    assert res["errors"] == {}
    assert [sv["window_ms"] for sv in res["served"]] == [0.0, 5.0]
    for sv in res["served"]:
        assert sv["answers"] == sv["expected_answers"] == 4 and sv["errors"] == [] and sv["latency_ms"]["n"] == 4
        assert sv["chunks_per_s"] > 0
    assert res["inprocess"]["chunks_per_s"] > 0 and res["inprocess_with_prep"]["chunks_per_s"] > 0
    assert "met" in res["target"]
    assert "| served: 2 clients" in (out / "serve_bench.md").read_text()
