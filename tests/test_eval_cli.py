"""CLI helpers: GPU pinning per submitit_local job, the EGL device for workers, config composition."""

import pytest

from vla_accel.eval.cli import egl_device_for_workers, pin_gpu, render_env


@pytest.mark.parametrize("visible,job,expected", [
    ("0,1,2,3", 0, "0"), ("0,1,2,3", 5, "1"), ("4,6", 3, "6"),
])
def test_pin_gpu_gives_each_local_job_one_gpu(monkeypatch, visible, job, expected):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("MUJOCO_EGL_DEVICE_ID", "unset")    # restored after the test
    assert pin_gpu(True, job) == expected
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
    assert os.environ["MUJOCO_EGL_DEVICE_ID"] == expected      # the simulators render on the job's GPU too


@pytest.mark.parametrize("executor,visible,job,enabled", [
    ("slurm", "0,1", 1, True),      # SLURM assigns GPUs itself
    ("local", "0", 1, True),        # a single GPU: nothing to choose
    ("local", "", 1, True),         # no GPU
    ("local", "0,1", None, True),   # not a multirun job
    ("local", "0,1", 1, False),     # switched off
])
def test_pin_gpu_leaves_other_cases_alone(monkeypatch, executor, visible, job, enabled):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert pin_gpu(enabled, job) is None
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible


def test_empty_cuda_visible_devices_gets_an_egl_device(monkeypatch):
    import os

    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")       # what submitit_local sets without GPUs
    egl_device_for_workers()
    assert os.environ["MUJOCO_EGL_DEVICE_ID"] == "0"
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    egl_device_for_workers()
    assert "MUJOCO_EGL_DEVICE_ID" not in os.environ


@pytest.mark.parametrize("overrides,check", [
    ([], lambda c: c.policy.random and c.eval.episodes == [0] and c.eval.task_ids == [0]),
    (["eval=full"], lambda c: c.eval.episodes is None and c.eval.task_ids is None),
    (["policy=checkpoint", "policy.checkpoint=x/y"], lambda c: not c.policy.random),
    (["hydra/launcher=local_gpus"], lambda c: True),
    (["hydra/launcher=slurm"], lambda c: True),
])
def test_packaged_configs_compose(overrides, check):
    from hydra import compose, initialize_config_module

    from vla_accel.eval.config import run_config_from_hydra

    with initialize_config_module("vla_accel.configs", version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    assert check(run_config_from_hydra(cfg))


def test_render_threads_reach_the_workers_environment():
    assert render_env(None) == {}                     # Mesa's default
    assert render_env(3) == {"LP_NUM_THREADS": "3"}
