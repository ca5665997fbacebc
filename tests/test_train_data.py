"""Demo files, training targets and statistics, the training image pipeline, the stand-in tokenizer.

The central claim: what training reads equals what the policy computes at inference (stored JPEG
frames -> processing's resize == the policy's own JPEG round trip + resize; the centered crop of
the training pipeline == processing.crop_and_resize).
"""

import json

import numpy as np
import pytest
import torch

from vla_accel import processing as P
from vla_accel.train import augment as A, data as D

SIZE = 256  # the camera size of the OFT eval


def scene_image(t: int, seed: int = 0) -> np.ndarray:
    """A synthetic 256 px frame: textured floor, a dark box that moves with t, sharp edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([(xx * 0.6 + 40) % 256, (yy * 0.5 + 60) % 256, (xx + yy) % 200 + 20], -1).astype(np.float64)
    img += rng.normal(0, 6, img.shape)
    x0 = 40 + 3 * t
    img[100:150, x0:x0 + 40] = (30, 30, 160)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_episode(task: int, episode: int, length: int = 12, success: bool = True, noop_at=()) -> D.Episode:
    """A synthetic demo whose actions follow the box position (so a policy can learn them)."""
    frames = [scene_image(t, seed=100 * task + episode) for t in range(length)]
    action = np.zeros((length, 7), np.float32)
    action[:, 0] = np.linspace(0.8, -0.4, length) + 0.1 * task
    action[:, 2] = -0.3 + 0.05 * episode
    action[:, 3:6] = 0.01 * np.arange(length)[:, None]
    action[:, 6] = np.where(np.arange(length) < length // 2, -1.0, 1.0)
    for t in noop_at:
        action[t, :6] = 0.0
        action[t, 6] = action[t - 1, 6]
    state = np.zeros((length, 8), np.float32)
    state[:, 0] = np.cumsum(action[:, 0]) * 0.01 - 0.15
    state[:, 2] = 0.25 + np.cumsum(action[:, 2]) * 0.01
    state[:, 3] = 3.14
    state[:, 6:] = [0.04, -0.04]
    meta = {"suite": "libero_object", "task_id": task, "episode": episode, "success": success, "steps": length,
            "instruction": f"pick up the thing {task} and place it in the basket"}
    return D.Episode(meta=meta, state=state, action=action,
                     jpegs={c: [D.encode_jpeg(f) for f in frames] for c in D.CAMERAS})


def write_demos(root, tasks=(0, 1), episodes=(0, 1), **kw):
    return [D.save_episode(D.episode_path(root, "libero_object", t, e), make_episode(t, e, **kw))
            for t in tasks for e in episodes]


# ---- frames -----------------------------------------------------------------------------------------


def test_stored_frames_match_inference():
    """decode(stored JPEG) + processing's resize == the policy's own pipeline on the raw frame."""
    for t in (0, 7):
        raw = scene_image(t)
        np.testing.assert_array_equal(D.model_image(D.encode_jpeg(raw)), P.resize_like_reference(raw, 224, jpeg=True))


def test_center_crop_matches_evaluation():
    """The training crop with a centered box reproduces processing.crop_and_resize (the eval's crop)."""
    img = P.resize_like_reference(scene_image(3), 224)
    ref = P.crop_and_resize(img)
    out = A.crop_and_resize(torch.from_numpy(img)[None], A.crop_boxes(1, 0.9, random=False))
    mine = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int64)
    diff = np.abs(mine - ref)
    # float32 (numpy) vs float32 (grid_sample) bilinear weights: a pixel may land one level apart
    # at floor(x * 255.5); anything more is a coordinate error
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_model_pixels_center_equals_to_pixel_values():
    img = P.resize_like_reference(scene_image(5), 224)
    frames = torch.from_numpy(np.stack([img, img[::-1].copy()]))[None]  # [1, 2, 224, 224, 3]
    ours = A.model_pixels(frames, random_crop=False)[0]
    ref = P.to_pixel_values([P.crop_and_resize(img), P.crop_and_resize(img[::-1].copy())], P.ImageNorm())
    # one uint8 level (test above) divided by the smallest std of the normalization used
    smallest_std = min(min(s) for s in P.ImageNorm().stds)
    torch.testing.assert_close(ours, ref, atol=1 / 255 / smallest_std + 1e-6, rtol=0)


def test_random_crops_stay_inside_and_vary():
    g = torch.Generator().manual_seed(0)
    boxes = A.crop_boxes(500, 0.9, random=True, generator=g)
    side = boxes[:, 2:] - boxes[:, :2]
    torch.testing.assert_close(side, torch.full_like(side, 0.9 ** 0.5))
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert boxes[:, 0].std() > 0.01 and boxes[:, 1].std() > 0.01


def test_color_jitter_stays_in_range_and_changes_pixels():
    x = torch.rand(4, 3, 32, 32)
    y = A.color_jitter(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3


# ---- episodes, targets, statistics ----------------------------------------------------------------------


def test_episode_round_trip(tmp_path):
    ep = make_episode(1, 2)
    path = D.save_episode(D.episode_path(tmp_path, "libero_object", 1, 2), ep)
    assert path.name == "task01_ep002.npz" and not list(path.parent.glob(".*tmp*"))
    back = D.load_episode(path)
    assert back.meta == ep.meta
    np.testing.assert_array_equal(back.action, ep.action)
    np.testing.assert_array_equal(back.state, ep.state)
    assert back.jpegs == ep.jpegs
    assert D.list_episodes(tmp_path, "libero_object") == [path]
    assert D.list_episodes(tmp_path, "libero_spatial") == []


def test_bad_episode_file_names_the_file(tmp_path):
    bad = tmp_path / "libero_object" / "task00_ep000.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="task00_ep000.npz"):
        D.load_episode(bad)
    with pytest.raises(FileNotFoundError, match="vla-accel-demos"):
        D.list_episodes(tmp_path / "missing")


def test_save_episode_rejects_mismatched_arrays(tmp_path):
    ep = make_episode(0, 0)
    ep.state = ep.state[:-1]
    with pytest.raises(ValueError, match="state"):
        D.save_episode(tmp_path / "x.npz", ep)


def test_oft_conventions():
    # gripper: env -1 open / +1 close -> dataset 1 open / 0 close
    np.testing.assert_array_equal(D.dataset_gripper(np.array([-1.0, 1.0, 0.0])), [1.0, 0.0, 1.0])
    # chunks repeat the last action past the end
    np.testing.assert_array_equal(D.chunk_indices(3, 4), [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2]])
    still = np.array([0, 0, 0, 0, 0, 0, -1.0])
    assert D.is_noop(still, still) and not D.is_noop(still, -still) and not D.is_noop(still + 0.01, still)


def test_statistics_and_targets():
    eps = [make_episode(0, e) for e in range(3)]
    stats = D.compute_statistics(eps, "libero_object_no_noops")["libero_object_no_noops"]
    assert stats["num_trajectories"] == 3 and stats["num_transitions"] == 36
    assert stats["action"]["mask"] == [True] * 6 + [False]
    actions = np.concatenate([D.dataset_actions(e.action) for e in eps])
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0))
    norm = D.normalize_actions(actions, stats["action"])
    assert norm[:, :6].min() >= -1 and norm[:, :6].max() <= 1
    np.testing.assert_array_equal(norm[:, 6], actions[:, 6])  # gripper not normalized
    # round trip through the policy's un-normalization (inside q01..q99)
    inside = np.all((actions >= stats["action"]["q01"]) & (actions <= stats["action"]["q99"]), axis=1)
    back = P.unnormalize_actions(norm, stats["action"])
    np.testing.assert_allclose(back[inside, :6], actions[inside, :6], atol=1e-6)


def test_training_arrays(tmp_path):
    paths = write_demos(tmp_path, tasks=(0, 1), episodes=(0,))
    paths.append(D.save_episode(D.episode_path(tmp_path, "libero_object", 2, 0), make_episode(2, 0, success=False)))
    paths.append(D.save_episode(D.episode_path(tmp_path, "libero_object", 3, 0), make_episode(3, 0, noop_at=(4, 5))))
    arrays = D.load_training_arrays(paths, "libero_object_no_noops", progress=False)
    assert arrays.sources == ["task00_ep000.npz", "task01_ep000.npz", "task03_ep000.npz"]  # failed one left out
    assert len(arrays.targets) == 12 + 12 + 10  # two no-ops dropped
    assert arrays.frames.shape == (34, 2, 224, 224, 3) and arrays.targets.shape == (34, 8, 7)
    ep0 = D.load_episode(paths[0])
    np.testing.assert_array_equal(arrays.frames[3, 1], D.model_image(ep0.jpegs["wrist_image"][3]))
    stats = arrays.stats["libero_object_no_noops"]
    np.testing.assert_allclose(arrays.proprio[:12], P.normalize_proprio(ep0.state.astype(np.float64), stats["proprio"]),
                               atol=1e-6)
    expected = D.normalize_actions(D.dataset_actions(ep0.action), stats["action"])
    np.testing.assert_allclose(arrays.targets[10], expected[[10, 11, 11, 11, 11, 11, 11, 11]], atol=1e-6)
    assert [arrays.instructions[i] for i in arrays.instruction[[0, 12, 24]]] == [
        f"pick up the thing {t} and place it in the basket" for t in (0, 1, 3)]
    json.dumps(arrays.stats)  # what dataset_statistics.json gets


# ---- tokenizer ------------------------------------------------------------------------------------------


def test_stand_in_tokenizer_through_the_policy_loader(tmp_path):
    from vla_accel.tokenizer import LazyTokenizer, tokenize_prompt
    from vla_accel.train.tokenizer import build_tokenizer, save_tokenizer

    texts = ["pick up the milk and place it in the basket", "pick up the ketchup and place it in the basket"]
    save_tokenizer(build_tokenizer(texts), tmp_path)
    tok = LazyTokenizer(tmp_path)
    ids = tokenize_prompt(tok, texts[0])
    words = ["In", ":", "What", "action", "should", "the", "robot", "take", "to", "pick", "up", "the", "milk", "and",
             "place", "it", "in", "the", "basket", "?", "Out", ":"]
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert ids == [1] + [vocab[w] for w in words]  # BOS, then one id per word; the template is 9 of them
    assert all(3 <= i < 29871 for i in ids[1:])
    other = tokenize_prompt(tok, texts[1])
    assert ids[:13] == other[:13] and ids[13] != other[13]  # only the object word differs
    assert tokenize_prompt(tok, "pick up the rocket")[-4] == 0  # unknown word -> <unk>


# ---- thinned copies for transfer (vla_accel.train.pack) -------------------------------------------------


def test_thinned_episode_keeps_actions_and_samples_only_framed_steps(tmp_path):
    from vla_accel.train.pack import thin

    full = make_episode(0, 0, length=12)
    thinned = thin(full, stride=3, phase=1)
    np.testing.assert_array_equal(thinned.frame_steps, [1, 4, 7, 10])
    path = D.save_episode(tmp_path / "libero_object" / "task00_ep000.npz", thinned)
    back = D.load_episode(path)
    np.testing.assert_array_equal(back.frame_steps, [1, 4, 7, 10])
    np.testing.assert_array_equal(back.action, full.action)
    a_full = D.load_training_arrays([D.save_episode(tmp_path / "f" / "task00_ep000.npz", full)], "x", progress=False)
    a_thin = D.load_training_arrays([path], "x", progress=False)
    assert a_thin.stats == a_full.stats  # statistics from every step
    np.testing.assert_array_equal(a_thin.targets, a_full.targets[[1, 4, 7, 10]])  # chunks from every step
    np.testing.assert_array_equal(a_thin.frames, a_full.frames[[1, 4, 7, 10]])
    np.testing.assert_array_equal(a_thin.proprio, a_full.proprio[[1, 4, 7, 10]])


def test_pack_fits_the_limit(tmp_path):
    from vla_accel.train.pack import main

    write_demos(tmp_path / "src", tasks=(0, 1), episodes=(0, 1))
    full = sum(f.stat().st_size for f in (tmp_path / "src").rglob("*.npz"))
    main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--max-mib", str(full / 2**20 / 2.5)])
    packed = sorted((tmp_path / "out").rglob("*.npz"))
    assert len(packed) == 4 and sum(f.stat().st_size for f in packed) <= full / 2.5
    strides = {D.load_episode(p).meta["frame_stride"] for p in packed}
    assert len(strides) == 1 and strides.pop() >= 3
