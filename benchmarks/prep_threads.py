"""The policy's image pre-processing of one batch on 1..N threads (Policy.prep_threads), any machine.

    python -m benchmarks.prep_threads [--trace T.npz] [--batch 8] [--threads 1,2,4] [--repeats 10]

Times `Policy.prepare` (the TF-exact JPEG round trip, Lanczos resize, crop and normalization of both cameras,
plus tokenization) of `--batch` observations, the thread counts interleaved; prints the median and minimum per
count. Frames: a recorded trace (vla_accel.envs.trace layout) or, without one, the synthetic 256 px scene of
vla_accel.prune.demo.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    import vla_accel
    from vla_accel.prune.demo import synthetic_trace

    if args.trace:
        with np.load(args.trace) as d:
            trace = {k: d[k] for k in ("full_image", "wrist_image", "state")}
    else:
        trace = synthetic_trace(steps=args.batch, size=256)
    n = len(trace["state"])
    obs = [{k: trace[k][i % n] for k in ("full_image", "wrist_image", "state")} for i in range(args.batch)]
    texts = ["put the bowl on the plate"] * args.batch
    policy = vla_accel.random_policy("tiny", seed=0)
    counts = [int(t) for t in args.threads.split(",")]
    policy.prepare(obs, texts)  # warm-up (lookup tables, the pool)
    times: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(args.repeats):
        for t in counts:
            policy.prep_threads = t
            t0 = time.perf_counter()
            policy.prepare(obs, texts)
            times[t].append(time.perf_counter() - t0)
    res = {t: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v)} for t, v in times.items()}
    for t, r in res.items():
        print(f"prep_threads={t}: Policy.prepare of {args.batch} observations (2 x 256 px each): median "
              f"{r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms ({args.repeats} interleaved repeats)")
    return res


if __name__ == "__main__":
    main()
