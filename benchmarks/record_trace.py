"""Record a LIBERO trace (real simulator frames) for the GPU benchmark, which has no simulator.

    python -m benchmarks.record_trace --out .devcarry/libero_spatial_t0.npz --steps 64

Runs libero_spatial task 0 (init state 0, seed 0, 256 px, the 10 settle no-ops of the OFT protocol)
with SCRIPTED smooth actions (the arm sweeps so frames change step to step, as under a policy) and
saves an .npz in the layout of `vla_accel.envs.trace.load_trace`:
    full_image  uint8 [T, H, W, 3]   agentview, upright (rotated 180 deg like the OFT eval)
    wrist_image uint8 [T, H, W, 3]   robot0_eye_in_hand, upright
    state       float32 [T, 8]       eef_pos (3) + axis-angle(eef_quat) (3) + gripper_qpos (2)
    action      float64 [T, 7]       the action executed after observation t
    instruction str, meta (JSON: suite, task, episode, how the actions were made)
Traces stay out of git (*.npz is ignored); the GPU run receives it through `carry`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def scripted_action(t: int) -> np.ndarray:
    """A smooth sweep: down, then a slow circle with a little rotation; gripper open then closing."""
    a = np.zeros(7)
    a[0] = 0.5 * np.sin(t / 9.0)
    a[1] = 0.5 * np.cos(t / 11.0)
    a[2] = -0.4 if t < 20 else 0.2 * np.sin(t / 7.0)
    a[5] = 0.1 * np.sin(t / 5.0)
    a[6] = -1.0 if t < 40 else 1.0  # env convention: -1 open, +1 close
    return a


def record(out: str | os.PathLike, *, suite: str = "libero_spatial", task_id: int = 0, episode: int = 0,
           steps: int = 64, image_size: int = 256, assets_path: str | None = None, settle_steps: int = 10) -> Path:
    """Runs the scripted sweep in `vla_accel.envs.LiberoEnv` (init state, settle steps, upright frames, 8-D state)."""
    from vla_accel.envs import LiberoEnv
    from vla_accel.envs.trace import save_trace

    env = LiberoEnv(suite=suite, task_id=task_id, image_size=image_size, assets_path=assets_path, seed=0,
                    settle_steps=settle_steps, max_steps=max(steps, 1))
    obs, info = env.reset(options={"episode": episode})
    frames = []
    t0 = time.time()
    for t in range(steps):
        a = scripted_action(t)
        frames.append({"full_image": obs["full_image"], "wrist_image": obs["wrist_image"], "state": obs["state"],
                       "action": a.astype(np.float32)})
        obs, _, _, _, _ = env.step(a)
    env.close()
    meta = {"suite": suite, "task_id": task_id, "episode": episode, "image_size": image_size, "upright": True,
            "settle_steps": settle_steps, "policy": "scripted sweep (benchmarks.record_trace.scripted_action)"}
    out = save_trace(out, frames, info["instruction"], meta)
    print(f"recorded {steps} steps of {suite} task {task_id} ('{info['instruction']}') in {time.time() - t0:.1f} s "
          f"-> {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--task-id", type=int, default=0)
    p.add_argument("--episode", type=int, default=0)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--assets", default=os.environ.get("VLA_ACCEL_LIBERO_ASSETS", "/work/shared/libero-assets"))
    a = p.parse_args(argv)
    record(a.out, suite=a.suite, task_id=a.task_id, episode=a.episode, steps=a.steps, image_size=a.image_size,
           assets_path=a.assets)


if __name__ == "__main__":
    main()
