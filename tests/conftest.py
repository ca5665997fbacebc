"""Shared test set-up.

- On a CPU-only machine the CUDA build of torchvision that LIBERO's dependencies install cannot be
  imported; transformers would try to. Hide it for the whole test session (vla_accel/_compat.py).
- Without CUDA, Triton kernels run in its interpreter; Triton reads TRITON_INTERPRET when it is
  first imported, so it is set here, before any test module imports triton.
"""

import os

import torch

from vla_accel._compat import hide_unloadable_torchvision

hide_unloadable_torchvision()
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
