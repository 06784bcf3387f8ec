"""FLOPs per token, MFU and HFU (PaLM appendix B), and robust summary statistics.

Model FLOPs per trained token (forward + backward, matmuls only):

    model_flops    = 6 N + 12 L H Q T
    hardware_flops = model_flops                     (no activation checkpointing)
                   = 8 N + 16 L H Q T                (full activation checkpointing: one extra forward,
                                                      2 N + 4 L H Q T, is recomputed in backward)

N = parameters that take part in matmuls: every parameter except the input embedding table when it
is not tied to the output head (a lookup costs no FLOPs; the output head's matmul does).
L layers, H query heads, Q head dim, T sequence length. Causal masking is ignored (full T), as in
PaLM. MFU = tokens/s per device x model_flops / peak FLOP/s per device; HFU uses hardware_flops.
Only real tokens (label != -100) count.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Optional

MFU_FORMULA = ("MFU = tokens_per_s_per_device * (6*N + 12*L*H*Q*T) / peak_flops_per_device; "
               "N = matmul parameters (all except an untied input embedding), L layers, H query heads, "
               "Q head dim, T sequence length (PaLM, Chowdhery et al. 2022, appendix B)")
HFU_FORMULA = ("HFU = tokens_per_s_per_device * hardware_flops / peak; hardware_flops = 6*N + 12*L*H*Q*T "
               "without activation checkpointing, 8*N + 16*L*H*Q*T with it (the forward is recomputed)")
TOKENS_FORMULA = ("tokens/s = real tokens (label != -100) in an optimizer step (micro_batch x grad_accum "
                  "x seq_len per rank when nothing is padded) / step wall time; total = sum over ranks")


def model_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> int:
    """PaLM: 6N + 12 L H Q T (forward + backward)."""
    return 6 * n_params + 12 * n_layers * n_heads * head_dim * seq_len


def hardware_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int,
                             recompute: bool) -> int:
    """Model FLOPs plus the recomputed forward (2N + 4 L H Q T) under activation checkpointing."""
    extra = (2 * n_params + 4 * n_layers * n_heads * head_dim * seq_len) if recompute else 0
    return model_flops_per_token(n_params, n_layers, n_heads, head_dim, seq_len) + extra


def utilization(tokens_per_s_per_device: float, flops_per_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Fraction of peak (0..1); None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak_tflops * 1e12)


def matmul_params(model) -> int:
    """N for the formula: parameters of a torch module minus an untied input embedding table."""
    params = {id(p): p for p in model.parameters()}  # shared (tied) tensors counted once
    n = sum(p.numel() for p in params.values())
    emb = getattr(model, "tok_embeddings", None)
    if emb is None and hasattr(model, "get_input_embeddings"):  # Hugging Face models
        emb = model.get_input_embeddings()
    out = getattr(model, "output", None)
    if out is None and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
    if emb is not None and out is not None and emb.weight is not out.weight:
        n -= emb.weight.numel()
    return n


def summarize(values: Iterable[float]) -> dict:
    """median, quartiles (IQR), min, max, mean, n of a sample; empty sample -> n=0 and Nones."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "min": None, "max": None, "mean": None}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs)}
