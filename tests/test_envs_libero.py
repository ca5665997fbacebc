"""vla_accel.envs: the LIBERO gymnasium env (marker `sim`), its setup and metadata, rollout traces.

    pytest tests/test_envs_libero.py              # everything (about 2-3 minutes on 2 CPU cores)
    pytest tests/test_envs_libero.py -m "not sim" # no simulator (seconds)

Simulator tests need hf-libero + robosuite, an EGL library and the LIBERO asset folder:
$VLA_ACCEL_LIBERO_ASSETS, else <repo>/../shared/libero-assets. They skip when one is absent.
"""

import ctypes.util
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_accel.envs import (
    ASSETS_ENV_VAR,
    SUITES,
    LiberoAssetsError,
    LiberoEnv,
    load_trace,
    num_episodes,
    quat2axisangle,
    save_trace,
    task_instruction,
    task_names,
    validate_selection,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get(ASSETS_ENV_VAR) or REPO.parent / "shared" / "libero-assets")
HAVE_LIBERO = all(importlib.util.find_spec(m) is not None for m in ("libero", "robosuite", "mujoco"))
HAVE_EGL = ctypes.util.find_library("EGL") is not None

requires_libero = pytest.mark.skipif(not HAVE_LIBERO, reason="hf-libero / robosuite / mujoco not installed")
requires_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason=f"no LIBERO asset folder at {ASSETS}")
_NO_SIM = [
    reason
    for missing, reason in [
        (not HAVE_LIBERO, "hf-libero / robosuite / mujoco not installed"),
        (not ASSETS.is_dir(), f"no LIBERO asset folder at {ASSETS}"),
        (not HAVE_EGL and os.environ.get("MUJOCO_GL", "egl") == "egl", "no EGL library for MUJOCO_GL=egl"),
    ]
    if missing
]
requires_sim = pytest.mark.skipif(bool(_NO_SIM), reason="; ".join(_NO_SIM))

SMALL = 64  # image side in simulator tests (on CPU a frame costs about the same at 64 and 256 px)


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    # A fresh interpreter: import side effects and prompts cannot hide behind earlier tests.
    return subprocess.run(
        [sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )


# ---- quaternion -> axis-angle (OFT / robosuite convention) ---------------------------------------------


def test_quat2axisangle_matches_scipy_rotvec_for_w_nonnegative():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(0)
    quats = rng.normal(size=(64, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    quats[quats[:, 3] < 0] *= -1  # for w >= 0 the convention agrees with the shortest rotation vector
    for quat in quats:
        expected = rotation.from_quat(quat).as_rotvec()  # scipy also takes (x, y, z, w)
        np.testing.assert_allclose(quat2axisangle(quat), expected, rtol=1e-9, atol=1e-12)


def test_quat2axisangle_keeps_angles_above_pi_and_handles_identity():
    # 270 degrees about z: the convention returns angle 2*acos(w) = 1.5*pi, not the -0.5*pi equivalent.
    quat = np.array([0.0, 0.0, np.sin(0.75 * np.pi), np.cos(0.75 * np.pi)])
    np.testing.assert_allclose(quat2axisangle(quat), [0.0, 0.0, 1.5 * np.pi], atol=1e-12)
    np.testing.assert_array_equal(quat2axisangle([0.0, 0.0, 0.0, 1.0]), np.zeros(3))
    # |w| slightly above 1 from float noise: clipped, no NaN.
    np.testing.assert_array_equal(quat2axisangle([0.0, 0.0, 0.0, 1.0 + 1e-9]), np.zeros(3))


# ---- suites, tasks, episodes, selection errors (hf-libero, no simulator) ----------------------------------


@requires_libero
def test_suite_table_task_counts_match_hf_libero():
    for suite, spec in SUITES.items():
        assert spec.name == suite
        assert len(task_names(suite)) == spec.num_tasks, suite


@requires_libero
def test_instructions_and_episode_counts():
    # The OFT protocol evaluates 50 episodes (init states) per task.
    assert num_episodes("libero_spatial", 0) == 50
    assert num_episodes("libero_90", 89) == 50
    assert (
        task_instruction("libero_spatial", 0)
        == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    )
    assert task_instruction("libero_goal", 0) == "open the middle drawer of the cabinet"


@requires_libero
def test_validate_selection_errors_list_valid_values():
    validate_selection("libero_10", [0, 9], [0, 49])  # in range: no error
    with pytest.raises(ValueError, match=r"libero_spatial, libero_object, libero_goal, libero_10, libero_90"):
        validate_selection("libero_100", [0], None)
    with pytest.raises(ValueError, match=r"task_id 10 .*libero_goal.*0\.\.9"):
        validate_selection("libero_goal", [3, 10], None)
    with pytest.raises(ValueError, match=r"episode 50 .*libero_object task 0.*0\.\.49"):
        validate_selection("libero_object", [0], [0, 50])
    with pytest.raises(ValueError, match=r"episode -1 "):
        validate_selection("libero_90", None, [-1])
    with pytest.raises(ValueError, match=r"task_id must be an integer"):
        validate_selection("libero_10", [1.5], None)


@requires_assets
def test_env_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="valid suites"):
        LiberoEnv("libero_100", assets_path=ASSETS)
    with pytest.raises(ValueError, match=r"0\.\.89"):
        LiberoEnv("libero_90", task_id=90, assets_path=ASSETS)
    with pytest.raises(ValueError, match="image_size"):
        LiberoEnv(image_size=0, assets_path=ASSETS)


# ---- the asset folder and LIBERO's config file -----------------------------------------------------------


@requires_assets
def test_missing_assets_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(ASSETS_ENV_VAR, raising=False)
    with pytest.raises(LiberoAssetsError, match=r"does not exist.*assets_path"):
        LiberoEnv(assets_path=tmp_path / "absent")
    monkeypatch.setenv(ASSETS_ENV_VAR, str(tmp_path))  # exists, but empty
    with pytest.raises(LiberoAssetsError, match=rf"environment variable {ASSETS_ENV_VAR}\).* lacks .*scenes"):
        LiberoEnv()


@requires_assets
def test_assets_argument_wins_over_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ASSETS_ENV_VAR, str(tmp_path))  # invalid: would raise if it were used
    assert LiberoEnv(assets_path=ASSETS).assets_path == ASSETS.resolve()
    monkeypatch.setenv(ASSETS_ENV_VAR, str(ASSETS))
    assert LiberoEnv().assets_path == ASSETS.resolve()


@requires_libero
def test_metadata_import_writes_config_and_never_prompts(tmp_path):
    # Fresh HOME, no LIBERO_CONFIG_PATH, stdin closed: hf-libero's input() prompt would raise EOFError.
    env = {k: v for k, v in os.environ.items() if k not in ("LIBERO_CONFIG_PATH", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    code = "from vla_accel.envs import task_names; print(task_names('libero_goal')[0])"
    result = _run_python(code, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "open_the_middle_drawer_of_the_cabinet" in result.stdout
    config = (tmp_path / ".cache" / "vla_accel" / "libero" / "config.yaml").read_text()
    for key in ("benchmark_root", "bddl_files", "init_states", "datasets", "assets"):
        assert f"{key}:" in config
    assert not (tmp_path / ".libero").exists()  # the user's default LIBERO config was left alone


@requires_assets
def test_env_creation_is_lazy_and_picklable():
    code = (
        "import pickle, sys\n"
        "from vla_accel.envs import LiberoEnv\n"
        f"env = LiberoEnv('libero_goal', task_id=2, image_size=32, assets_path={str(ASSETS)!r})\n"
        "copy = pickle.loads(pickle.dumps(env))\n"
        "assert (copy.suite, copy.task_id, copy.observation_space) == ('libero_goal', 2, env.observation_space)\n"
        "print(sorted(m for m in ('robosuite', 'mujoco', 'libero.libero.envs') if m in sys.modules))\n"
    )
    result = _run_python(code, dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


# ---- the simulator ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    # max_steps=3 keeps the truncation test short; everything else is the official configuration.
    env = LiberoEnv("libero_spatial", task_id=0, image_size=SMALL, assets_path=ASSETS, max_steps=3)
    yield env
    env.close()


def _assert_same_observation(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)



@pytest.mark.sim
@requires_sim
@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")  # state has no natural bounds
def test_gymnasium_env_checker(env, monkeypatch):
    from gymnasium.utils.env_checker import check_env

    # check_env resets about 12 times; without the settle steps that takes half the time. Settling
    # changes no API property, and the reproducibility test below runs with it.
    monkeypatch.setattr(env, "settle_steps", 0)
    check_env(env)


@pytest.mark.sim
@requires_sim
def test_reset_to_an_init_state_gives_the_same_first_observation(env):
    first, info = env.reset(options={"episode": 3})
    assert info == {
        "instruction": task_instruction("libero_spatial", 0),
        "suite": "libero_spatial",
        "task_id": 0,
        "episode": 3,
        "success": False,
    }
    other, _ = env.reset(options={"episode": 7})
    env.step(env.action_space.sample())
    again, _ = env.reset(options={"episode": 3})
    _assert_same_observation(first, again)
    # The episode index matters: another init state puts the objects and robot elsewhere.
    assert not np.array_equal(first["state"], other["state"])
    assert not np.array_equal(first["full_image"], other["full_image"])


@pytest.mark.sim
@requires_sim
def test_observation_layout_and_render(env, monkeypatch):
    monkeypatch.setattr(env, "render_mode", "rgb_array")
    obs, _ = env.reset(options={"episode": 0})
    frame = env.render()
    np.testing.assert_array_equal(frame, obs["full_image"])
    assert not np.shares_memory(frame, obs["full_image"])
    for key in ("full_image", "wrist_image"):
        assert obs[key].shape == (SMALL, SMALL, 3) and obs[key].dtype == np.uint8
        assert obs[key].flags.c_contiguous
        assert obs[key].std() > 5, f"{key} looks blank"
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    # Right after the settle steps the gripper is open and points down: |axis-angle| close to pi.
    assert np.pi - 0.3 < np.linalg.norm(obs["state"][3:6]) < np.pi + 0.3
    assert obs["state"][6] > 0.01 and obs["state"][7] < -0.01  # two fingers, apart


@pytest.mark.sim
@requires_sim
def test_reset_leaves_the_global_numpy_rng_alone(env):
    np.random.seed(5)
    env.reset(options={"episode": 1})
    after_reset = np.random.random()
    np.random.seed(5)
    assert after_reset == np.random.random()


@pytest.mark.sim
@requires_sim
def test_truncation_counts_steps_after_settling(env):
    env.reset(options={"episode": 2})
    hold = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)
    flags = [env.step(hold)[2:4] for _ in range(env.max_steps)]
    assert flags == [(False, False)] * (env.max_steps - 1) + [(False, True)]


@pytest.mark.sim
@requires_sim
def test_a_simulator_from_another_process_is_refused(env, monkeypatch):
    env.reset(options={"episode": 0})
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a forked child
    with pytest.raises(RuntimeError, match="spawn or forkserver"):
        env.step(np.zeros(7))
    with pytest.raises(RuntimeError, match="spawn or forkserver"):
        env.reset(options={"episode": 0})


@pytest.mark.sim
@requires_sim
def test_reset_can_switch_task_and_back(env):
    before, _ = env.reset(options={"episode": 4})
    obs, info = env.reset(options={"suite": "libero_object", "task_id": 1, "episode": 0})
    assert (info["suite"], info["task_id"], info["episode"]) == ("libero_object", 1, 0)
    assert info["instruction"] == task_instruction("libero_object", 1)
    assert env.max_steps == 3  # an explicit max_steps stays; None would follow the suite
    assert obs in env.observation_space
    with pytest.raises(ValueError, match=r"0\.\.9"):
        env.reset(options={"task_id": 12})
    back, _ = env.reset(options={"suite": "libero_spatial", "task_id": 0, "episode": 4})
    _assert_same_observation(before, back)  # a rebuilt simulator gives the same episode


@pytest.mark.sim
@requires_sim
def test_async_vector_env_with_spawned_workers(env):
    from gymnasium.vector import AsyncVectorEnv

    reference, _ = env.reset(options={"episode": 1})
    make = functools.partial(LiberoEnv, "libero_spatial", task_id=0, image_size=SMALL, assets_path=ASSETS)
    vec = AsyncVectorEnv([make, make], context="spawn")
    try:
        obs, info = vec.reset(seed=0, options={"episode": 1})
        for i in range(2):  # same episode in two other processes: the same observation as here
            _assert_same_observation(reference, {k: v[i] for k, v in obs.items()})
        for _ in range(2):
            obs, reward, terminated, truncated, info = vec.step(np.zeros((2, 7), np.float32))
        assert obs["full_image"].shape == (2, SMALL, SMALL, 3)
        assert list(info["instruction"]) == [task_instruction("libero_spatial", 0)] * 2
        assert not terminated.any() and not truncated.any()
    finally:
        vec.close()


# ---- traces ----------------------------------------------------------------------------------------------


def _frames(count: int, height: int = 7, width: int = 9) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "full_image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "state": rng.normal(size=8).astype(np.float32),
            "action": rng.normal(size=7),  # float64, as un-normalized policy actions come
        }
        for _ in range(count)
    ]


def test_trace_round_trip(tmp_path):
    frames = _frames(5)
    meta = {"suite": "libero_goal", "task_id": 3, "episode": 11, "success": True, "timings": [0.1, 0.2]}
    path = save_trace(tmp_path / "sub" / "trace", frames, "open the top drawer", meta)
    assert path == tmp_path / "sub" / "trace.npz" and path.exists()
    trace = load_trace(path)
    for key in ("full_image", "wrist_image", "state", "action"):
        np.testing.assert_array_equal(trace[key], np.stack([f[key] for f in frames]), err_msg=key)
    assert trace["full_image"].dtype == np.uint8 and trace["full_image"].shape == (5, 7, 9, 3)
    assert trace["state"].dtype == np.float32 and trace["action"].dtype == np.float64
    assert trace["instruction"] == "open the top drawer"
    assert trace["meta"] == json.loads(json.dumps(meta))


def test_trace_rejects_inconsistent_frames(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        save_trace(tmp_path / "t.npz", [], "x", {})
    frames = _frames(3)
    frames[1]["full_image"] = frames[1]["full_image"][:5]
    with pytest.raises(ValueError, match="full_image"):
        save_trace(tmp_path / "t.npz", frames, "x", {})
    frames = _frames(2)
    frames[0]["wrist_image"] = frames[0]["wrist_image"].astype(np.float32)
    frames[1]["wrist_image"] = frames[1]["wrist_image"].astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        save_trace(tmp_path / "t.npz", frames, "x", {})
    frames = _frames(2)
    del frames[1]["action"]
    with pytest.raises(ValueError, match="action"):
        save_trace(tmp_path / "t.npz", frames, "x", {})
    frames = [dict(f, state=f["state"][:6]) for f in _frames(2)]
    with pytest.raises(ValueError, match=r"state must be \[8\]"):
        save_trace(tmp_path / "t.npz", frames, "x", {})
