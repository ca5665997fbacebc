"""Latency of one forward with and without a pruning plan (random weights; token counts decide the cost).

    python -m vla_accel.prune.bench --preset 7b --device cuda --batch 1 8

Per batch size: the vision encoder alone, the unpruned forward, a plan that scores but keeps every token
(the plan's own overhead), static-only and full SpecPrune plans with a fixed share of changed patches, and
the host time spent inside the hook's methods (static drops capped as configured: at least 56 patches
per camera stay).
The executor is the policy's (`policy.executor`): plain PyTorch unless a runtime installed another.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .config import SpecPruneConfig, yaml_path
from .plan import plan_for_batch
from .wrapper import SpecPrune


def timed(fn, reps: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--changed", type=float, nargs=2, default=[0.1, 0.4], help="share of changed patches, "
                    "spread linearly over the samples of a batch")
    args = ap.parse_args(argv)
    import vla_accel

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    policy = vla_accel.random_policy(args.preset, device=args.device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    import yaml  # (omegaconf's own YAML reader; omegaconf itself may be missing on a bare GPU box)

    base = yaml.safe_load(yaml_path("specprune").read_text())
    full = SpecPruneConfig.from_dict(base)
    static_only = SpecPruneConfig.from_dict({**base, "dynamic": {**base["dynamic"], "enabled": False}})
    actor = SpecPrune(policy, full)
    rng = np.random.default_rng(0)
    print(f"{args.preset} on {args.device} ({dtype}), executor {policy.executor_name}")
    for B in args.batch:
        obs = [{"full_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
                "wrist_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), "state": np.zeros(8)}
               for _ in range(B)]
        ids, pix, prop = policy.prepare(obs, ["pick up the black bowl and place it on the plate"] * B)
        _, lens = policy.batch_ids(ids)
        g = torch.Generator().manual_seed(0)
        share = torch.linspace(args.changed[0], args.changed[1], B)[:, None]
        changed = torch.rand(B, 512, generator=g) < share

        def plan(cfg, k=(16, 12), ch=changed):  # similarity 0 for the changed patches, 1 elsewhere
            return plan_for_batch(cfg, actor.schedule, actor.dims, lens, k_local=torch.tensor([k] * B),
                                  similarity=(~ch).double(),
                                  max_static=torch.tensor([full.static.changed.max_static] * B))

        def run(make):
            return lambda: policy.predict_from_inputs(ids, pix, prop, hook=make())

        with torch.inference_mode():
            pv = pix.to(args.device, dtype)
            vision = timed(lambda: policy.model.encode_images(pv), args.reps, sync)
        ms = {
            "unpruned": timed(run(lambda: None), args.reps, sync),
            "scores_keep_all": timed(run(lambda: plan(static_only, (256, 256), torch.ones(B, 512, dtype=torch.bool))),
                                     args.reps, sync),
            "static_only": timed(run(lambda: plan(static_only)), args.reps, sync),
            "specprune": timed(run(lambda: plan(full)), args.reps, sync),
        }
        host = {"before_layer": 0.0, "score_rows": 0.0, "on_scores": 0.0}  # host time inside the hook

        def timed_plan():
            p = plan(full)
            for name in host:
                def call(*a, _f=getattr(p, name), _n=name):
                    t = time.perf_counter()
                    out = _f(*a)
                    host[_n] += time.perf_counter() - t
                    return out
                setattr(p, name, call)
            return p

        timed(run(timed_plan), args.reps, sync)
        hook_ms = {k: round(v / (args.reps + 3) * 1e3, 2) for k, v in host.items()}
        p = plan(full)
        policy.predict_from_inputs(ids, pix, prop, hook=p)
        s = p.summary()
        print(f"B={B}: vision {vision:.1f} ms | " + " | ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
        print(f"   host time inside the specprune hook per forward (ms, on_scores includes waiting for the "
              f"scored layer): {hook_ms}")
        print(f"   specprune tokens per layer (sample 0, every 4th): {s[0]['kept_per_layer'][::4]} -> "
              f"{s[0]['tokens_kept']}; backbone FLOPs ratio {[round(x['flops_ratio'], 3) for x in s]}")


if __name__ == "__main__":
    main()
