"""Per-episode recordings: MP4 videos (agentview | wrist side by side) and rollout traces (.npz)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vla_accel.eval.shard import EpisodeKey

log = logging.getLogger(__name__)


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_")


def episode_stem(key: EpisodeKey, task: str = "") -> str:
    """File stem naming the episode: <suite>_task<NN>[_<task slug>]_ep<NNN>."""
    slug = f"_{_slug(task)}" if task else ""
    return f"{key.suite}_task{key.task_id:02d}{slug}_ep{key.episode:03d}"


def side_by_side(obs: dict) -> np.ndarray:
    # frame: [H, W_full + W_wrist, 3] uint8
    return np.concatenate([np.asarray(obs["full_image"]), np.asarray(obs["wrist_image"])], axis=1)


class EpisodeVideo:
    """Streams frames to <dir>/.<stem>.partial.mp4; finish() renames it to <stem>_<outcome>.mp4
    (outcome: success | failure | error)."""

    def __init__(self, directory: str | os.PathLike, key: EpisodeKey, task: str, fps: int):
        import imageio.v2 as imageio  # lazy: only when videos are on

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = episode_stem(key, task)
        self.tmp = self.directory / f".{self.stem}.partial.mp4"
        self._writer = imageio.get_writer(self.tmp, fps=fps, codec="libx264", macro_block_size=1,
                                          ffmpeg_log_level="error")
        self.frames = 0
        self._overlay_shape = None  # set by the first overlay frame

    def add(self, obs: dict, overlay: np.ndarray | None = None) -> None:
        """One frame: agentview | wrist; with `overlay` (SpecPrune's kept-patch picture) stacked below."""
        frame = side_by_side(obs)
        if overlay is not None or self._overlay_shape is not None:
            frame = self._with_overlay(frame, overlay)
        self._writer.append_data(frame)
        self.frames += 1

    def _with_overlay(self, frame: np.ndarray, overlay: np.ndarray | None) -> np.ndarray:
        # every frame of a video must have one size: the first overlay fixes it, a missing one is black
        if self._overlay_shape is None:
            self._overlay_shape = overlay.shape
        if overlay is None or overlay.shape != self._overlay_shape:
            overlay = np.zeros(self._overlay_shape, np.uint8)
        width = max(frame.shape[1], overlay.shape[1])
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))  # noqa: E731
        return np.concatenate([pad(frame), pad(overlay)], axis=0)

    def finish(self, outcome: str) -> str | None:
        if self.frames == 0:          # nothing was recorded (the episode failed before its first step)
            self.abort()
            return None
        self._writer.close()
        final = self.directory / f"{self.stem}_{outcome}.mp4"
        os.replace(self.tmp, final)
        return str(final)

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # the partial file is removed anyway
            pass
        self.tmp.unlink(missing_ok=True)


class TraceRecorder:
    """Keeps the frames of one episode (both images, state, executed action) for save_trace."""

    def __init__(self, path: str | os.PathLike, key: EpisodeKey, task: str):
        self.path = Path(path)
        self.key = key
        self.task = task
        self.frames: list[dict[str, Any]] = []

    def add(self, obs: dict, action: np.ndarray) -> None:
        self.frames.append({
            "full_image": np.array(obs["full_image"], copy=True),
            "wrist_image": np.array(obs["wrist_image"], copy=True),
            "state": np.array(obs["state"], copy=True),
            "action": np.array(action, copy=True),
        })

    def save(self, instruction: str, meta: dict) -> str:
        from vla_accel.envs.trace import save_trace  # owned by the env module

        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_trace(self.path, self.frames, instruction, meta)
        return str(self.path)
