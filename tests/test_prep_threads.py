"""A batch's image pre-processing on several threads (processing.prepare_images, Policy.prep_threads, SpecPrune's
earlier frames) gives the same arrays, the same pixels and the same actions as one image at a time; a process
forked after the pool started still prepares (its copy of the pool has no threads)."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

import vla_accel
from vla_accel import processing as P
from vla_accel.prune import SpecPrune
from vla_accel.prune.demo import synthetic_trace

from test_prune_model import specprune_cfg


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", seed=3)


def scene(seed, size=256):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    img = coarse.repeat(16, 0).repeat(16, 1)
    img[rng.integers(0, size, 200), rng.integers(0, size, 200)] = 255  # sharp edges: ringing, JPEG artefacts
    return img


def test_prepare_images_equals_one_at_a_time():
    imgs = [scene(s) for s in range(6)] + [scene(7, 224)]  # a 224 px image is only cropped
    one = [P.prepare_image(img) for img in imgs]
    for threads in (1, 2, 4):
        many = P.prepare_images(imgs, threads=threads)
        assert len(many) == len(one)
        for a, b in zip(many, one):
            assert a.dtype == np.uint8 and np.array_equal(a, b)


def test_policy_prepare_is_the_same_on_threads(policy):
    obs = [{"full_image": scene(2 * i), "wrist_image": scene(2 * i + 1), "state": np.full(8, 0.01 * i)}
           for i in range(5)]
    obs[2] = P.attach_model_images(obs[2], policy.image_spec)  # one observation carries its images
    texts = ["pick up the bowl"] * 5
    policy.prep_threads = 1
    ids1, px1, pr1 = policy.prepare(obs, texts)
    policy.prep_threads = 4
    ids4, px4, pr4 = policy.prepare(obs, texts)
    assert ids1 == ids4 and torch.equal(pr1, pr4)
    assert torch.equal(px1, px4)
    # and each sample's pixels are those of a batch of one (no mix-up between samples)
    for b in (0, 2, 4):
        assert torch.equal(px4[b], policy.prepare([obs[b]], texts[:1])[1][0])


def test_specprune_actions_are_the_same_on_threads(policy):
    trace = synthetic_trace(steps=12, size=256, seed=1)
    runs = {}
    for threads in (1, 4):
        policy.prep_threads = threads
        actor = SpecPrune(policy, specprune_cfg())
        actor.reset([0, 1])
        acts, kept = [], []
        for t in range(12):
            obs = [{"full_image": trace["full_image"][t], "wrist_image": trace["wrist_image"][t],
                    "state": trace["state"][t]},
                   {"full_image": trace["wrist_image"][t], "wrist_image": trace["full_image"][t],
                    "state": trace["state"][t]}]
            a, infos = actor.act_batch(obs, ["push the block", "push the block"], [0, 1])
            acts.append(a)
            kept.append([(i["tokens_kept"], i.get("static_patches")) for i in infos])
        runs[threads] = (np.stack(acts), kept)
    assert any(k[0][1] is not None for k in runs[1][1])  # the changed-patch rule compared frames
    assert runs[1][1] == runs[4][1]
    np.testing.assert_array_equal(runs[1][0], runs[4][0])


def _child(q):
    q.put([img.sum() for img in P.prepare_images([scene(1), scene(2), scene(3)], threads=2)])


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_prepare_images_after_fork():
    want = [img.sum() for img in P.prepare_images([scene(1), scene(2), scene(3)], threads=2)]  # pool started here
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q,))
    proc.start()
    proc.join(30)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive, "prepare_images hung in a forked process"
    assert q.get(timeout=5) == want
