"""How far pruning moves a policy's actions in closed loop: the unpruned actor drives one LIBERO episode; every
pruned actor sees the same observations and the executed actions (`SpecPrune.act_batch(..., executed=)`), and
its own action is compared with the executed one at every step.

    python -m benchmarks.prune_probe --checkpoint tests/fixtures/trained_object --suite libero_object \
        --task 0 --episode 30 --max-steps 120 [--out probe.json]

Reported per actor: mean and max |a - a_executed| over the six arm dimensions (actions in [-1, 1]) and the
median tokens kept per query. Actors: every configs/prune/*.yaml given with --prune (default static_only,
dynamic_only, specprune) plus "keep_all" (static_only with every patch kept: differs from the unpruned actor
only by the controller's re-planning, the noise floor of this comparison). Needs the simulator stack and
the LIBERO assets (VLA_ACCEL_LIBERO_ASSETS); runs on the CPU in minutes for a small checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def prune_cfg(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "prune" / f"{name}.yaml").read_text())
    for dotted, value in overrides.items():
        node, *path = cfg, *dotted.split(".")
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return cfg


def keep_all_cfg() -> dict:
    cfg = prune_cfg("static_only", **{"static.topk": [256, 256], "static.topk_fine": [256, 256],
                                      "static.first_factor": 1, "static.global_topk": [0, 0]})
    cfg["name"] = "keep_all"
    return cfg


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--episode", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--prune", nargs="+", default=["static_only", "dynamic_only", "specprune"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the figures as json here")
    args = ap.parse_args(argv)

    import vla_accel
    from vla_accel.envs.libero import LiberoEnv, task_instruction
    from vla_accel.policy import ChunkedActor
    from vla_accel.prune import make_actor

    policy = vla_accel.load_policy(args.checkpoint, device=args.device, dtype=torch.float32, unnorm_key=args.suite)
    actors = {"keep_all": make_actor(policy, keep_all_cfg())}
    actors.update({name: make_actor(policy, prune_cfg(name)) for name in args.prune})
    driver = ChunkedActor(policy)
    env = LiberoEnv(args.suite, args.task, image_size=256, max_steps=args.max_steps)
    obs, _ = env.reset(options={"episode": args.episode})
    text = task_instruction(args.suite, args.task)
    driver.reset([0])
    for a in actors.values():
        a.reset([0])
    dev = {n: [] for n in actors}
    kept = {n: [] for n in actors}
    steps, success = 0, False
    try:
        while True:
            act, _ = driver.act_batch([obs], [text], [0])
            for name, actor in actors.items():
                mine, infos = actor.act_batch([obs], [text], [0], executed=act)
                dev[name].append(float(np.abs(mine[0, :6] - act[0, :6]).mean()))
                if infos[0].get("tokens_kept") is not None:
                    kept[name].append(float(np.sum(infos[0]["tokens_kept"])))
            obs, _, terminated, truncated, _ = env.step(act[0])
            steps += 1
            if terminated or truncated:
                success = bool(terminated)
                break
    finally:
        env.close()
    res = {"checkpoint": args.checkpoint, "suite": args.suite, "task": args.task, "episode": args.episode,
           "steps": steps, "unpruned_success": success,
           "actors": {n: {"mean_dev": float(np.mean(dev[n])), "max_dev": float(np.max(dev[n])),
                          "median_tokens_kept": float(np.median(kept[n])) if kept[n] else None} for n in actors}}
    print(f"{args.suite} task {args.task} init state {args.episode}: unpruned success {success} in {steps} steps")
    print("| actor | mean deviation | max | tokens kept (median) |\n|---|---|---|---|")
    for n, r in res["actors"].items():
        print(f"| {n} | {r['mean_dev']:.3f} | {r['max_dev']:.3f} | {r['median_tokens_kept']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
