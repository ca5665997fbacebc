"""Pre- and post-processing against numbers worked out by hand."""

import numpy as np
import pytest
import torch

from vla_accel import processing as P
from vla_accel.tokenizer import with_empty_token

STATS = {"q01": [0.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]}


def test_proprio_normalization_worked_numbers():
    stats = {"q01": [0.0, -1.0, 0, 0, 0, 0, 0, 0], "q99": [2.0, 1.0, 1, 1, 1, 1, 1, 1]}
    x = np.array([1.5, 0.25, 5.0, -3.0, 0.5, 0, 1, 0.75])
    # 2 (x - q01) / (q99 - q01) - 1: 1.5 -> 0.5; 0.25 -> 0.25; 5 -> 9 -> clip 1; -3 -> -7 -> clip -1; 0.5 -> 0; 0 -> -1; 1 -> 1
    expect = [0.5, 0.25, 1.0, -1.0, 0.0, -1.0, 1.0, 0.5]
    np.testing.assert_allclose(P.normalize_proprio(x, stats), expect, atol=1e-7)


def test_action_unnormalization_and_gripper_worked_numbers():
    a = np.array([[-1.0, 0.0, 1.0, 0.5, -0.5, 2.0, 0.9], [0, 0, 0, 0, 0, 0, 0.1]])
    un = P.unnormalize_actions(a, STATS)
    # 0.5 (a + 1) * 2 + 0 = a + 1 where masked; gripper (mask False) passes through; no clipping (2 -> 3)
    np.testing.assert_allclose(un[0], [0.0, 1.0, 2.0, 1.5, 0.5, 3.0, 0.9], atol=1e-7)
    env = P.gripper_to_env(un)
    assert env[0, -1] == -1.0  # g = 0.9 (open) -> sign(0.8) = 1 -> env -1 (open)
    assert env[1, -1] == 1.0  # g = 0.1 (close) -> sign(-0.8) = -1 -> env +1 (close)
    np.testing.assert_array_equal(env[:, :6], un[:, :6])


def test_crop_and_resize_worked_numbers():
    # A linear ramp is reproduced exactly by bilinear sampling: v(y, x) = 40 y + 4 x on a 3x3 image.
    y, x = np.mgrid[0:3, 0:3]
    img = np.repeat((40 * y + 4 * x).astype(np.uint8)[..., None], 3, axis=2)
    # crop_scale 0.25 -> side 0.5, box [0.25, 0.75]: samples at 0.5, 1.0, 1.5 (pixel units) on each axis
    # value 40 cy + 4 cx -> /255 -> floor(v / 255 * 255.5): 22 -> 22, 24 -> 24, 44 -> 44, 66 -> 66
    out = P.crop_and_resize(img, crop_scale=0.25)[..., 0]
    np.testing.assert_array_equal(out, [[22, 24, 26], [42, 44, 46], [62, 64, 66]])


def test_crop_of_full_area_is_identity():
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(P.crop_and_resize(img, crop_scale=1.0), img)


def test_prepare_image_shapes_and_resize():
    img = np.full((256, 256, 3), 77, np.uint8)
    out = P.prepare_image(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 77).max() <= 1  # flat image stays flat through JPEG, Lanczos and crop


def test_pixel_values_layout_and_normalization():
    a = np.zeros((224, 224, 3), np.uint8)
    b = np.full((224, 224, 3), 255, np.uint8)
    px = P.to_pixel_values([a, b], P.ImageNorm())
    assert px.shape == (12, 224, 224)
    # image a (0): DINOv2 (0 - 0.485)/0.229 = -2.1179; SigLIP (0 - 0.5)/0.5 = -1
    torch.testing.assert_close(px[0, 0, 0], torch.tensor(-2.117904), rtol=1e-5, atol=1e-5)
    assert px[3:6].eq(-1).all()
    # image b (255): DINOv2 channel 2: (1 - 0.406)/0.225 = 2.64; SigLIP +1
    torch.testing.assert_close(px[8, 5, 5], torch.tensor(2.64), rtol=1e-5, atol=1e-5)
    assert px[9:12].eq(1).all()


def test_empty_token_handling():
    assert with_empty_token([1, 5, 6]) == [1, 5, 6, 29871]
    assert with_empty_token([1, 5, 29871]) == [1, 5, 29871]


def test_preprocessor_config_parsing_errors():
    with pytest.raises(ValueError, match="means"):
        P.ImageNorm.from_preprocessor_config({"image_mean": [0.5] * 3})
    with pytest.raises(ValueError, match="2 towers x 3 channels"):
        P.ImageNorm.from_preprocessor_config({"means": [[0.5] * 3], "stds": [[0.5] * 3]})
