"""Fused RMSNorm matches the plain-PyTorch reference in output, dx and dweight."""

import pytest
import torch

from megapt.kernels.rms_norm import rms_norm, rms_norm_ref
from tests.unit.kernels.kernel_testing import DEVICE, DTYPES, assert_close_rel_torch


def _torch_lowp(x, w, eps):
    """RMSNorm computed entirely at the input dtype by PyTorch (the error we compare against)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd * w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 123), (7, 64), (3, 1, 257)])
def test_rms_norm_forward_and_grads(shape, dtype):
    torch.manual_seed(0)
    eps = 1e-5
    x32 = torch.randn(shape, device=DEVICE)
    w32 = 1.0 + 0.1 * torch.randn(shape[-1], device=DEVICE)
    dy32 = torch.randn(shape, device=DEVICE)

    def run(fn, x, w, dy):
        x = x.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = fn(x, w, eps)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    ref = run(rms_norm_ref, x32.double(), w32.double(), dy32.double())
    low = run(_torch_lowp, x32.to(dtype), w32.to(dtype), dy32.to(dtype))
    out = run(rms_norm, x32.to(dtype), w32.to(dtype), dy32.to(dtype))
    for name, o, r, lo in zip(("y", "dx", "dw"), out, ref, low):
        assert o.dtype == dtype
        assert_close_rel_torch(f"{name} {shape} {dtype}", o, r, lo)


def test_rms_norm_weight_grad_sums_over_all_rows():
    # 37 rows split over several programs: every row must reach dW exactly once.
    torch.manual_seed(1)
    x = torch.randn(37, 24, device=DEVICE)
    w = torch.ones(24, device=DEVICE, requires_grad=True)
    rms_norm(x, w).sum().backward()
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).sum(0)
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_bad_input_is_a_clear_error():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(x, torch.ones(15, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.double(), torch.ones(16, device=DEVICE, dtype=torch.float64))


def test_rms_norm_uses_hf_llama_casting():
    # HF LlamaRMSNorm (and the model's eager path): normalise in fp32, round to the input dtype,
    # then multiply by the weight. Same result up to one rounding step of the fp32 statistics.
    torch.manual_seed(2)
    x = (3 * torch.randn(6, 40, device=DEVICE)).half()
    w = (1 + 0.5 * torch.randn(40, device=DEVICE)).half()
    xf = x.float()
    hf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).half() * w
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, hf, rtol=2**-9, atol=1e-4)
    # single rounding of x*rstd*w would differ from HF in ~1/4 of the elements
    assert (out != hf).float().mean().item() < 0.05
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-5), hf, rtol=0, atol=0)
