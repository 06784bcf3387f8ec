"""``megapt.kernels.cuda``: operations with a CUDA C++ extension backend (RMSNorm).

The model's ``cuda`` backend looks kernels up here by name; the extension itself builds on the
first call (see cuda_ext.py).
"""

from .cuda_ext import extension_available, load_extension, rms_norm, rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref", "load_extension", "extension_available"]
