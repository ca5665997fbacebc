"""Simulation environments: LIBERO as a gymnasium env, and rollout traces.

    from vla_accel.envs import LiberoEnv, SUITES
    env = LiberoEnv("libero_spatial", task_id=0, assets_path="../shared/libero-assets")
    obs, info = env.reset(options={"episode": 3})

Importing this package is light: hf-libero, robosuite and MuJoCo load when first needed.
"""

from .libero import (
    SETTLE_STEPS,
    SUITES,
    LiberoEnv,
    SuiteSpec,
    num_episodes,
    quat2axisangle,
    task_instruction,
    task_names,
    validate_selection,
)
from .libero_setup import ASSETS_ENV_VAR, LiberoAssetsError, configure_libero, resolve_assets_path
from .trace import load_trace, save_trace

__all__ = [
    "SUITES",
    "SuiteSpec",
    "SETTLE_STEPS",
    "LiberoEnv",
    "task_names",
    "task_instruction",
    "num_episodes",
    "validate_selection",
    "quat2axisangle",
    "configure_libero",
    "resolve_assets_path",
    "ASSETS_ENV_VAR",
    "LiberoAssetsError",
    "save_trace",
    "load_trace",
]
