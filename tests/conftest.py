"""Shared test set-up.

On a CPU-only machine the CUDA build of torchvision that LIBERO's dependencies install cannot be
imported; transformers would try to. Hide it for the whole test session (see vla_accel/_compat.py).
"""

from vla_accel._compat import hide_unloadable_torchvision

hide_unloadable_torchvision()
