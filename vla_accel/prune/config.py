"""Typed SpecPrune-VLA settings, validated at construction; one YAML of `configs/prune/` fills them.

    cfg = SpecPruneConfig.from_dict(yaml_mapping)           # unknown keys / bad values fail here
    layers = cfg.resolve(num_layers=32, patches_per_image=256, num_images=2)   # model-dependent checks

Layer indices name the layer AFTER which something happens (as in the paper's code): tokens dropped
"after layer 1" never enter layer 2. The paper's indices are for the 32-layer Llama-2-7B. A model of
another depth (the 8-layer tiny test model) needs its own schedule: `layers_for_depth` maps a depth to
the three lists that replace the defaults for that depth; without an entry, indices beyond the
model's depth fail with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vla_accel._config import build_dataclass, to_plain


class PruneConfigError(ValueError):
    """A pruning setting has a value that is not allowed; the message names it and what is allowed."""


def yaml_path(name: str) -> Path:
    """configs/prune/<name>.yaml of the installed package (vla_accel.configs), else of this checkout."""
    try:
        from importlib import resources

        p = Path(str(resources.files("vla_accel.configs") / "prune" / f"{name}.yaml"))
        if p.exists():
            return p
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "configs" / "prune" / f"{name}.yaml"


def _build(cls: type, group: str, values: Mapping[str, Any] | None):
    return build_dataclass(cls, group, values, PruneConfigError)


def _ints(name: str, value: Any, length: int | None = None, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PruneConfigError(f"{name} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise PruneConfigError(f"{name} needs {length} entries (third-person camera, wrist camera), got {list(value)}")
    if any(v < minimum for v in value):
        raise PruneConfigError(f"{name} entries must be >= {minimum}, got {list(value)}")
    return tuple(value)


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise PruneConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PruneConfigError(f"{name} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PruneConfigError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return float(value)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PruneConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _increasing(name: str, layers: tuple[int, ...]) -> None:
    if list(layers) != sorted(set(layers)):
        raise PruneConfigError(f"{name} must be strictly increasing without repeats, got {list(layers)}")


@dataclass
class ChangedConfig:
    """Changed-patch rule: patches that moved between the current frame and an earlier one are kept."""

    enabled: bool = True                 # False: no patch counts as changed (every patch may be dropped)
    sim_threshold: float = 0.986         # cosine similarity of raw 14x14 patches at or above which a patch is static
    max_static: tuple = (200, 200)       # coarse mode: at most this many static patches dropped per camera
    max_static_fine: tuple = (220, 220)  # fine mode: same cap
    gap_min: int = 1                     # frame gap T is clamped to [gap_min, gap_max]; T = 1 compares a frame with itself
    gap_max: int = 6                     # T = min(int(-16/3 * s / 6 + 22/3) + 3, gap_max), s = |summed executed xyz|
    gap_fixed: int | None = None         # a fixed T instead of the adaptive rule (null: adaptive)

    def __post_init__(self) -> None:
        self.max_static = _ints("static.changed.max_static", to_plain(self.max_static), 2)
        self.max_static_fine = _ints("static.changed.max_static_fine", to_plain(self.max_static_fine), 2)
        self.sim_threshold = _number("static.changed.sim_threshold", self.sim_threshold, -1.0, 1.0)
        _int("static.changed.gap_min", self.gap_min, 1)
        _int("static.changed.gap_max", self.gap_max, 1)
        if self.gap_min > self.gap_max:
            raise PruneConfigError(f"static.changed.gap_min ({self.gap_min}) must be <= gap_max ({self.gap_max})")
        if self.gap_fixed is not None:
            _int("static.changed.gap_fixed", self.gap_fixed, 1)


@dataclass
class StaticConfig:
    """Static (action-level) pruning: which visual tokens enter the deep layers."""

    enabled: bool = True                 # False: no static pruning (and no global / changed / local rules)
    layers: tuple = (0, 1)               # local scoring layers; the visual set is cut after each, final after the last
    topk: tuple = (16, 12)               # local rule, coarse mode: top-K visual tokens per camera by prompt attention
    topk_fine: tuple = (25, 19)          # local rule, fine mode
    first_factor: int = 3                # after every scoring layer but the last, keep first_factor * K (refined later)
    query_skip: int = 9                  # prompt tokens after BOS not used as score queries (Llama-2 template "In: ... take to")
    global_topk: tuple = (16, 12)        # global rule: per camera, the previous inference's top tokens (0 = off)
    changed: ChangedConfig = field(default_factory=ChangedConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.changed, ChangedConfig):
            self.changed = _build(ChangedConfig, "static.changed", to_plain(self.changed))
        self.layers = _ints("static.layers", to_plain(self.layers))
        if self.enabled and not self.layers:
            raise PruneConfigError("static.layers must name at least one layer when static.enabled=true")
        _increasing("static.layers", self.layers)
        self.topk = _ints("static.topk", to_plain(self.topk), 2)
        self.topk_fine = _ints("static.topk_fine", to_plain(self.topk_fine), 2)
        self.global_topk = _ints("static.global_topk", to_plain(self.global_topk), 2)
        _int("static.first_factor", self.first_factor, 1)
        _int("static.query_skip", self.query_skip, 0)


@dataclass
class DynamicConfig:
    """Dynamic (layer-level) pruning: fewer visual tokens at a few deeper layers, by running importance."""

    enabled: bool = True                 # False: no layer-level pruning
    layers: tuple = (5, 10, 15, 20, 25)  # after each of these layers keep keep_ratio of the remaining visual tokens
    score_layers: tuple = (0, 1, 12)     # layers whose non-visual -> visual attention updates the importance
    keep_ratio: float = 0.8              # fraction of the remaining visual tokens kept at each dynamic layer
    min_visual: int = 60                 # floor: never fewer visual tokens than this (pruning stops there)
    ema_alpha: float = 0.2               # importance <- importance + ema_alpha * (weight - importance)
    rank_weight_max: float = 10.0        # rank weight of the most attended token of a camera (linear down to ...)
    rank_weight_min: float = 0.1         # ... this weight for the least attended one
    depth_sharpness: float = 10.0        # layer weight sigmoid(depth_sharpness * (num_layers - layer)); ~1 for every layer at 10

    def __post_init__(self) -> None:
        self.layers = _ints("dynamic.layers", to_plain(self.layers))
        self.score_layers = _ints("dynamic.score_layers", to_plain(self.score_layers))
        _increasing("dynamic.layers", self.layers)
        _increasing("dynamic.score_layers", self.score_layers)
        if self.enabled and (not self.layers or not self.score_layers):
            raise PruneConfigError("dynamic.layers and dynamic.score_layers must be non-empty when dynamic.enabled=true")
        self.keep_ratio = _ratio("dynamic.keep_ratio", self.keep_ratio)
        self.ema_alpha = _ratio("dynamic.ema_alpha", self.ema_alpha)
        _int("dynamic.min_visual", self.min_visual, 0)
        self.rank_weight_max = _number("dynamic.rank_weight_max", self.rank_weight_max, 0.0)
        self.rank_weight_min = _number("dynamic.rank_weight_min", self.rank_weight_min, 0.0)
        if self.rank_weight_min > self.rank_weight_max:
            raise PruneConfigError(f"dynamic.rank_weight_min ({self.rank_weight_min}) must be <= rank_weight_max "
                                   f"({self.rank_weight_max})")
        self.depth_sharpness = _number("dynamic.depth_sharpness", self.depth_sharpness, 0.0)


@dataclass
class ControllerConfig:
    """Action-speed controller: coarse vs fine motion from the executed actions (env units)."""

    enabled: bool = True                 # False: always coarse mode, never flush
    fine_speed: float = 0.4              # enter fine when |a[0:3]| < fine_speed, or ...
    fine_xy: float = 0.1                 # ... when |a[0:2]| < fine_xy and
    fine_z: float = 0.1                  #     a[2] < fine_z and
    fine_rot: float = 0.2                #     |a[3:6]| < fine_rot
    coarse_z: float = 0.2                # leave fine when a[2] > coarse_z, or ...
    coarse_rot: float = 0.3              # ... when |a[3:6]| > coarse_rot at a chunk boundary (queue empty)
    warmup_steps: int = 10               # the mode stays coarse for the first warmup_steps executed actions of an episode
    flush_on_fine: bool = True           # coarse -> fine with actions still queued: drop them and re-plan

    def __post_init__(self) -> None:
        for name in ("fine_speed", "fine_xy", "fine_z", "fine_rot", "coarse_z", "coarse_rot"):
            setattr(self, name, _number(f"controller.{name}", getattr(self, name)))
        _int("controller.warmup_steps", self.warmup_steps, 0)


LAYER_LIST_KEYS = ("static_layers", "score_layers", "dynamic_layers")


@dataclass(frozen=True)
class LayerSchedule:
    """The layer lists in force for one model depth (after `layers_for_depth`)."""

    static_layers: tuple[int, ...]
    score_layers: tuple[int, ...]
    dynamic_layers: tuple[int, ...]


@dataclass
class SpecPruneConfig:
    name: str = "specprune"              # label of this setting (file stem of configs/prune/<name>.yaml)
    static: StaticConfig = field(default_factory=StaticConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    layers_for_depth: dict = field(default_factory=dict)  # {depth: {static_layers, score_layers, dynamic_layers}}

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PruneConfigError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.static, StaticConfig):
            self.static = _build(StaticConfig, "static", to_plain(self.static))
        if not isinstance(self.dynamic, DynamicConfig):
            self.dynamic = _build(DynamicConfig, "dynamic", to_plain(self.dynamic))
        if not isinstance(self.controller, ControllerConfig):
            self.controller = _build(ControllerConfig, "controller", to_plain(self.controller))
        table = {}
        for depth, lists in (to_plain(self.layers_for_depth) or {}).items():
            try:
                d = int(depth)
            except (TypeError, ValueError):
                raise PruneConfigError(f"layers_for_depth keys must be model depths (integers), got {depth!r}") from None
            lists = dict(lists or {})
            unknown = sorted(set(lists) - set(LAYER_LIST_KEYS))
            if unknown:
                raise PruneConfigError(f"layers_for_depth.{d} has unknown key(s) {unknown}; allowed: {list(LAYER_LIST_KEYS)}")
            table[d] = {k: _ints(f"layers_for_depth.{d}.{k}", v) for k, v in lists.items()}
        self.layers_for_depth = table

    @staticmethod
    def from_dict(values: Any) -> "SpecPruneConfig":
        """From a YAML mapping (dict or omegaconf node); unknown keys fail with the list of known ones."""
        values = to_plain(values)
        if isinstance(values, SpecPruneConfig):
            return values
        if not isinstance(values, Mapping):
            raise PruneConfigError(f"a prune config must be a mapping, got {type(values).__name__}")
        return _build(SpecPruneConfig, "prune", values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return _lists(d)

    # ------------------------------------------------------------------ model-dependent checks
    def resolve(self, num_layers: int, patches_per_image: int = 256, num_images: int = 2) -> LayerSchedule:
        """The layer schedule for a model of `num_layers` layers; fails on anything that does not fit it."""
        over = self.layers_for_depth.get(num_layers, {})
        sched = LayerSchedule(
            static_layers=tuple(over.get("static_layers", self.static.layers)),
            score_layers=tuple(over.get("score_layers", self.dynamic.score_layers)),
            dynamic_layers=tuple(over.get("dynamic_layers", self.dynamic.layers)),
        )
        if num_images != 2:
            raise PruneConfigError(f"SpecPrune expects 2 cameras (third-person + wrist); this model has {num_images}")
        hint = (f"; this model has {num_layers} layers: give its schedule under layers_for_depth.{num_layers}: "
                f"{{static_layers: [...], score_layers: [...], dynamic_layers: [...]}}")
        last_prunable = num_layers - 2  # dropping tokens after the last layer would change nothing
        checks = []
        if self.static.enabled:
            checks.append(("static_layers", sched.static_layers, last_prunable))
        if self.dynamic.enabled:
            checks += [("dynamic_layers", sched.dynamic_layers, last_prunable),
                       ("score_layers", sched.score_layers, num_layers - 1)]
        for name, layers, top in checks:
            _increasing(name, layers)
            bad = [i for i in layers if i > top]
            if bad:
                why = "" if name == "score_layers" else ": dropping tokens after the last layer changes nothing"
                raise PruneConfigError(f"{name} {list(layers)}: {bad} beyond the model's depth (allowed 0..{top}"
                                       f"{why}){hint}")
        if self.static.enabled and self.dynamic.enabled and sched.dynamic_layers \
                and sched.dynamic_layers[0] <= sched.static_layers[-1]:
            raise PruneConfigError(f"dynamic_layers {list(sched.dynamic_layers)} must all come after the last static "
                                   f"layer {sched.static_layers[-1]}")
        if self.static.enabled:
            f = self.static.first_factor
            multi = len(sched.static_layers) > 1
            for name in ("topk", "topk_fine", "global_topk"):
                ks = getattr(self.static, name)
                big = [k for k in ks if k > patches_per_image]
                if big:
                    raise PruneConfigError(f"static.{name} {list(ks)} is larger than the {patches_per_image} patches "
                                           f"of a camera")
                if multi and name != "global_topk" and any(k * f > patches_per_image for k in ks):
                    raise PruneConfigError(f"static.first_factor * static.{name} = {[k * f for k in ks]} is larger "
                                           f"than the {patches_per_image} patches of a camera")
            for name in ("max_static", "max_static_fine"):
                caps = getattr(self.static.changed, name)
                if any(c > patches_per_image for c in caps):
                    raise PruneConfigError(f"static.changed.{name} {list(caps)} is larger than the "
                                           f"{patches_per_image} patches of a camera")
        if self.dynamic.enabled and self.dynamic.min_visual > num_images * patches_per_image:
            raise PruneConfigError(f"dynamic.min_visual ({self.dynamic.min_visual}) is larger than the "
                                   f"{num_images * patches_per_image} visual tokens")
        return sched


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x
