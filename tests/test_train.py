"""vla_accel.train: a few steps of the OFT recipe on the tiny model, checkpoints, resume, the CLI.

Synthetic demos (tests/test_train_data.py::make_episode): no simulator. Each training test runs a
handful of optimizer steps of the 2.7 M-parameter tiny configuration on CPU.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train_data import write_demos

import vla_accel
from vla_accel.model.oft import OpenVLAOFT
from vla_accel.policy import Policy
from vla_accel.tokenizer import LazyTokenizer
from vla_accel.train.config import TrainConfig, TrainConfigError, train_config
from vla_accel.train.data import decode_jpeg, load_episode
from vla_accel.train.trainer import CKPT_DIR, LOSS_FILE, STATE_FILE, train


def config(demos, **kw) -> TrainConfig:
    values = dict(demos=str(demos), steps=25, batch_size=4, lr=1e-3, warmup_steps=2, val_episodes_per_task=0,
                  log_every=1, save_every=100, device="cpu", progress=False, seed=0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    write_demos(root, tasks=(0, 1), episodes=(0,))
    return root


@pytest.fixture(scope="module")
def trained(demos, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    summary = train(config(demos), run)
    return run, summary


def losses(run):
    return [json.loads(line) for line in (run / LOSS_FILE).read_text().splitlines()]


def test_few_steps_reduce_the_loss(trained):
    run, summary = trained
    train_loss = [r["train"] for r in losses(run)]
    assert len(train_loss) == 25 and summary["step"] == 25
    # 24 samples, lr 1e-3: the tiny model fits them quickly; the L1 starts near 0.4 (random init)
    assert np.mean(train_loss[-5:]) < 0.7 * np.mean(train_loss[:5]), train_loss
    assert (run / "loss.png").stat().st_size > 1000


def test_checkpoint_reloads_bit_exactly(trained, demos):
    run, _ = trained
    ckpt = run / CKPT_DIR
    names = sorted(p.name for p in ckpt.iterdir())
    assert "action_head--25_checkpoint.pt" in names and "proprio_projector--25_checkpoint.pt" in names
    assert {"config.json", "model.safetensors", "dataset_statistics.json", "tokenizer.json",
            "training.json"} <= set(names)
    loaded = vla_accel.load_policy(ckpt, device="cpu", dtype=torch.float32, unnorm_key="libero_object")
    assert loaded.unnorm_key == "libero_object_no_noops"

    state = torch.load(run / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    mine = loaded.model.state_dict()
    unused = [k for k in state if k not in mine]  # towers' last block: saved, never run
    assert all(".blocks.2." in k for k in unused), unused
    for k, v in mine.items():
        assert torch.equal(v, state[k]), k
    # only the rows of token ids the policy can see are non-zero (small compressed checkpoints)
    rows = mine["language_model.model.embed_tokens.weight"].abs().sum(1).nonzero().flatten().tolist()
    assert {1, 2, 29871, 32000} <= set(rows) and len(rows) < 40, rows

    # the same predictions as the trained weights in memory, through the saved tokenizer
    model = OpenVLAOFT(loaded.cfg)
    model.load_state_dict(state)
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    ref = Policy(model, norm_stats=stats, unnorm_key="libero_object", tokenizer=LazyTokenizer(ckpt))
    ep = load_episode(sorted((demos / "libero_object").glob("*.npz"))[0])
    obs = {"full_image": decode_jpeg(ep.jpegs["full_image"][3]), "wrist_image": decode_jpeg(ep.jpegs["wrist_image"][3]),
           "state": ep.state[3]}
    np.testing.assert_array_equal(loaded.predict(obs, ep.meta["instruction"]), ref.predict(obs, ep.meta["instruction"]))


def test_resume_continues_where_it_stopped(demos, tmp_path):
    train(config(demos, steps=3, save_every=3), tmp_path)
    train(config(demos, steps=5, save_every=3), tmp_path)
    assert [r["step"] for r in losses(tmp_path)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / CKPT_DIR).glob("action_head--*")) == ["action_head--5_checkpoint.pt"]
    assert not (tmp_path / f"{CKPT_DIR}.tmp").exists() and not (tmp_path / f"{CKPT_DIR}.old").exists()


def test_validation_split_holds_out_episodes(tmp_path):
    root = tmp_path / "demos"
    write_demos(root, tasks=(0,), episodes=(0, 1), length=6)
    summary = train(config(root, steps=2, val_episodes_per_task=1, val_every=2), tmp_path / "run")
    assert summary["val_loss"] is not None and np.isfinite(summary["val_loss"])
    info = json.loads((tmp_path / "run" / CKPT_DIR / "training.json").read_text())
    assert info["train_samples"] == 6 and info["val_samples"] == 6


@pytest.mark.parametrize("values,message", [
    ({}, "train.demos is required"),
    ({"demos": "x", "steps": 0}, "train.steps"),
    ({"demos": "x", "crop_scale": 1.5}, "train.crop_scale"),
    ({"demos": "x", "amp": "fp8"}, "train.amp"),
    ({"demos": "x", "model": {"hidden": 60, "heads": 8}}, "divisible"),
    ({"demos": "x", "model": {"dino": {"width": 32, "depth": 1, "heads": 2}}}, "depth must be >= 2"),
    ({"demos": "x", "batchsize": 4}, "known train settings"),
])
def test_config_errors_name_the_field(values, message):
    with pytest.raises(TrainConfigError, match=message):
        train_config(values)


def test_cli_smoke(demos, tmp_path):
    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "vla_accel.train.cli", "train=smoke", f"train.demos={demos}", "train.steps=2",
           "train.progress=false", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / CKPT_DIR / "action_head--2_checkpoint.pt").exists()
    bad = subprocess.run(cmd[:3] + [f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "train.demos is required" in bad.stderr


def test_time_budget_shortens_the_run_and_scales_the_schedule(demos):
    from vla_accel.train.trainer import fit_steps

    cfg = config(demos, steps=1000, decay_step=800, max_minutes=1.0)
    # 40 steps took 10 s, now 0.2 s/step: 50 s left, 95% of it -> 237 more steps
    steps, decay = fit_steps(cfg, start=0, done=40, elapsed=10.0, step_s=0.2)
    assert steps == 40 + int(0.95 * 50 / 0.2) and decay == round(800 * steps / 1000)
    assert fit_steps(cfg, start=0, done=40, elapsed=1.0, step_s=0.001) == (1000, 800)  # fast enough: unchanged


def test_report_intervals_and_differences(tmp_path):
    from vla_accel.train.report import format_report, newcombe, wilson

    # Wilson's interval for 10/20 (textbook value 0.299 - 0.701) and the edge cases
    np.testing.assert_allclose(wilson(10, 20), (0.2993, 0.7007), atol=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    d, lo, hi = newcombe(20, 20, 20, 20)
    assert d == 0 and lo < 0 < hi

    def run(prune, runtime, successes):
        records = {("libero_object", t, 30 + e): {"success": s, "tokens_kept": [600 if prune == "none" else 150]}
                   for t, row in enumerate(successes) for e, s in enumerate(row)}
        return {"label": f"{prune}/{runtime}", "prune": prune, "runtime": runtime, "records": records, "dir": "d"}

    text = format_report([run("none", "reference", [[1, 1, 1, 0], [1, 1, 0, 0]]),
                          run("specprune", "reference", [[1, 1, 0, 0], [1, 1, 0, 0]])], "T")
    assert "| none/reference | 3/4 | 2/4 | 62.5% [30.6, 86.3] | 600.0 |" in text
    assert "| specprune/reference - none/reference | 8 | 50.0 - 62.5 = -12.5 |" in text


def test_fixture_picks_the_quickest_episode_every_run_solved():
    from vla_accel.train.fixture import pick_episode

    def run(label, results):
        return {"label": label, "records": {("libero_object", t, e): {"success": s, "steps": n}
                                            for (t, e), (s, n) in results.items()}}

    none = run("none/reference", {(0, 30): (True, 150), (1, 30): (True, 120), (2, 30): (True, 100)})
    pruned = run("specprune/reference", {(0, 30): (True, 140), (1, 30): (True, 130), (2, 30): (False, 280)})
    case = pick_episode([none, pruned], margin=40)
    assert (case["task_id"], case["episode"], case["max_steps"]) == (1, 30, 130 + 40)
    with pytest.raises(ValueError, match="no episode was solved"):
        pick_episode([none, run("x/y", {(1, 30): (False, 280)})], margin=40)
