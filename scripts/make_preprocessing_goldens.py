"""Golden outputs of the official OpenVLA-OFT image pre-processing, computed with TensorFlow.

The official LIBERO evaluation (moojink/openvla-oft, experiments/robot/openvla_utils.py) prepares each
camera image with TensorFlow:
  resize_image_for_policy: tf.image.encode_jpeg (defaults: quality 95, 4:2:0) -> tf.io.decode_image
      (uint8) -> tf.image.resize(224, "lanczos3", antialias=True) -> round, clip to [0, 255], uint8;
      skipped by prepare_images_for_vla when the image is already 224 x 224;
  center_crop_image: convert_image_dtype to float32 -> crop_and_resize of the central 90% of the area
      (side sqrt(0.9)) back to 224 x 224 -> clip to [0, 1] -> convert_image_dtype(uint8, saturate=True).
This script re-types those calls (it imports nothing from vla_accel) and stores every intermediate,
so tests/test_processing.py can check our TensorFlow-free pipeline stage by stage in CI.

It needs TensorFlow, which CI does not have; run it once in a separate environment:
    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.15.0
    /tmp/tfvenv/bin/python scripts/make_preprocessing_goldens.py [--frames sim_frames.npz]
TensorFlow 2.15.0 is the version the official repository pins. `--frames` adds rendered LIBERO
camera images (an .npz of uint8 [H, W, 3] arrays); without it only the synthetic frames are made. The
committed file used the first observation of episode 0 (upright, 256 px), rendered in this project's
environment with its stand-in assets (VLA_ACCEL_LIBERO_ASSETS, MUJOCO_GL=egl):
    from vla_accel.envs.libero import LiberoEnv
    frames = {}
    for suite, task, cam in (("libero_spatial", 0, "full"), ("libero_10", 3, "wrist")):
        obs, _ = LiberoEnv(suite=suite, task_id=task).reset(options={"episode": 0})
        frames[f"{suite}_{task}_{cam}"] = obs[f"{cam}_image"]
    np.savez_compressed("sim_frames.npz", **frames) Output: tests/fixtures/preprocessing_goldens.npz
(keys `<case>__<stage>`: input, final and, for some cases, the intermediate jpeg bytes / decoded /
resized images; images are stored through `delta_filter`; `meta` is a JSON string naming the versions,
the cases and their stages).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "preprocessing_goldens.npz"
SIZE = 224  # OPENVLA_IMAGE_SIZE
CROP_SCALE = 0.9
SIM_FRAMES = ("libero_spatial_0_full", "libero_10_3_wrist")  # the rendered frames kept (file size)


# ----------------------------------------------------------------------------- synthetic frames
def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A frame with what stresses a resampler: flat areas, smooth gradients, sharp-edged saturated
    shapes, pure black/white regions, one-pixel lines, a fine checkerboard and a block of noise
    (kept small: noise does not compress, and the golden file stays small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    img[:] = (150, 140, 120)  # table-like flat background
    g = (slice(0, h // 2), slice(0, w // 2))  # gradients in one quadrant
    img[g] = np.stack([255 * x[g] / (w / 2), 255 * y[g] / (h / 2), 128 + 0 * x[g]], axis=-1)
    for _ in range(5):  # saturated rectangles
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        hh, ww = rng.integers(6, max(7, h // 4)), rng.integers(6, max(7, w // 4))
        img[y0:y0 + hh, x0:x0 + ww] = rng.choice([0, 255], size=3)
    for _ in range(3):  # discs with a hard edge
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, min(h, w) / 6)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, size=3)
    img[h // 8: h // 8 + h // 12, w // 2:] = 255  # clipped highlights
    img[-(h // 12):, : w // 3] = 0  # crushed shadows
    for k in range(3):  # one-pixel lines
        img[:, (k + 1) * w // 4] = 255 * (k % 2)
        img[(k + 1) * h // 4, :] = (255, 0, 255) if k % 2 else (0, 255, 0)
    cb = ((y // 2 + x // 2) % 2 == 0)[..., None] * 255.0  # 2-pixel checkerboard
    q = (slice(h // 2, h // 2 + h // 8), slice(w - w // 8, w))
    img[q] = cb[q]
    n = (slice(h // 3, h // 3 + h // 8), slice(w // 3, w // 3 + w // 8))
    img[n] = rng.integers(0, 256, size=img[n].shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the official calls
def official_resize(tf, img: np.ndarray):
    """resize_image_for_policy(img, 224): returns (jpeg bytes, decoded uint8, resized uint8)."""
    jpeg = tf.image.encode_jpeg(img)
    decoded = tf.io.decode_image(jpeg, expand_animations=False, dtype=tf.uint8)
    resized = tf.image.resize(decoded, (SIZE, SIZE), method="lanczos3", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return jpeg.numpy(), decoded.numpy(), resized.numpy()


def official_center_crop(tf, img: np.ndarray) -> np.ndarray:
    """center_crop_image(img): crop_and_resize(crop_scale=0.9, batch_size=1) with its dtype conversions."""
    x = tf.image.convert_image_dtype(tf.convert_to_tensor(img), tf.float32)[None]
    side = tf.reshape(tf.clip_by_value(tf.sqrt(CROP_SCALE), 0, 1), shape=(1,))
    offset = (1 - side) / 2
    boxes = tf.stack([offset, offset, offset + side, offset + side], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(1), (SIZE, SIZE))[0]
    x = tf.clip_by_value(x, 0, 1)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True).numpy()


def delta_filter(img: np.ndarray) -> np.ndarray:
    """Lossless 2-D difference filter (PNG's Sub then Up, modulo 256) so the arrays compress ~2x better;
    undone by two uint8 cumulative sums (tests/test_processing.py: `unfilter`)."""
    d = img.copy()
    d[:, 1:] = img[:, 1:] - img[:, :-1]
    d[1:] = d[1:] - d[:-1].copy()
    return d


def jpeg_sampling(data: bytes) -> list[tuple[int, int]]:
    """(h, v) sampling factors per component from the JPEG's SOF marker: [(2, 2), (1, 1), (1, 1)] is 4:2:0."""
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            n = data[i + 9]
            return [(data[i + 11 + 3 * c] >> 4, data[i + 11 + 3 * c] & 15) for c in range(n)]
        i += 2 + length
    raise ValueError("no SOF marker in the JPEG data")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=Path, help="npz of rendered uint8 [H, W, 3] frames to add as cases")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import tensorflow as tf

    # case -> (frame, intermediate stages kept besides input and final); fewer stages where the
    # same stage is already covered, to keep the file small
    all_stages = ("jpeg", "decoded", "resized")
    cases = {
        "scene_256": (scene(256, 256, 0), all_stages),  # the LIBERO camera size
        "scene_224": (scene(224, 224, 1), ()),  # already model-sized: the official path only crops
        "scene_448x336": (scene(448, 336, 2), ("resized",)),  # non-square, 2x and 1.5x downscale
        "scene_250x180": (scene(250, 180, 3), ("resized",)),  # down in height, up in width
        "scene_128": (scene(128, 128, 4), ()),  # upscale
    }
    if args.frames is not None:
        frames = np.load(args.frames)
        for name, stages in zip(SIM_FRAMES, (all_stages, ())):
            if name not in frames:
                sys.exit(f"--frames {args.frames}: no array '{name}' (has {sorted(frames)})")
            cases[f"sim_{name}"] = (np.ascontiguousarray(frames[name]), stages)

    out, meta_cases = {}, {}
    for name, (img, stages) in cases.items():
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            sys.exit(f"case '{name}': expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
        got = {"input": img}
        meta_cases[name] = {"shape": list(img.shape), "jpeg_sampling": None}
        if img.shape[:2] != (SIZE, SIZE):  # prepare_images_for_vla resizes only other sizes
            jpeg, got["decoded"], got["resized"] = official_resize(tf, img)
            got["jpeg"] = np.frombuffer(jpeg, np.uint8)
            meta_cases[name]["jpeg_sampling"] = jpeg_sampling(jpeg)
            img = got["resized"]
        got["final"] = official_center_crop(tf, img)
        for stage in ("input", *stages, "final"):
            out[f"{name}__{stage}"] = got[stage] if stage == "jpeg" else delta_filter(got[stage])
        meta_cases[name]["stages"] = ["input", *stages, "final"]
        print(f"{name}: {meta_cases[name]}")

    meta = {"tensorflow": tf.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "script": "scripts/make_preprocessing_goldens.py", "filter": "delta2d (image arrays)",
            "cases": meta_cases}
    out["meta"] = np.array(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
