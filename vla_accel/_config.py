"""Helpers shared by the typed configs (eval, prune, runtime): plain containers, strict dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def to_plain(values: Any) -> Any:
    """omegaconf nodes -> plain python containers (dicts / lists) without importing omegaconf eagerly."""
    if hasattr(values, "_metadata"):  # an omegaconf DictConfig / ListConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(values, resolve=True)
    return values


def build_dataclass(cls: type, group: str, values: Mapping[str, Any] | None, error: type[Exception] = ValueError):
    """`cls(**values)`; unknown keys fail with `error` naming them and listing the known ones."""
    values = dict(to_plain(values) or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"unknown setting(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                    f"known {group} settings: {', '.join(known)}")
    return cls(**values)
