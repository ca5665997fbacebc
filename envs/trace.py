"""Rollout traces: the frames a policy saw and the actions it sent, in one compressed .npz.

    save_trace("run.npz", frames, instruction, meta={"suite": "libero_spatial", "task_id": 0, "episode": 3})
    trace = load_trace("run.npz")   # {"full_image": [T,H,W,3] uint8, ..., "instruction": str, "meta": dict}

frames: one dict per step with full_image, wrist_image (uint8 [H, W, 3]), state [8], action [7].
Stored: full_image/wrist_image uint8 [T, H, W, 3], state float32 [T, 8] (the env's dtype),
action float64 [T, 7] (lossless for any float input, so a replay sends the same numbers),
instruction as a 0-d unicode array, meta as a JSON string. Loading never unpickles.
"""

import json
import os
from pathlib import Path

import numpy as np

FRAME_KEYS = ("full_image", "wrist_image", "state", "action")


def _stack(frames: list[dict], key: str, dtype) -> np.ndarray:
    try:
        values = [np.asarray(frame[key]) for frame in frames]
    except KeyError:
        raise ValueError(f"every frame needs the keys {FRAME_KEYS}; one lacks {key!r}") from None
    shapes = {v.shape for v in values}
    if len(shapes) != 1:
        raise ValueError(f"frames disagree on the shape of {key!r}: {sorted(shapes)}")
    if dtype == np.uint8 and values[0].dtype != np.uint8:
        raise ValueError(f"{key!r} must be uint8 images, got {values[0].dtype}")
    return np.stack(values).astype(dtype, copy=False)


def save_trace(path: str | os.PathLike, frames: list[dict], instruction: str, meta: dict) -> Path:
    """Write frames + instruction + meta to a compressed .npz; returns the path written (with .npz)."""
    if not frames:
        raise ValueError("save_trace needs at least one frame")
    arrays = {
        "full_image": _stack(frames, "full_image", np.uint8),
        "wrist_image": _stack(frames, "wrist_image", np.uint8),
        "state": _stack(frames, "state", np.float32),
        "action": _stack(frames, "action", np.float64),
    }
    expected = {"full_image": 4, "wrist_image": 4, "state": 2, "action": 2}  # ndim incl. the time axis
    for key, ndim in expected.items():
        if arrays[key].ndim != ndim or (ndim == 4 and arrays[key].shape[-1] != 3):
            raise ValueError(f"{key!r} per frame must be {'[H, W, 3]' if ndim == 4 else 'a vector'}, "
                             f"got {arrays[key].shape[1:]}")
    if arrays["state"].shape[1] != 8 or arrays["action"].shape[1] != 7:
        raise ValueError(f"state must be [8] and action [7] per frame, got {arrays['state'].shape[1:]} "
                         f"and {arrays['action'].shape[1:]}")
    path = Path(path)
    if path.suffix != ".npz":  # np.savez_compressed would append it anyway
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # write + rename: never half a trace
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, **arrays, instruction=np.array(str(instruction)), meta=np.array(json.dumps(meta, sort_keys=True))
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_trace(path: str | os.PathLike) -> dict:
    """Read a trace written by save_trace: arrays by name, instruction (str), meta (dict)."""
    with np.load(path, allow_pickle=False) as data:
        trace = {key: data[key] for key in FRAME_KEYS}
        trace["instruction"] = str(data["instruction"])
        trace["meta"] = json.loads(str(data["meta"]))
    return trace
