"""Replay a recorded trace through SpecPrune: kept tokens per step, FLOPs, and overlay pictures.

    python -m vla_accel.prune.demo --trace /tmp/trace.npz --out /tmp/prune_demo            # tiny random policy
    python -m vla_accel.prune.demo --trace T.npz --out D --prune static_only --steps 40
    python -m vla_accel.prune.demo --make-synthetic /tmp/synth.npz                          # a synthetic trace

The trace is what `vla_accel.envs.trace.save_trace` writes (full_image / wrist_image [T, H, W, 3] uint8,
state [T, 8], action [T, 7], instruction). Each step's observation goes through `act_batch`; the
controller and the frame gap see the trace's recorded actions (what the env really ran). Written to --out:
steps.jsonl (one line per step), summary.json, overlays/step_XXX.png (one per query: both cameras with
the kept patches marked, see overlay.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .config import SpecPruneConfig, yaml_path
from .overlay import save_png


def load_trace(path) -> dict:
    try:
        from vla_accel.envs.trace import load_trace as env_load
    except ImportError:  # the env package is optional; same file format
        env_load = None
    if env_load is not None:
        return env_load(path)
    with np.load(path, allow_pickle=False) as data:
        trace = {k: data[k] for k in ("full_image", "wrist_image", "state", "action")}
        trace["instruction"] = str(data["instruction"])
    return trace


def synthetic_trace(steps: int = 24, size: int = 256, seed: int = 0) -> dict:
    """A scene a pruner can be judged on: a fixed textured background per camera, a red block that the
    'arm' pushes to the right in the third-person view, and a wrist view whose texture shifts with the
    arm. Actions are the block's motion (xyz deltas), slowing to a near stop in the last third."""
    rng = np.random.default_rng(seed)
    bg_full = (rng.integers(40, 200, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)).astype(np.uint8)
    bg_wrist = (rng.integers(40, 200, (size // 4, size // 4 * 2, 3)).repeat(4, 0).repeat(4, 1)).astype(np.uint8)
    full, wrist, state, action = [], [], [], []
    x, pos = size * 0.2, np.zeros(3)
    for t in range(steps):
        speed = 6.0 if t < 2 * steps // 3 else 0.5
        a = np.array([speed / 8, 0.0, -0.05, 0.0, 0.0, 0.02, -1.0])
        img = bg_full.copy()
        x0 = int(x)
        img[size // 2 - 20:size // 2 + 20, x0:x0 + 40] = (220, 30, 30)
        shift = int(x - size * 0.2)
        w = bg_wrist[:, shift:shift + size].copy()
        full.append(img)
        wrist.append(w)
        state.append(np.concatenate([pos, np.zeros(3), [0.04, -0.04]]).astype(np.float32))
        action.append(a)
        x = min(x + speed, size - 41)
        pos = pos + a[:3] * 0.01
    return {"full_image": np.stack(full), "wrist_image": np.stack(wrist), "state": np.stack(state),
            "action": np.stack(action), "instruction": "push the red block to the right"}


def write_trace(path, trace: dict) -> Path:
    from vla_accel.envs.trace import save_trace

    frames = [{k: trace[k][t] for k in ("full_image", "wrist_image", "state", "action")}
              for t in range(len(trace["action"]))]
    return save_trace(path, frames, trace["instruction"], meta={"source": "synthetic"})


def prune_config(name_or_path: str) -> SpecPruneConfig:
    from omegaconf import OmegaConf

    p = Path(name_or_path)
    if not p.exists():
        p = yaml_path(name_or_path)
    if not p.exists():
        raise SystemExit(f"no prune config '{name_or_path}' (a path or a name in configs/prune/)")
    return SpecPruneConfig.from_dict(OmegaConf.load(p))


def run(trace: dict, out: Path, cfg: SpecPruneConfig, policy, steps: int | None = None,
        max_overlays: int | None = None) -> dict:
    from .wrapper import SpecPrune

    actor = SpecPrune(policy, cfg)
    actor.reset([0])
    n = len(trace["action"]) if steps is None else min(steps, len(trace["action"]))
    out.mkdir(parents=True, exist_ok=True)
    rows, overlays = [], []
    with open(out / "steps.jsonl", "w") as f:
        for t in range(n):
            obs = {"full_image": trace["full_image"][t], "wrist_image": trace["wrist_image"][t],
                   "state": trace["state"][t]}
            _, infos = actor.act_batch([obs], [trace["instruction"]], [0], executed=trace["action"][t][None])
            info = {"step": t, **infos[0]}
            if info["queried"] and (max_overlays is None or len(overlays) < max_overlays):
                png = save_png(out / "overlays" / f"step_{t:03d}.png", actor.overlay_frame(0))
                overlays.append(str(png))
                info["overlay"] = str(png)
            rows.append(info)
            f.write(json.dumps(info) + "\n")
    q = [r for r in rows if r["queried"]]
    flops = sum(r["gflops"] for r in q)
    full = sum(r["gflops_full"] for r in q)
    summary = {
        "steps": n, "queries": len(q), "prune": cfg.name,
        "tokens_full": [r["tokens_full"] for r in q],
        "tokens_kept": [r["tokens_kept"] for r in q],
        "kept_per_camera": [r["kept_per_camera"] for r in q],
        "modes": [r["mode"] for r in q],
        "flops_ratio": flops / full if full else None,
        "flops_reduction": full / flops if flops else None,
        "overlays": overlays,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", help="trace .npz (vla_accel.envs.trace format)")
    ap.add_argument("--out", default="prune_demo", help="output folder")
    ap.add_argument("--prune", default="specprune", help="name in configs/prune/ or a YAML path")
    ap.add_argument("--preset", default="tiny", help="random-weights model preset (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", default=None, help="OpenVLA-OFT checkpoint dir or hub id")
    ap.add_argument("--unnorm-key", default=None)
    ap.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    ap.add_argument("--max-overlays", type=int, default=None, help="PNG overlays for at most N queries")
    ap.add_argument("--make-synthetic", metavar="PATH", help="write a synthetic trace to PATH and exit")
    ap.add_argument("--synthetic-steps", type=int, default=24)
    args = ap.parse_args(argv)

    if args.make_synthetic:
        print(write_trace(args.make_synthetic, synthetic_trace(args.synthetic_steps)))
        return
    if not args.trace:
        ap.error("--trace is required (or --make-synthetic PATH)")
    import vla_accel

    policy = (vla_accel.load_policy(args.checkpoint, unnorm_key=args.unnorm_key) if args.checkpoint
              else vla_accel.random_policy(args.preset))
    summary = run(load_trace(args.trace), Path(args.out), prune_config(args.prune), policy, args.steps,
                  args.max_overlays)
    print(f"{'step':>4} {'mode':>6} {'tokens kept/full':>16} {'cam0':>5} {'cam1':>5}")
    with open(Path(args.out) / "steps.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["queried"]:
                print(f"{r['step']:>4} {r['mode']:>6} {r['tokens_kept']:>8}/{r['tokens_full']:<7} "
                      f"{r['kept_per_camera'][0]:>5} {r['kept_per_camera'][1]:>5}   per layer {r['kept_per_layer']}")
    print(f"backbone FLOPs: {summary['flops_ratio']:.3f} of unpruned ({summary['flops_reduction']:.2f}x fewer) "
          f"over {summary['queries']} queries; overlays in {Path(args.out) / 'overlays'}")


if __name__ == "__main__":
    main()
