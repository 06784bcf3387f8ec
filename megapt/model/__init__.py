"""megapt.model: the transformer (gpt.py) and its backend-dispatched operations (ops.py)."""

from megapt.model.gpt import GPT, PRESETS, KVCache, ModelArgs, ModelOutput
from megapt.model.ops import Backends, select_backends

__all__ = ["GPT", "PRESETS", "KVCache", "ModelArgs", "ModelOutput", "Backends", "select_backends"]
