"""Building what an evaluation needs from its settings: the actor, the env factory, the catalog.

    actor = build_actor(run_cfg)             # policy (random or checkpoint) -> runtime -> prune/chunked actor
    make_env = env_factory(run_cfg)          # picklable: make_env(suite, task_id) -> gym.Env (runs in workers)

The policy is built before any simulator starts, so a bad checkpoint fails fast with the loader's
own error. Runtime and pruning modules are imported only when selected.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from functools import partial
from typing import Any

import gymnasium as gym

from vla_accel.eval.config import ConfigError, RunConfig, run_config_from_hydra


# ---- policy / actor ---------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"policy.device={name} but torch sees no CUDA device; use policy.device=cpu (or auto)")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def device_name(device: str) -> str:
    """Human name of the device the policy runs on (GPU model, or CPU model and core count)."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        return torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _open_cfg(values: dict) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(values)


def build_actor(cfg: Any, *, unnorm_key: str | None = None):
    """Policy -> (runtime executor) -> actor, from a RunConfig or the composed Hydra config."""
    if not isinstance(cfg, RunConfig):
        cfg = run_config_from_hydra(cfg)
    if cfg.policy.name == "remote":  # the policy runs in a vla-accel-serve process (docs/serving.md)
        from vla_accel.serve.remote import remote_actor

        return remote_actor(cfg)
    import vla_accel
    from vla_accel.policy import ChunkedActor

    device = resolve_device(cfg.policy.device)
    dtype = resolve_dtype(cfg.policy.dtype, device)
    if cfg.policy.random:
        policy = vla_accel.random_policy(cfg.policy.preset, device=device, dtype=dtype, seed=cfg.policy.seed)
    else:
        policy = vla_accel.load_policy(cfg.policy.checkpoint, device=device, dtype=dtype,
                                       unnorm_key=cfg.policy.unnorm_key or unnorm_key)
    if cfg.runtime["name"] != "reference":
        try:
            from vla_accel.runtime import make_executor
        except ImportError as err:
            raise ConfigError(f"runtime={cfg.runtime['name']} needs vla_accel.runtime.make_executor, "
                              f"which cannot be imported ({err}); use runtime=reference") from err
        policy = make_executor(policy, _open_cfg(cfg.runtime))
    if cfg.prune["name"] != "none":
        try:
            from vla_accel.prune import make_actor
        except ImportError as err:
            raise ConfigError(f"prune={cfg.prune['name']} needs vla_accel.prune.make_actor, "
                              f"which cannot be imported ({err}); use prune=none") from err
        return make_actor(policy, _open_cfg(cfg.prune))
    return ChunkedActor(policy)


# ---- environments -----------------------------------------------------------------------------


class FaultInjector(gym.Wrapper):
    """TESTING ONLY (env.fault_step / env.fault_episodes): the env raises at step `step` of the
    listed episodes, as a crashing simulator would."""

    def __init__(self, env: gym.Env, step: int, episodes: list[int]):
        super().__init__(env)
        self.fault_step = step
        self.fault_episodes = set(episodes)
        self._episode: int | None = None
        self._t = 0

    def reset(self, *, seed=None, options=None):
        self._episode = (options or {}).get("episode")
        self._t = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self._episode in self.fault_episodes and self._t == self.fault_step:
            raise RuntimeError(f"injected fault at step {self._t} of episode {self._episode} "
                               "(env.fault_step, testing only)")
        self._t += 1
        return self.env.step(action)


def make_libero_env(env: dict, seed: int, suite: str, task_id: int) -> gym.Env:
    """One LiberoEnv for the settings `env` (EnvConfig as a dict); runs inside simulator workers."""
    from vla_accel.envs import LiberoEnv

    e: gym.Env = LiberoEnv(suite=suite, task_id=task_id, image_size=env["image_size"],
                           assets_path=env["assets_path"], seed=seed, settle_steps=env["settle_steps"],
                           max_steps=env["max_steps"])
    if env.get("fault_step") is not None:
        e = FaultInjector(e, env["fault_step"], env["fault_episodes"])
    return e


def resolve_assets(cfg: RunConfig) -> str:
    """The checked LIBERO asset folder; a missing one fails naming the settings that point to it."""
    from vla_accel.envs import ASSETS_ENV_VAR, LiberoAssetsError, resolve_assets_path

    try:
        return str(resolve_assets_path(cfg.env.assets_path))
    except LiberoAssetsError as err:
        raise ConfigError(f"LIBERO assets not found. Set env.assets_path=/path/to/libero-assets on the command "
                          f"line or the environment variable {ASSETS_ENV_VAR}. Details: {err}") from err


def env_factory(cfg: RunConfig, assets_path: str) -> partial:
    """Picklable make_env(suite, task_id) for the workers, with the asset folder already resolved."""
    env = dataclasses.asdict(cfg.env)
    env["assets_path"] = assets_path
    return partial(make_libero_env, env, cfg.eval.seed)


class LiberoCatalog:
    """Suites, task counts, task names and init-state counts (hf-libero metadata, no simulator)."""

    def __init__(self):
        from vla_accel import envs

        self._envs = envs
        self.suites = list(envs.SUITES)

    def num_tasks(self, suite: str) -> int:
        return self._envs.SUITES[suite].num_tasks

    def num_init_states(self, suite: str, task_id: int) -> int:
        return self._envs.num_episodes(suite, task_id)

    def task_name(self, suite: str, task_id: int) -> str:
        return self._envs.task_names(suite)[task_id]
