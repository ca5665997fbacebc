"""Record a LIBERO trace (real simulator frames) for the GPU benchmark, which has no simulator.

    python -m vla_accel.runtime.record --out .devcarry/libero_spatial_t0.npz --steps 64

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
import contextlib
import io
import os
import time
from pathlib import Path

import numpy as np


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite's convention: quat = (x, y, z, w) -> axis * angle."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return (q[:3] * 2.0 * np.arccos(q[3])) / den


def scripted_action(t: int) -> np.ndarray:
    """A smooth sweep: down, then a slow circle with a little rotation; gripper open then closing."""
    a = np.zeros(7)
    a[0] = 0.5 * np.sin(t / 9.0)
    a[1] = 0.5 * np.cos(t / 11.0)
    a[2] = -0.4 if t < 20 else 0.2 * np.sin(t / 7.0)
    a[5] = 0.1 * np.sin(t / 5.0)
    a[6] = -1.0 if t < 40 else 1.0  # env convention: -1 open, +1 close
    return a


def _obs_to_frame(obs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    full = np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])
    wrist = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
    state = np.concatenate([obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]),
                            obs["robot0_gripper_qpos"]]).astype(np.float32)
    return full, wrist, state


def record(out: str | os.PathLike, *, suite: str = "libero_spatial", task_id: int = 0, episode: int = 0,
           steps: int = 64, image_size: int = 256, assets_path: str | None = None, settle_steps: int = 10) -> Path:
    from vla_accel.envs.libero_setup import configure_libero, import_libero_envs, make_benchmark

    configure_libero(assets_path)
    envs = import_libero_envs()
    from libero.libero import get_libero_path

    bench = make_benchmark(suite)
    task = bench.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    with contextlib.redirect_stdout(io.StringIO()):
        env = envs.OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size)
    env.seed(0)
    env.reset()
    obs = env.set_init_state(bench.get_task_init_states(task_id)[episode])
    for _ in range(settle_steps):
        obs, _, _, _ = env.step([0, 0, 0, 0, 0, 0, -1])
    fulls, wrists, states, actions = [], [], [], []
    t0 = time.time()
    for t in range(steps):
        f, w, s = _obs_to_frame(obs)
        a = scripted_action(t)
        fulls.append(f), wrists.append(w), states.append(s), actions.append(a.astype(np.float32))
        obs, _, done, _ = env.step(a.tolist())
    env.close()
    meta = {"suite": suite, "task_id": task_id, "episode": episode, "image_size": image_size, "upright": True,
            "settle_steps": settle_steps, "policy": "scripted sweep (vla_accel.runtime.record.scripted_action)"}
    try:
        from vla_accel.envs.trace import save_trace
    except ImportError:  # the trace module not installed: the same layout by hand
        save_trace = None
    if save_trace is not None:
        frames = [{"full_image": f, "wrist_image": w, "state": s, "action": a}
                  for f, w, s, a in zip(fulls, wrists, states, actions)]
        out = save_trace(out, frames, task.language, meta)
    else:
        import json

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, full_image=np.stack(fulls), wrist_image=np.stack(wrists),
                            state=np.stack(states), action=np.stack(actions).astype(np.float64),
                            instruction=np.array(task.language), meta=np.array(json.dumps(meta, sort_keys=True)))
    print(f"recorded {steps} steps of {suite} task {task_id} ('{task.language}') in {time.time() - t0:.1f} s -> {out}")
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
