"""Host time of the pruning plan per forward, on CPU, without a model.

    python -m benchmarks.plan_host --layout tiny 7b --batch 1 8

The plan only sees key mass [B, S]: a minimal executor feeds it synthetic key mass (random, continuous) of the real
token layout (2 x 256 patches, ~35-token prompts, ragged over a batch; 10 % to 40 % changed patches over a batch,
so the static cap binds and the changed rule ranks by score) with the schedule of `configs/prune/specprune.yaml`
(tiny: the 8-layer model's `layers_for_depth` entry). Timed, per forward (median over reps, ms): the constructor,
each PruneDecisions method (keep, rows, scores) summed over the layers, summary(), and the sync path: the host
time between the blocking read of a static layer's key mass and the launch of the next layer (scores of that
layer + keep and rows of the next), when a GPU waits for the host. One torch thread, like the host thread of a
GPU run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml

from vla_accel.prune.config import SpecPruneConfig, yaml_path
from vla_accel.prune.plan import Dims, plan_for_batch

LAYOUTS = {  # name -> (layers, hidden, intermediate) of the model (the FLOPs in summary())
    "tiny": (8, 64, 172),
    "7b": (32, 4096, 11008),
}
PARTS = ("init", "keep", "rows", "scores", "summary", "sync_path")


def one_forward(cfg, layout: str, B: int, seed: int) -> dict[str, float]:
    """Drives one plan through every layer -> host ms per part."""
    layers, hidden, inter = LAYOUTS[layout]
    dims = Dims(num_layers=layers, hidden=hidden, intermediate=inter)
    sched = cfg.resolve(layers)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(33, 38, (B,), generator=g)
    total = lens + dims.n_vis + 1 + dims.num_tail  # BOS + prompt[1:], patches, proprio, tail
    S = int(total.max())
    mass = torch.rand(layers, B, S, generator=g)  # one key-mass row per layer (sliced to the current length)
    changed = torch.rand(B, dims.n_vis, generator=g) < torch.linspace(0.1, 0.4, B)[:, None]  # as in bench.py
    kw = dict(k_local=torch.tensor([list(cfg.static.topk)] * B),
              similarity=(~changed).double(),  # 0 for the changed patches, 1 elsewhere
              max_static=torch.tensor([list(cfg.static.changed.max_static)] * B),
              global_prev=torch.rand(B, dims.n_vis, generator=g) < 0.05)
    key_mask = torch.arange(S)[None] < total[:, None]
    ms = dict.fromkeys(PARTS, 0.0)

    def timed(part, sync, f, *a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        dt = (time.perf_counter() - t0) * 1e3
        ms[part] += dt
        ms["sync_path"] += dt if sync else 0.0
        return out

    plan = timed("init", False, plan_for_batch, cfg, sched, dims, lens, **kw)
    for i in range(layers):
        after_read = i - 1 in plan.static_layers
        keep = timed("keep", after_read, plan.keep, i)
        if keep is not None:
            key_mask = torch.from_numpy(keep.valid)
        if timed("rows", after_read, plan.rows, i) is not None:
            m = mass[i, :, :key_mask.shape[1]] * key_mask
            timed("scores", i in plan.static_layers, plan.scores, i, m)
    timed("summary", False, plan.summary)
    return ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SpecPruneConfig.from_dict(yaml.safe_load(yaml_path("specprune").read_text()))
    print(f"host ms per forward, median of {args.reps} (hooks = keep + rows + scores; "
          f"total = init + hooks + summary; sync_path: part of the hooks)")
    print(f"{'layout':>6} {'B':>3} " + " ".join(f"{p:>12}" for p in PARTS) + f" {'hooks':>8} {'total':>8}")
    for layout in args.layout:
        for B in args.batch:
            for r in range(5):  # warm-up
                one_forward(cfg, layout, B, r)
            runs = [one_forward(cfg, layout, B, r) for r in range(args.reps)]
            med = {p: float(np.median([x[p] for x in runs])) for p in PARTS}
            hooks = float(np.median([x["keep"] + x["rows"] + x["scores"] for x in runs]))
            total = float(np.median([sum(x[p] for p in PARTS[:5]) for x in runs]))
            cols = " ".join(f"{med[p]:>12.3f}" for p in PARTS)
            print(f"{layout:>6} {B:>3} {cols} {hooks:>8.3f} {total:>8.3f}")


if __name__ == "__main__":
    main()
