"""Kernel tests run on CPU through the Triton interpreter when no CUDA device is present.

Triton decides interpreter-or-compiler when a ``@triton.jit`` function is decorated, so
TRITON_INTERPRET must be set before the kernel modules are imported. Another test directory
may already have imported them (collection order is alphabetical); those modules are reloaded
here so their kernels are rebuilt as interpreted functions.
"""
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in sorted(n for n in list(sys.modules) if n.startswith("megapt.kernels.")):
        _mod = sys.modules[_name]
        if _mod is not None and not _name.endswith("._common"):
            importlib.reload(_mod)
