"""Times Policy.prepare for one observation with two 256 x 256 camera frames (the LIBERO step's host
pre-processing: JPEG round trip, Lanczos resize, center crop, normalization, proprio, tokenization).

    python benchmarks/prepare_timing.py [--runs 300] [--threads N]

Prints the median / p10 / min wall time and the median CPU time (process time: less sensitive to other
processes on a shared machine), with the load average, so numbers from different machines can be read
side by side. The frames are the two rendered LIBERO frames of tests/fixtures/preprocessing_goldens.npz.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from vla_accel import random_policy

GOLDENS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "preprocessing_goldens.npz"


def frame(d, name: str) -> np.ndarray:  # the goldens store images delta-filtered (see the golden script)
    return np.cumsum(np.cumsum(d[f"{name}__input"], axis=0, dtype=np.uint8), axis=1, dtype=np.uint8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = np.load(GOLDENS)
    obs = {"full_image": frame(d, "sim_libero_spatial_0_full"), "wrist_image": frame(d, "sim_libero_10_3_wrist"),
           "state": np.zeros(8)}
    policy = random_policy("tiny")
    text = "put both the alphabet soup and the tomato sauce in the basket"
    for _ in range(5):  # warm-up: span tables, allocator
        policy.prepare([obs], [text])
    wall, cpu = [], []
    for _ in range(args.runs):
        t0, c0 = time.perf_counter(), time.process_time()
        policy.prepare([obs], [text])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    wall, cpu = np.array(wall) * 1e3, np.array(cpu) * 1e3
    print(f"Policy.prepare, 1 obs x 2 frames 256 px, {args.runs} runs, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"wall median {np.median(wall):.2f} ms, p10 {np.percentile(wall, 10):.2f}, min {wall.min():.2f}; "
          f"CPU median {np.median(cpu):.2f} ms")


if __name__ == "__main__":
    main()
