"""Demonstrations on disk, their statistics, and the arrays training reads.

One episode = one `.npz` file (written atomically; a folder of them is a demo set):

    full_jpeg, wrist_jpeg     uint8 [bytes]   the upright 256 px camera frames as JPEG (quality 95),
    full_offsets, wrist_offsets int64 [T+1]   frame t = jpeg[offsets[t]:offsets[t+1]]
    state                     float32 [T, 8]  eef_pos (3) + axis-angle (3) + gripper_qpos (2), as LiberoEnv gives it
    action                    float32 [T, 7]  the executed env actions (OSC_POSE deltas, gripper -1 open / +1 close)
    meta                      str (JSON)      suite, task_id, episode, instruction, success, steps, expert phases
    frame_steps (optional)    int64 [F]       the steps that have frames (a thinned copy for transfer,
                                              vla_accel.train.pack); absent: every step has its frames

Frames are stored as the bytes of the evaluation's own JPEG encode (Pillow, quality 95, 4:2:0), so
decoding them as the evaluation does and resizing with `vla_accel.processing` gives exactly the 224 px
image the policy computes from the raw frame at inference (the test
`test_train_data.py::test_stored_frames_match_inference` holds it to that).

Training targets follow the OpenVLA-OFT LIBERO data pipeline: the gripper command becomes
1 - clip(g, 0, 1) (1 = open, 0 = close), steps that are no-ops are dropped ("_no_noops"), and
actions / proprio are normalized with bounds_q99 statistics computed from the demos (gripper
unnormalized: mask [True]*6 + [False]). Chunk t = actions t .. t+7, the last action repeated past
the end of the episode.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vla_accel import processing as P

JPEG_QUALITY = 95  # the evaluation's JPEG round trip (processing.resize_like_reference)
CAMERAS = ("full_image", "wrist_image")
STATS_FILE = "dataset_statistics.json"


# ---- frames ------------------------------------------------------------------------------------------


def encode_jpeg(img: np.ndarray) -> bytes:
    """The evaluation's JPEG encode of an upright uint8 [H, W, 3] frame (Pillow, quality 95, 4:2:0)."""
    if hasattr(P, "jpeg_encode"):  # the TF-exact pre-processing (issue 11) has its own: use it
        return P.jpeg_encode(img)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """The evaluation's JPEG decode (processing.jpeg_decode where it exists, else Pillow's, as
    processing.resize_like_reference decodes then)."""
    if hasattr(P, "jpeg_decode"):
        return P.jpeg_decode(data)
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def model_image(jpeg: bytes, size: int = 224) -> np.ndarray:
    """Stored JPEG -> the uint8 [size, size, 3] image before the crop, as the policy computes it."""
    return P.resize_like_reference(decode_jpeg(jpeg), size, jpeg=False)


# ---- episodes on disk --------------------------------------------------------------------------------


@dataclass
class Episode:
    meta: dict  # suite, task_id, episode, instruction, success, steps, ...
    state: np.ndarray  # float32 [T, 8]
    action: np.ndarray  # float32 [T, 7] env actions
    jpegs: dict  # camera -> list of JPEG byte strings, one per step (or per entry of frame_steps)
    frame_steps: np.ndarray | None = None  # int [F]: the steps the frames belong to; None = every step

    def __len__(self) -> int:
        return len(self.action)

    @property
    def steps_with_frames(self) -> np.ndarray:
        return np.arange(len(self)) if self.frame_steps is None else np.asarray(self.frame_steps, np.int64)


def episode_path(root: str | os.PathLike, suite: str, task_id: int, episode: int) -> Path:
    return Path(root) / suite / f"task{task_id:02d}_ep{episode:03d}.npz"


def _pack(frames: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(frames) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f) for f in frames])
    return np.frombuffer(b"".join(frames), np.uint8), offsets


def save_episode(path: str | os.PathLike, ep: Episode) -> Path:
    """Writes one episode (tmp file + rename: a crash never leaves half a file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T = len(ep)
    if ep.state.shape != (T, 8) or ep.action.shape != (T, 7):
        raise ValueError(f"episode arrays disagree: state {ep.state.shape}, action {ep.action.shape}; "
                         f"expected [{T}, 8] and [{T}, 7]")
    arrays = {"state": ep.state.astype(np.float32), "action": ep.action.astype(np.float32),
              "meta": np.array(json.dumps(ep.meta))}
    framed = ep.steps_with_frames
    if ep.frame_steps is not None:
        if np.any(np.diff(framed) <= 0) or (len(framed) and not 0 <= framed[0] <= framed[-1] < T):
            raise ValueError(f"frame_steps must be increasing step indices in [0, {T}), got {framed.tolist()}")
        arrays["frame_steps"] = framed
    for cam in CAMERAS:
        if len(ep.jpegs[cam]) != len(framed):
            raise ValueError(f"episode has {len(ep.jpegs[cam])} {cam} frames for {len(framed)} steps with frames")
        arrays[f"{cam[:-6]}_jpeg"], arrays[f"{cam[:-6]}_offsets"] = _pack(ep.jpegs[cam])
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_episode(path: str | os.PathLike) -> Episode:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            jpegs = {}
            for cam in CAMERAS:
                data, offsets = z[f"{cam[:-6]}_jpeg"].tobytes(), z[f"{cam[:-6]}_offsets"]
                jpegs[cam] = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            frame_steps = z["frame_steps"] if "frame_steps" in z.files else None
            return Episode(meta=meta, state=z["state"], action=z["action"], jpegs=jpegs, frame_steps=frame_steps)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"cannot read demo episode {path}: {err} "
                         "(expected the format of vla_accel.train.data)") from err


def list_episodes(root: str | os.PathLike, suite: str | None = None) -> list[Path]:
    """The episode files under a demo folder, at any depth (<root>/[parts/]<suite>/task*_ep*.npz), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"demo folder {root} does not exist (record demos with `vla-accel-demos`)")
    return sorted(p for p in root.rglob("task*_ep*.npz") if suite is None or p.parent.name == suite)


# ---- OpenVLA-OFT LIBERO conventions ----------------------------------------------------------------------


def is_noop(action: np.ndarray, prev_action: np.ndarray | None) -> bool:
    """The OFT LIBERO regeneration rule: no arm motion and the gripper command unchanged."""
    if prev_action is None:
        return bool(np.linalg.norm(action[:-1]) < 1e-4)
    return bool(np.linalg.norm(action[:-1]) < 1e-4 and action[-1] == prev_action[-1])


def dataset_gripper(env_gripper: np.ndarray) -> np.ndarray:
    """Env gripper command (-1 open, +1 close) -> the dataset's 1 - clip(g, 0, 1) (1 open, 0 close)."""
    return 1.0 - np.clip(env_gripper, 0.0, 1.0)


def dataset_actions(env_actions: np.ndarray) -> np.ndarray:
    a = np.array(env_actions, dtype=np.float64, copy=True)
    a[..., -1] = dataset_gripper(a[..., -1])
    return a


def _describe(x: np.ndarray) -> dict:
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(), "min": x.min(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}


def compute_statistics(episodes: list[Episode], dataset_name: str) -> dict:
    """`dataset_statistics.json` content: {dataset_name: {action, proprio, num_transitions, num_trajectories}}."""
    if not episodes:
        raise ValueError("no episodes to compute statistics from")
    actions = np.concatenate([dataset_actions(e.action) for e in episodes])
    states = np.concatenate([e.state for e in episodes]).astype(np.float64)
    action = _describe(actions)
    action["mask"] = [True] * (actions.shape[1] - 1) + [False]
    return {dataset_name: {"action": action, "proprio": _describe(states),
                           "num_transitions": int(len(actions)), "num_trajectories": len(episodes)}}


def normalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """Dataset actions [..., 7] -> the regression targets: bounds_q99 where the mask is true, clipped to [-1, 1]."""
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    mask = np.asarray(stats["mask"], bool)
    norm = np.clip(2 * (actions - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    return np.where(mask, norm, actions)


def chunk_indices(length: int, chunk: int) -> np.ndarray:
    """[length, chunk] indices t .. t+chunk-1, clamped to the last step (the OFT chunking)."""
    return np.minimum(np.arange(length)[:, None] + np.arange(chunk)[None], length - 1)


# ---- what training reads ------------------------------------------------------------------------------


@dataclass
class TrainArrays:
    """Every training sample of a demo set, ready to batch."""

    frames: np.ndarray  # uint8 [N, 2, 224, 224, 3] model images before the crop (third-person, wrist)
    proprio: np.ndarray  # float32 [N, 8] normalized
    targets: np.ndarray  # float32 [N, chunk, 7] normalized action chunks
    instruction: np.ndarray  # int [N] index into `instructions`
    episode: np.ndarray  # int [N] index into `sources`
    instructions: list[str]
    sources: list[str]  # episode file names
    stats: dict  # dataset_statistics.json content
    dataset_name: str


def _frames(jpegs: dict, indices: list[int], size: int) -> np.ndarray:
    return np.stack([np.stack([model_image(jpegs[cam][i], size) for cam in CAMERAS]) for i in indices])


@dataclass
class _Samples:
    """One episode's training samples after the no-op filter (steps that have frames only)."""

    episode: Episode
    state: np.ndarray  # [K, 8] kept steps
    action: np.ndarray  # [K, 7] kept steps (env convention)
    positions: np.ndarray  # [S] positions in the kept steps that are samples
    frame_index: list  # [S] index into episode.jpegs[cam]


def _samples(ep: Episode) -> _Samples:
    keep = [t for t in range(len(ep)) if not is_noop(ep.action[t], ep.action[t - 1] if t else None)]
    where = {int(step): i for i, step in enumerate(ep.steps_with_frames)}
    positions = [p for p, t in enumerate(keep) if t in where]
    return _Samples(ep, ep.state[keep], ep.action[keep], np.array(positions, np.int64),
                    [where[keep[p]] for p in positions])


def load_training_arrays(paths: list[Path], dataset_name: str, *, chunk: int = 8, size: int = 224,
                         workers: int = 1, progress: bool = True) -> TrainArrays:
    """Reads demo episodes (successful ones only), drops no-ops, computes statistics, decodes frames.

    Statistics and action chunks use every kept step; samples are the kept steps that have frames.
    workers > 1 decodes episodes in a process pool (the JPEG + Lanczos work dominates).
    """
    from tqdm import tqdm

    parts = []
    for p in paths:
        ep = load_episode(p)
        if ep.meta.get("success"):
            ep.meta["file"] = p.name
            parts.append(_samples(ep))
    if not parts:
        raise ValueError(f"none of the {len(paths)} demo file(s) holds a successful episode")
    kept = [Episode(s.episode.meta, s.state, s.action, {}) for s in parts]
    stats = compute_statistics(kept, dataset_name)
    st = stats[dataset_name]
    instructions = sorted({s.episode.meta["instruction"] for s in parts})
    starts = np.cumsum([0] + [len(s.positions) for s in parts])
    frames = np.empty((int(starts[-1]), 2, size, size, 3), np.uint8)
    bar = tqdm(total=len(parts), desc="decoding demos", disable=None if progress else True)
    jobs = ([s.episode.jpegs for s in parts], [s.frame_index for s in parts], [size] * len(parts))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_frames, *jobs)
            for i, arr in enumerate(results):
                frames[starts[i]:starts[i + 1]] = arr
                bar.update(1)
    else:
        for i, args in enumerate(zip(*jobs)):
            frames[starts[i]:starts[i + 1]] = _frames(*args)
            bar.update(1)
    bar.close()
    proprio = np.concatenate([P.normalize_proprio(s.state[s.positions].astype(np.float64), st["proprio"])
                              for s in parts])
    targets = np.concatenate([normalize_actions(dataset_actions(s.action), st["action"])
                              [chunk_indices(len(s.action), chunk)][s.positions] for s in parts])
    return TrainArrays(
        frames=frames, proprio=proprio.astype(np.float32), targets=targets.astype(np.float32),
        instruction=np.concatenate([np.full(len(s.positions), instructions.index(s.episode.meta["instruction"]))
                                    for s in parts]),
        episode=np.concatenate([np.full(len(s.positions), i) for i, s in enumerate(parts)]),
        instructions=instructions, sources=[s.episode.meta["file"] for s in parts], stats=stats,
        dataset_name=dataset_name)
