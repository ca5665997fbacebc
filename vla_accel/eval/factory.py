"""Building what an evaluation needs from its settings: the actor, the env factory, the catalog.

    actor = build_actor(run_cfg)             # policy (random or checkpoint) -> runtime -> prune/chunked actor
    check_prompts(actor, instructions)       # the tokenizer works and every prompt fits the model
    make_env = env_factory(run_cfg, assets)  # picklable: make_env(suite, task_id) -> gym.Env (runs in workers)

Everything here runs before any simulator starts, and every problem with the settings or the
checkpoint comes out as a ConfigError that names the setting (vla-accel-eval: exit status 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import gymnasium as gym

from vla_accel.eval.config import ConfigError, PolicyConfig, RunConfig, run_config_from_hydra

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


def policy_identity(cfg: PolicyConfig, unnorm_key: str | None, actor: Any = None) -> dict:
    """What of the policy settings decides the results: the weights, the compute dtype (resolved:
    `auto` is bfloat16 on CUDA, float32 on CPU) and the statistics key; not the device it runs on.
    policy=remote: the server's own identity (its weights, dtype, key, pruning and runtime), which
    `actor` (the connected RemoteActor) learnt from the server's metadata."""
    if cfg.name == "remote":
        if actor is None:
            raise ValueError("policy=remote: the identity comes from the server; pass the connected actor")
        return {"remote": True, "mode": actor.mode, "server": actor.identity()}
    dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).replace("torch.", "")
    if cfg.random:
        return {"random": True, "preset": cfg.preset, "seed": cfg.seed, "dtype": dtype}
    return {"random": False, "checkpoint": checkpoint_identity(cfg.checkpoint), "dtype": dtype,
            "unnorm_key": cfg.unnorm_key or unnorm_key}


def checkpoint_identity(source: str) -> str:
    """The checkpoint's content in a short hash, without reading the weights: for a local directory
    its small files (config, statistics, tokenizer: *.json, *.model) and the names and sizes of the
    weight files; for a hub id, the id. A copy elsewhere has the same identity."""
    root = Path(source).expanduser()
    if not root.is_dir():
        return f"hub:{source}"
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        if f.suffix in (".json", ".model"):
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return f"dir:{h.hexdigest()[:16]}"


def prune_names() -> list[str]:
    """The prune settings shipped in vla_accel/configs/prune."""
    return sorted(p.name[:-5] for p in resources.files("vla_accel.configs").joinpath("prune").iterdir()
                  if p.name.endswith(".yaml"))


def check_prune_runtime(cfg: RunConfig) -> None:
    """The prune and runtime mappings are valid (before the policy loads)."""
    from vla_accel.prune import PruneConfigError, SpecPruneConfig
    from vla_accel.runtime import RuntimeConfig, RuntimeConfigError

    name = cfg.prune["name"]
    if name != "none" and set(cfg.prune) == {"name"}:
        raise ConfigError(f"prune.name={name} names no pruning settings (the prune group holds only a name); "
                          f"choose a prune config with prune=<name>: {', '.join(prune_names())}")
    try:
        if name != "none":
            SpecPruneConfig.from_dict(cfg.prune)
        RuntimeConfig.from_dict(cfg.runtime)
    except (PruneConfigError, RuntimeConfigError) as err:
        group = "prune" if isinstance(err, PruneConfigError) else "runtime"
        raise ConfigError(f"{group}={getattr(cfg, group)['name']}: {err}") from None


def graph_runtime(runtime: dict, batch_sizes) -> dict:
    """The runtime settings with `batch_sizes` added to those served by CUDA graphs (an eval with N simulators
    runs batches of 1..N; others would run eagerly). Results do not change: the same kernels run either way."""
    from vla_accel.runtime import RuntimeConfig

    if runtime.get("name") != "accel" or not batch_sizes:
        return runtime
    have = runtime.get("batch_sizes", RuntimeConfig.batch_sizes)
    return {**runtime, "batch_sizes": sorted(set(have) | set(batch_sizes))}


def build_actor(cfg: Any, *, unnorm_key: str | None = None, graph_batch_sizes=()):
    """Policy -> (runtime executor) -> actor, from a RunConfig or the composed Hydra config. graph_batch_sizes:
    batch sizes the accelerated runtime serves with graphs besides runtime.batch_sizes (graph_runtime)."""
    if not isinstance(cfg, RunConfig):
        cfg = run_config_from_hydra(cfg)
    if cfg.policy.name == "remote":  # the policy runs in a vla-accel-serve process (docs/serving.md)
        from vla_accel.serve.remote import remote_actor

        return remote_actor(cfg)
    import vla_accel
    from vla_accel.policy import ChunkedActor
    from vla_accel.prune import PruneConfigError, make_actor
    from vla_accel.runtime import RuntimeConfigError, make_executor

    check_prune_runtime(cfg)
    device = resolve_device(cfg.policy.device)
    dtype = resolve_dtype(cfg.policy.dtype, device)
    if cfg.policy.random:
        policy = vla_accel.random_policy(cfg.policy.preset, device=device, dtype=dtype, seed=cfg.policy.seed)
    else:
        try:
            policy = vla_accel.load_policy(cfg.policy.checkpoint, device=device, dtype=dtype,
                                           unnorm_key=cfg.policy.unnorm_key or unnorm_key)
        except (vla_accel.CheckpointError, ValueError) as err:
            raise ConfigError(f"policy.checkpoint={cfg.policy.checkpoint} cannot be loaded: {err}") from None
    try:
        if cfg.runtime["name"] != "reference":
            policy = make_executor(policy, graph_runtime(cfg.runtime, graph_batch_sizes))
        return make_actor(policy, cfg.prune) if cfg.prune["name"] != "none" else ChunkedActor(policy)
    except (PruneConfigError, RuntimeConfigError) as err:   # settings that do not fit this model
        group = "prune" if isinstance(err, PruneConfigError) else "runtime"
        raise ConfigError(f"{group}={getattr(cfg, group)['name']} does not fit this policy: {err}") from None


def check_prompts(actor: Any, instructions: list[str]) -> None:
    """The policy's tokenizer encodes every instruction and each prompt fits the model's positions."""
    from vla_accel.tokenizer import tokenize_prompt, with_empty_token

    policy = getattr(actor, "policy", None)
    if policy is None or not hasattr(policy, "cfg"):
        return                                   # an actor without a vla_accel Policy (tests' fakes)
    cfg = policy.cfg
    if getattr(policy, "tokenizer", None) is None:
        raise ConfigError("the policy has no tokenizer, so it cannot read the task instructions")
    for text in dict.fromkeys(instructions):
        try:
            ids = tokenize_prompt(policy.tokenizer, text)
        except Exception as err:
            raise ConfigError(f"the policy cannot tokenize the task instruction {text!r}: {err}") from None
        # backbone sequence: prompt (+ the empty token) + patches + proprio + action placeholders + stop
        tokens = len(with_empty_token(ids, cfg.empty_id)) + cfg.num_patch_tokens + cfg.num_action_tokens + 1
        if tokens > cfg.llm.max_positions:
            raise ConfigError(f"the instruction {text!r} makes a sequence of {tokens} tokens; the model has "
                              f"{cfg.llm.max_positions} positions (max_position_embeddings)")


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

    def instruction(self, suite: str, task_id: int) -> str:
        return self._envs.task_instruction(suite, task_id)
