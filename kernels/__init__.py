"""Fused kernels (Triton, optional CUDA), each beside a plain-PyTorch reference.

Installed as ``megapt.kernels``. Names resolve lazily, so ``import megapt.kernels`` does not
import triton, and ``chunked_linear_cross_entropy`` (pure PyTorch) works without it.

    flash_attention(q, k, v, causal=True, sm_scale=None, doc_start=None)
                                                           q (B, nh, T, hs), k/v (B, nkv, T, hs),
                                                           doc_start (B, T): packed documents
    doc_start_from_ids(input_ids, eos_id)                  (B, T) ids -> doc_start (B, T) int32
    rms_norm(x, weight, eps)                               x (..., C)
    apply_rope(q, k, cos, sin)                             q (B, T, nh, hs), cos/sin (T or B, T, hs // 2)
    fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None)
    chunked_linear_cross_entropy(...)                      same API, pure PyTorch (any device)

The CUDA-extension RMSNorm lives in ``megapt.kernels.cuda`` (built on first use).
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types


def _step_aside() -> None:
    """Imported as top-level ``kernels`` (the repository root is on sys.path, e.g. ``python -m``
    or pytest run from a checkout), this folder would shadow the PyPI package ``kernels`` that
    transformers >= 5.25 requires and imports (``from kernels import CUDAProperties``). Put that
    package in our place when it is installed; without it, stay (nothing imports the name)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(__name__, rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # what `import kernels` returns once this file has run
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _step_aside()  # if it did, the rest of this file defines names nobody will look up

_EXPORTS = {
    "flash_attention": "flash_attn",
    "flash_attention_ref": "flash_attn",
    "doc_start_from_ids": "flash_attn",
    "rms_norm": "rms_norm",
    "rms_norm_ref": "rms_norm",
    "apply_rope": "rope",
    "apply_rope_": "rope",
    "apply_rope_ref": "rope",
    "fused_linear_cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy_ref": "cross_entropy",
    "chunked_linear_cross_entropy": "cross_entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _KernelsPackage(types.ModuleType):
    """``rms_norm`` is both a submodule and a function. Importing a submodule makes the import
    system set the package attribute of that name to the module; refuse that for exported
    names so ``megapt.kernels.rms_norm`` stays the function (the module is in sys.modules)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_module = sys.modules.get(__name__)
if _module is not None and _module.__dict__ is globals():  # not when the PyPI package took over
    _module.__class__ = _KernelsPackage
