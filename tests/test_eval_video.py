"""Rollout videos: agentview | wrist side by side, SpecPrune's kept-patch overlay stacked below."""

import numpy as np

from vla_accel.eval.shard import EpisodeKey
from vla_accel.eval.video import EpisodeVideo


def _obs(v):
    return {"full_image": np.full((64, 64, 3), v, np.uint8), "wrist_image": np.full((64, 64, 3), 255 - v, np.uint8)}


def test_video_with_overlay_frames(tmp_path):
    import imageio.v2 as imageio

    key = EpisodeKey("libero_spatial", 0, 3)
    video = EpisodeVideo(tmp_path, key, "pick up the bowl", fps=10)
    overlay = np.full((40, 150, 3), 200, np.uint8)  # wider than the 128-px camera pair
    video.add(_obs(10), overlay)
    video.add(_obs(20), None)  # no overlay this step: a black band keeps the frame size
    video.add(_obs(30), overlay)
    path = video.finish("success")
    assert path.endswith("_success.mp4") and "ep003" in path
    frames = imageio.mimread(path)
    assert len(frames) == 3
    assert all(f.shape == (64 + 40, 150, 3) for f in frames)
    assert abs(int(frames[0][80, 75, 0]) - 200) < 12  # overlay band (lossy codec)
    assert int(frames[1][80, 75, 0]) < 12  # black band where the overlay was missing
    assert abs(int(frames[0][10, 10, 0]) - 10) < 12 and abs(int(frames[0][10, 100, 0]) - 245) < 12


def test_video_without_overlay_is_plain_side_by_side(tmp_path):
    import imageio.v2 as imageio

    video = EpisodeVideo(tmp_path, EpisodeKey("libero_goal", 2, 0), "open the drawer", fps=10)
    video.add(_obs(50))
    frames = imageio.mimread(video.finish("failure"))
    assert frames[0].shape == (64, 128, 3)
