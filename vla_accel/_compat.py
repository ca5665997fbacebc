"""Environment quirks handled in one place.

A CPU-only torch next to a CUDA build of torchvision (PyPI's default wheel, pulled in by LIBERO's
robomimic dependency) cannot be imported: `operator torchvision::nms does not exist`. transformers
imports torchvision whenever it finds it installed, so on such a machine we hide it from
transformers before importing it. Nothing in vla_accel itself uses torchvision.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import torch


def torchvision_unloadable() -> bool:
    """True when torchvision is installed as a CUDA build but torch is a CPU build."""
    if "torchvision" in sys.modules or torch.version.cuda is not None:
        return False
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "+cpu" not in version


def hide_unloadable_torchvision() -> None:
    if torchvision_unloadable():
        sys.modules["torchvision"] = None  # find_spec() now says "not installed"
