"""Pre- and post-processing of the OpenVLA-OFT LIBERO evaluation, without TensorFlow.

Images (uint8 [H, W, 3], upright), as the official `prepare_images_for_vla` + `resize_image_for_policy`
+ `center_crop_image` (experiments/robot/openvla_utils.py) do them with TensorFlow ->
  1. if the image is not 224 x 224 already: a JPEG round trip like `tf.image.encode_jpeg` (quality 95,
     4:2:0 chroma, accurate DCT; Pillow's encoder) + `tf.io.decode_image` (libjpeg-turbo's FAST integer
     IDCT, fancy upsampling; simplejpeg's decoder); then TF's antialiased Lanczos-3 resize to 224
     (`scale_and_translate`: its span/weight rules in float32, both passes in float32, one round half to
     even at the end, clip, uint8);
  2. center crop of 90% of the area (side sqrt(0.9)) resized back to 224 x 224 with bilinear sampling:
     `tf.image.crop_and_resize` in float32, with `convert_image_dtype`'s conversions around it;
  3. /255 and per-tower normalization by the processor's `tvf_normalize_params` (which override its
     `means`/`stds`) -> 3 channels for DINOv2 + 3 for SigLIP.
tests/test_processing.py checks every stage against TensorFlow's outputs (tests/fixtures/preprocessing_goldens.npz).
Proprio: bounds_q99 normalization. Actions: bounds_q99 un-normalization where the mask is true, then
the gripper: g in [0, 1] -> sign(2g - 1) -> * -1 (the environment uses -1 = open, +1 = close).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

# The published processor's `tvf_normalize_params`: ImageNet mean/std as stored there, rounded to bf16
# (the official conversion ran with bf16 as the default dtype). They override the `means`/`stds` fields.
TVF_IMAGENET_MEAN = (0.484375, 0.455078125, 0.40625)
TVF_IMAGENET_STD = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default
LANCZOS_RADIUS = 3


@dataclass(frozen=True)
class ImageNorm:
    """Per-tower mean/std (tower 0 = DINOv2, tower 1 = SigLIP); defaults: the published processor's values."""

    means: tuple[tuple[float, float, float], ...] = (TVF_IMAGENET_MEAN, SIGLIP_MEAN)
    stds: tuple[tuple[float, float, float], ...] = (TVF_IMAGENET_STD, SIGLIP_STD)

    @staticmethod
    def from_preprocessor_config(d: dict) -> "ImageNorm":
        """Reads Prismatic's `preprocessor_config.json`: `tvf_normalize_params` ([{mean, std}] per tower),
        which the official processor applies, else `means` / `stds` (one triple per tower)."""
        if "tvf_normalize_params" in d:
            params = d["tvf_normalize_params"]
            if not isinstance(params, list) or not all(isinstance(p, dict) and "mean" in p and "std" in p
                                                       for p in params):
                raise ValueError(f"preprocessor_config.json: 'tvf_normalize_params' must be a list of "
                                 f"{{'mean': [3], 'std': [3]}} (one per tower), got {params!r}")
            means, stds = [p["mean"] for p in params], [p["std"] for p in params]
        elif "means" in d and "stds" in d:
            means, stds = d["means"], d["stds"]
        else:
            raise ValueError("preprocessor_config.json has neither 'tvf_normalize_params' nor 'means'/'stds' "
                             "(expected a PrismaticImageProcessor config)")
        means = tuple(tuple(float(v) for v in m) for m in means)
        stds = tuple(tuple(float(v) for v in s) for s in stds)
        if len(means) != 2 or len(stds) != 2 or any(len(t) != 3 for t in means + stds):
            raise ValueError(f"preprocessor_config.json: expected 2 towers x 3 channels, got means={means} stds={stds}")
        return ImageNorm(means, stds)


def check_image(img, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"obs['{name}'] must be a numpy array (uint8 [H, W, 3]), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"obs['{name}'] must have dtype uint8 (values 0..255), got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"obs['{name}'] must have shape [H, W, 3], got {tuple(img.shape)}")
    return img


# ------------------------------------------------------------------ JPEG round trip
def jpeg_encode(img: np.ndarray) -> bytes:
    """tf.image.encode_jpeg's defaults: quality 95, 4:2:0 chroma subsampling, accurate integer DCT, standard
    Huffman tables. Pillow's libjpeg-turbo encoder with these settings writes the same entropy-coded data as
    TensorFlow's (tests/test_processing.py compares the bytes); simplejpeg's TurboJPEG encoder does not."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)  # 4:2:0
    return buf.getvalue()


def jpeg_decode(data: bytes) -> np.ndarray:
    """tf.io.decode_image's JPEG defaults: libjpeg's fast integer IDCT (TF's choice for dct_method=""),
    fancy (smooth) chroma upsampling."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


# ------------------------------------------------------------------ TF's antialiased Lanczos-3 resize
def _c_sinf():
    """The C library's float sine, which TensorFlow's kernel calls (std::sin(float)); None if not loadable."""
    name = ctypes.util.find_library("m")
    try:
        fn = ctypes.CDLL(name).sinf if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


_SINF = _c_sinf()


def _sin32(v: np.float32) -> np.float32:
    # glibc's sinf is not always correctly rounded; calling it makes the weights bit-equal to TF's on Linux.
    return np.float32(_SINF(float(v)) if _SINF is not None else math.sin(float(v)))


def _lanczos3(x: np.float32) -> np.float32:
    """TF's LanczosKernelFunc(3) in float32 (kernels/image/sampling_kernels.h)."""
    pi, r = np.float32(3.14159265359), np.float32(LANCZOS_RADIUS)
    x = abs(x)
    if x > r:
        return np.float32(0.0)
    if float(x) <= 1e-3:  # C++ compares the float against the double 1e-3
        return np.float32(1.0)
    return r * _sin32(pi * x) * _sin32(pi * x / r) / (pi * pi * x * x)


@functools.lru_cache(maxsize=64)
def resize_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TF's ComputeSpansCore for lanczos3, antialias=True, translation 0, all in float32 ->
    (starts [out_size] int64, weights [out_size, span] float32: output i = sum_k w[i, k] * in[starts[i] + k])."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)  # tf.image.resize: size / input shape, in float32
    inv_scale = f32(1.0 / float(scale))
    kernel_scale = max(inv_scale, f32(1.0))
    reach = f32(LANCZOS_RADIUS) * kernel_scale
    span = min(2 * int(math.ceil(reach)) + 1, in_size)
    one_over_kernel_scale = f32(1.0) / kernel_scale
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span), np.float32)
    for i in range(out_size):
        sample = (f32(i) + f32(0.5)) * inv_scale
        lo = min(max(int(math.ceil(sample - reach - f32(0.5))), 0), in_size - 1)
        hi = min(max(int(math.floor(sample + reach - f32(0.5))), 0), in_size - 1) + 1
        w = [_lanczos3((f32(s) + f32(0.5) - sample) * one_over_kernel_scale) for s in range(lo, hi)]
        total = f32(0.0)
        for v in w:
            total = total + v
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            weights[i, :len(w)] = np.array(w, np.float32) * (f32(1.0) / total)
        starts[i] = lo
    return starts, weights


@functools.lru_cache(maxsize=64)
def _pass_taps(in_size: int, out_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """resize_spans as one (source row index [out], weight [out, 1]) pair per tap k."""
    starts, weights = resize_spans(in_size, out_size)
    # past a span's end the weight is 0: the index is clamped, and a tap that is 0 for every output (the
    # span is sized for the widest one) is skipped; adding 0 * x would not change any sum
    return [(np.minimum(starts + k, in_size - 1), np.ascontiguousarray(weights[:, k:k + 1]))
            for k in range(weights.shape[1]) if weights[:, k].any()]


def _resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """One pass of TF's GatherRows over x [n_in, M] (uint8 or float32) -> float32 [out_size, M]: each output
    row is the sum over the span, in order, of weight * input row, in float32 (separate mul and add, as TF).
    numpy, single-threaded on purpose: the evaluation runs it beside simulator processes."""
    out = np.empty((out_size, x.shape[1]), np.float32)
    term = np.empty_like(out)
    for k, (idx, w) in enumerate(_pass_taps(x.shape[0], out_size)):
        dst = out if k == 0 else term
        if x.dtype == np.float32:
            np.take(x, idx, axis=0, out=dst)
        else:
            dst[...] = np.take(x, idx, axis=0)
        np.multiply(dst, w, out=dst)
        if k:
            np.add(out, term, out=out)
    return out


def resize_lanczos3(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize(img, (height, width), "lanczos3", antialias=True) for uint8 img [H, W, C] ->
    float32 [height, width, C], equal to TF's bit for bit given the same C library sine: rows first,
    then columns, as TF's scale_and_translate."""
    H, W, C = img.shape
    x = _resize_rows(np.ascontiguousarray(img).reshape(H, W * C), height)  # [height, W*C]
    x = np.ascontiguousarray(x.reshape(height, W, C).transpose(1, 0, 2)).reshape(W, height * C)
    return _resize_rows(x, width).reshape(width, height, C).transpose(1, 0, 2)  # columns pass as a rows pass


def resize_like_reference(img: np.ndarray, size: int = 224, jpeg: bool = True) -> np.ndarray:
    """The official `resize_image_for_policy`: JPEG round trip, antialiased Lanczos-3 resize to
    size x size, round half to even, clip, uint8."""
    if jpeg:
        img = jpeg_decode(jpeg_encode(img))
    out = resize_lanczos3(img, size, size)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


# ------------------------------------------------------------------ TF's crop_and_resize
def crop_and_resize(img: np.ndarray, crop_scale: float = 0.9) -> np.ndarray:
    """The official `center_crop_image`: center crop of `crop_scale` of the area, bilinearly resized back
    to the input size, as tf.image.crop_and_resize in float32 between TF's convert_image_dtype steps.

    Box [y1, x1, y2, x2] = [o, o, o + s, o + s] with s = sqrt(crop_scale), o = (1 - s) / 2 (float32);
    output pixel i samples input coordinate y1 (H - 1) + i (y2 - y1) (H - 1) / (H_out - 1). In: x * float32(1/255);
    out: clip to [0, 1], then truncate(x * 255.5) (convert_image_dtype with saturate=True). The
    interpolation along x is done once per input row; each output pixel then combines the same numbers,
    in the same order, as TF's `top + (bottom - top) * y_lerp`.
    """
    f32 = np.float32
    H, W, _ = img.shape
    side = min(max(np.sqrt(f32(crop_scale)), f32(0.0)), f32(1.0))
    lo = (f32(1.0) - side) / f32(2.0)
    hi = lo + side

    def coords(n):  # -> (floor index, ceil index, lerp) of the sample positions along one axis
        step = (hi - lo) * f32(n - 1) / f32(n - 1)
        c = lo * f32(n - 1) + np.arange(n, dtype=np.float32) * step
        c0 = np.floor(c)
        return c0.astype(np.intp), np.ceil(c).astype(np.intp), c - c0

    x = np.multiply(img, f32(1.0 / 255.0), dtype=np.float32)
    x0, x1, wx = coords(W)
    left = np.take(x, x0, axis=1)
    rows = np.take(x, x1, axis=1)
    rows -= left
    rows *= wx[None, :, None]
    rows += left  # [H, W, C] interpolated along x
    y0, y1, wy = coords(H)
    top = np.take(rows, y0, axis=0)
    out = np.take(rows, y1, axis=0)
    out -= top
    out *= wy[:, None, None]
    out += top
    np.clip(out, 0.0, 1.0, out=out)
    out *= f32(255.5)
    return out.astype(np.uint8)


def prepare_image(img: np.ndarray, size: int = 224, center_crop: bool = True, jpeg: bool = True) -> np.ndarray:
    """The evaluation's image pipeline up to the model-input uint8 image [size, size, 3]. An image already
    size x size is not re-encoded or resized (the official `prepare_images_for_vla` skips it)."""
    if img.shape[:2] != (size, size):
        img = resize_like_reference(img, size, jpeg)
    return crop_and_resize(img) if center_crop else np.array(img, copy=True)


def default_prep_threads() -> int:
    """Threads for a batch's image pre-processing: the cores, at most 8 (numpy, Pillow and simplejpeg release the
    GIL in their heavy parts; in the evaluation the simulators wait while the policy runs)."""
    return max(1, min(8, os.cpu_count() or 1))


_POOLS: dict[int, tuple[int, ThreadPoolExecutor]] = {}  # threads -> (pid that made it, pool)


def _pool(threads: int) -> ThreadPoolExecutor:
    pid, pool = _POOLS.get(threads, (None, None))
    if pid != os.getpid():  # none yet, or inherited through fork (its threads did not come along)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vla-prep")
        _POOLS[threads] = (os.getpid(), pool)
    return pool


def prepare_images(images: list[np.ndarray], size: int = 224, center_crop: bool = True, jpeg: bool = True,
                   threads: int = 1) -> list[np.ndarray]:
    """prepare_image for each image, in order, on up to `threads` threads: the same arrays as one at a time."""
    if threads <= 1 or len(images) <= 1:
        return [prepare_image(img, size, center_crop, jpeg) for img in images]
    return list(_pool(threads).map(lambda img: prepare_image(img, size, center_crop, jpeg), images))


MODEL_IMAGES = "model_images"  # obs key: {"spec": (size, center_crop, jpeg), "images": [full, wrist] uint8}


def attach_model_images(obs: dict, spec: tuple[int, bool, bool]) -> dict:
    """obs with both cameras through prepare_image(..., *spec) under MODEL_IMAGES (computed where the observation is
    made, e.g. in a simulator worker, so the policy's process need not); model_images() takes them back."""
    images = [prepare_image(check_image(obs[k], k), *spec) for k in ("full_image", "wrist_image")]
    return {**obs, MODEL_IMAGES: {"spec": tuple(spec), "images": images}}


def model_images(obs: dict, spec: tuple[int, bool, bool]) -> list[np.ndarray] | None:
    """The prepared [full, wrist] images an observation carries for exactly this spec, else None (compute them)."""
    entry = obs.get(MODEL_IMAGES) if isinstance(obs, dict) else None
    if isinstance(entry, dict) and tuple(entry.get("spec", ())) == tuple(spec):
        return list(entry["images"])
    return None


@functools.lru_cache(maxsize=8)
def _normalize_table(norm: ImageNorm) -> np.ndarray:
    """[towers, 3, 256]: every uint8 value through torchvision's to_tensor + normalize, per tower and channel
    ((v / 255 - mean) / std in float32, torch's ops), so normalizing an image is a lookup of the same numbers."""
    v = torch.arange(256, dtype=torch.float32) / 255.0
    return torch.stack([torch.stack([(v - m) / s for m, s in zip(torch.tensor(mean), torch.tensor(std))])
                        for mean, std in zip(norm.means, norm.stds)]).numpy()


def to_pixel_values(images: list[np.ndarray], norm: ImageNorm, out: np.ndarray | None = None) -> torch.Tensor:
    """uint8 [224, 224, 3] images (third-person first, then wrist) -> [6 * n, 224, 224] float32: per image,
    3 DINOv2-normalized then 3 SigLIP-normalized channels (torchvision's to_tensor + normalize). Writes into
    `out` (float32 [6 * n, H, W]) when given."""
    table = _normalize_table(norm)  # [towers, 3, 256]
    towers = table.shape[0]
    H, W = images[0].shape[:2]
    if out is None:
        out = np.empty((towers * 3 * len(images), H, W), np.float32)
    view = out.reshape(len(images), towers, 3, H, W)
    for i, img in enumerate(images):
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        for c in range(3):
            for t in range(towers):
                np.take(table[t, c], chw[c], out=view[i, t, c])
    return torch.from_numpy(out)


# ------------------------------------------------------------------ proprio / actions
def check_state(state, dim: int = 8) -> np.ndarray:
    s = np.asarray(state, dtype=np.float64)
    if s.shape != (dim,):
        raise ValueError(f"obs['state'] must have shape ({dim},) = eef_pos(3) + axis_angle(3) + gripper_qpos(2), "
                         f"got {s.shape}")
    if not np.all(np.isfinite(s)):
        bad = [i for i in range(dim) if not np.isfinite(s[i])]
        raise ValueError(f"obs['state'] contains NaN/inf at indices {bad}: {s.tolist()}")
    return s


def normalize_proprio(state: np.ndarray, stats: dict) -> np.ndarray:
    """bounds_q99: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where the mask is true."""
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    norm = np.where(mask, 2 * (state - q01) / (q99 - q01 + 1e-8) - 1, state)
    return np.clip(norm, -1, 1)


def unnormalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """actions: [..., 7] in [-1, 1] -> 0.5 (a + 1) (q99 - q01 + 1e-8) + q01 where mask; no clipping."""
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    a = np.asarray(actions, np.float64)
    return np.where(mask, 0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01, a)


def gripper_to_env(actions: np.ndarray) -> np.ndarray:
    """Last dim's gripper g in [0, 1] (0 = close, 1 = open) -> sign(2g - 1) * -1 (env: -1 open, +1 close)."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2 * out[..., -1] - 1)
    return out
