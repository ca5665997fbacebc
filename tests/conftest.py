"""Shared test set-up.

- On a CPU-only machine the CUDA build of torchvision that LIBERO's dependencies install cannot be
  imported; transformers would try to. Hide it for the whole test session (vla_accel/_compat.py).
- Without CUDA, Triton kernels run in its interpreter; Triton reads TRITON_INTERPRET when it is
  first imported, so it is set here, before any test module imports triton.
- `published_keys`: the published 7B checkpoint's tensor names and shapes (tests/fixtures/).
"""

import os
from pathlib import Path

import pytest
import torch

from vla_accel._compat import hide_unloadable_torchvision

hide_unloadable_torchvision()
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def published_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """tests/fixtures/oft_7b_keys.txt as {file section: {tensor name: shape}} (fixtures/README.md: its sources)."""
    out, section = {}, None
    for line in (FIXTURES / "oft_7b_keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
        else:
            name, shape = line.split()
            section[name] = tuple(int(v) for v in shape.split(","))
    return out
