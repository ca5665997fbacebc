"""Typed settings of `vla-accel-eval`, built from the Hydra config and validated at construction.

The YAML files in `vla_accel/configs/{policy,env,eval}/` fill these dataclasses; every field is
documented here and in the YAML. `prune` and `runtime` stay open mappings (their engineers own
the fields); only their `name` is read here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vla_accel._config import build_dataclass


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message names the setting and the choices."""


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _build(cls: type, group: str, values: Mapping[str, Any] | None):
    """Dataclass from a mapping; unknown keys fail with the list of known ones."""
    return build_dataclass(cls, group, values, ConfigError)


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_int_list(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name} must be null or a list of integers, e.g. {name}=[0,1,2]; got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{name} lists an index twice: {list(value)}")


@dataclass
class PolicyConfig:
    name: str = "random_tiny"            # label of this policy setting (shown in results)
    random: bool = True                  # True: build the real architecture at a small size with random weights (no download)
    preset: str = "tiny"                 # size preset of the random policy (see vla_accel.random_policy)
    checkpoint: str | None = None        # local checkpoint dir or Hugging Face hub id (used when random=false)
    unnorm_key: str | None = None        # dataset_statistics key for action un-normalization; null: the selected suite when only one is selected, else the loader's default
    device: str = "auto"                 # auto | cpu | cuda | cuda:N   (auto: cuda if available, else cpu)
    dtype: str = "auto"                  # auto | float32 | bfloat16 | float16   (auto: bfloat16 on cuda, float32 on cpu)
    seed: int = 0                        # seed of the random weights (random=true only)
    url: str | None = None               # policy=remote: the vla-accel-serve websocket address, ws://host:port

    def __post_init__(self) -> None:
        if self.name == "remote":
            if not self.url:
                raise ConfigError("policy.url is required with policy=remote, e.g. policy.url=ws://gpu-host:8777")
            return
        if not _DEVICE_RE.match(str(self.device)):
            raise ConfigError(f"policy.device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"policy.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not self.random and not self.checkpoint:
            raise ConfigError("policy.checkpoint is required when policy.random=false: give a local "
                              "checkpoint directory or a hub id, e.g. policy=checkpoint "
                              "policy.checkpoint=moojink/openvla-7b-oft-finetuned-libero-spatial")
        _check_int("policy.seed", self.seed)


@dataclass
class EnvConfig:
    name: str = "libero"                 # simulator family (only libero exists)
    image_size: int = 256                # camera height = width in pixels (the paper: 256)
    assets_path: str | None = None       # LIBERO asset folder; null: the env var named by vla_accel.envs.ASSETS_ENV_VAR, else LIBERO's default
    settle_steps: int = 10               # no-op steps at episode start (not counted in max steps)
    max_steps: int | None = None         # cap on policy steps per episode; null: the suite's protocol value (220/280/300/520/400)
    fault_step: int | None = None        # TESTING ONLY: the env raises at this step of the episodes listed in fault_episodes (not part of the run identity)
    fault_episodes: list[int] = field(default_factory=list)  # TESTING ONLY: episode indices that fault at fault_step

    def __post_init__(self) -> None:
        if self.name != "libero":
            raise ConfigError(f"env.name must be 'libero' (the only simulator wired here); got {self.name!r}")
        _check_int("env.image_size", self.image_size, 16)
        _check_int("env.settle_steps", self.settle_steps, 0)
        if self.max_steps is not None:
            _check_int("env.max_steps", self.max_steps, 1)
        if self.fault_step is not None:
            _check_int("env.fault_step", self.fault_step, 0)
        _check_int_list("env.fault_episodes", list(self.fault_episodes))
        self.fault_episodes = list(self.fault_episodes)


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["libero_spatial"])  # LIBERO suites to evaluate
    task_ids: list[int] | None = None    # task indices within each suite; null: all tasks of each suite
    episodes: list[int] | None = None    # episode indices (= official init states); null: see num_episodes
    num_episodes: int | None = None      # first N init states per task when episodes is null; null: all (50)
    num_envs: int = 1                    # simulators stepped in parallel (one subprocess each)
    seed: int = 0                        # seed passed to every episode's reset (same for all, as in the protocol)
    shard: int = 0                       # this process evaluates shard `shard` of `num_shards` (disjoint, deterministic)
    num_shards: int = 1                  # number of shards the selection is split into
    video: bool = False                  # write one MP4 per episode (agentview | wrist) into <run dir>/videos
    video_fps: int = 20                  # frames per second of the videos
    record_trace: str | None = None      # save what the rollout saw: *.npz = first episode to that file; else a folder, one .npz per episode
    warmup_chunks: int = 2               # first N policy calls of the process are excluded from latency statistics
    resume: bool = True                  # skip episodes already in <run dir>/results.jsonl
    retry_errors: bool = False           # with resume: run again the episodes recorded with an error
    progress: bool = True                # tqdm progress bars
    pin_gpu_by_job: bool = True          # under submitit_local with several visible GPUs: job k keeps only GPU (k mod #GPUs)
    render_threads: int | None = None    # Mesa llvmpipe (CPU EGL) threads per simulator (LP_NUM_THREADS); null: Mesa's default; GPU EGL ignores it
    max_consecutive_errors: int = 10     # stop the run after this many episodes in a row end with an error (0: never)
    step_timeout_s: float = 900.0        # a simulator worker silent this long in a reset or step is stopped (terminate, kill) and replaced; its episode runs again (start-up: at least 120 s)
    worker_context: str = "spawn"        # multiprocessing start method of the simulator workers: spawn | forkserver
    precapture_steps: int = 3            # runtime=accel: forwards per batch size 1..num_envs on made-up frames before the first timed chunk, while the simulators start (graph captures, compilation); 0 = none
    gpu_sample_s: float = 0.5            # CUDA policies: GPU utilisation sampled every this many seconds during the rollout; 0 = not sampled
    report: bool = True                  # write <run dir>/report.png (matplotlib) at the end of the run
    prepare_in_workers: bool = False     # the policy's image pre-processing (JPEG round trip, resize, crop) in the simulator workers for the observations it will use, instead of serially in the main process; results are identical (off until measured on the GPU machine)

    def __post_init__(self) -> None:
        if isinstance(self.suites, str):
            self.suites = [self.suites]
        if not self.suites or not all(isinstance(s, str) for s in self.suites):
            raise ConfigError(f"eval.suites must be a non-empty list of suite names; got {self.suites!r}")
        if len(set(self.suites)) != len(self.suites):
            raise ConfigError(f"eval.suites lists a suite twice: {list(self.suites)}")
        self.suites = list(self.suites)
        _check_int_list("eval.task_ids", self.task_ids)
        _check_int_list("eval.episodes", self.episodes)
        self.task_ids = None if self.task_ids is None else list(self.task_ids)
        self.episodes = None if self.episodes is None else list(self.episodes)
        if self.num_episodes is not None:
            _check_int("eval.num_episodes", self.num_episodes, 1)
            if self.episodes is not None:
                raise ConfigError("set either eval.episodes (explicit indices) or eval.num_episodes "
                                  "(first N), not both")
        _check_int("eval.num_envs", self.num_envs, 1)
        _check_int("eval.seed", self.seed)
        _check_int("eval.num_shards", self.num_shards, 1)
        _check_int("eval.shard", self.shard, 0)
        if self.shard >= self.num_shards:
            raise ConfigError(f"eval.shard must be in 0..{self.num_shards - 1} (eval.num_shards="
                              f"{self.num_shards}); got {self.shard}")
        _check_int("eval.video_fps", self.video_fps, 1)
        _check_int("eval.warmup_chunks", self.warmup_chunks, 0)
        _check_int("eval.max_consecutive_errors", self.max_consecutive_errors, 0)
        if self.render_threads is not None:
            _check_int("eval.render_threads", self.render_threads, 1)
        if not (isinstance(self.step_timeout_s, (int, float)) and self.step_timeout_s > 0):
            raise ConfigError(f"eval.step_timeout_s must be a positive number; got {self.step_timeout_s!r}")
        _check_int("eval.precapture_steps", self.precapture_steps, 0)
        if not (isinstance(self.gpu_sample_s, (int, float)) and not isinstance(self.gpu_sample_s, bool)
                and self.gpu_sample_s >= 0):
            raise ConfigError(f"eval.gpu_sample_s must be a number >= 0 (0: not sampled); got {self.gpu_sample_s!r}")
        for name in ("report", "prepare_in_workers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"eval.{name} must be true or false; got {getattr(self, name)!r}")
        if self.worker_context not in ("spawn", "forkserver"):
            raise ConfigError("eval.worker_context must be spawn or forkserver (EGL rendering does not "
                              f"survive fork); got {self.worker_context!r}")


@dataclass
class RunConfig:
    policy: PolicyConfig
    env: EnvConfig
    eval: EvalConfig
    prune: dict[str, Any]                # open mapping owned by vla_accel.prune; `name: none` = no pruning
    runtime: dict[str, Any]              # open mapping owned by vla_accel.runtime; `name: reference` = plain PyTorch

    def fingerprint_fields(self, selection: list, policy: dict[str, Any]) -> dict[str, Any]:
        """The evaluation's identity: what decides its results, not where or how it ran.

        policy: the policy's identity (factory.policy_identity: weights, resolved dtype, statistics
        key). Left out on purpose: policy.device (the device index does not change results),
        eval.num_envs and the other scheduling fields, env.assets_path (the same assets mounted
        elsewhere), the testing-only env.fault_* fields and the labels (policy.name).
        """
        env = dataclasses.asdict(self.env)
        return {
            "policy": policy,
            "env": {k: env[k] for k in ("name", "image_size", "settle_steps", "max_steps")},
            "prune": self.prune,
            "runtime": self.runtime,
            "seed": self.eval.seed,
            "num_shards": self.eval.num_shards,
            "selection": [list(k) for k in selection],
        }


def fingerprint(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flat(fields: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(fields, dict):
        return {prefix: fields}
    out: dict[str, Any] = {}
    for k, v in fields.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field: <value before> -> <value now>' for every field of two identities that differs."""
    a, b = _flat(before), _flat(now)
    lines = []
    for k in sorted(set(a) | set(b)):
        old, new = a.get(k, "(not set)"), b.get(k, "(not set)")
        if old == new:
            continue
        if k == "selection" and isinstance(old, list) and isinstance(new, list):
            lines.append(f"selection: {len(old)} episodes -> {len(new)} episodes")
        else:
            lines.append(f"{k}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return lines


def _group(cfg: DictConfig, name: str) -> dict[str, Any]:
    if name not in cfg or cfg[name] is None:
        raise ConfigError(f"the config has no '{name}' group; pick one, e.g. {name}=<choice>")
    try:
        value = OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{name}.{err.key} must be set on the command line ({name}.{err.key}=...); "
                          f"the chosen {name} config has no default for it") from None
    if not isinstance(value, dict):
        raise ConfigError(f"config group '{name}' must be a mapping, got {value!r}")
    return value


def run_config_from_hydra(cfg: DictConfig) -> RunConfig:
    """Validated typed settings from the composed Hydra config."""
    prune = _group(cfg, "prune")
    runtime = _group(cfg, "runtime")
    for group, value in (("prune", prune), ("runtime", runtime)):
        if not isinstance(value.get("name"), str):
            raise ConfigError(f"{group}.name must be set (e.g. {group}=none / {group}=reference)")
    return RunConfig(
        policy=_build(PolicyConfig, "policy", _group(cfg, "policy")),
        env=_build(EnvConfig, "env", _group(cfg, "env")),
        eval=_build(EvalConfig, "eval", _group(cfg, "eval")),
        prune=prune,
        runtime=runtime,
    )
