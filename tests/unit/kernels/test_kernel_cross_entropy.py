"""Chunked/fused linear cross-entropy equals full-logits cross-entropy (loss and both grads)."""

import pytest
import torch

from megapt.kernels import cross_entropy  # the module: its WGRAD_SLICE_ELEMENTS is patched
from megapt.kernels.cross_entropy import (
    chunked_linear_cross_entropy,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from tests.unit.kernels.kernel_testing import DEVICE, DTYPES, assert_close_rel_torch

FNS = {"fused": fused_linear_cross_entropy, "chunked": chunked_linear_cross_entropy}


def _data(N=37, C=32, V=200, n_ignored=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) / C**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def _run(fn, hidden, weight, labels, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(h, w, labels, **kw)
    (loss * 3.0).backward()  # grad_output != 1 must scale the stored gradients
    return loss.detach().reshape(1), h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", sorted(FNS))
def test_linear_ce_matches_full_logits(impl, dtype, monkeypatch):
    # V=200 is not a multiple of the kernel block (64 on CPU); chunk 8 leaves a partial last chunk;
    # the half-precision weight-gradient GEMM is split into vocab slices of 7 rows (last partial).
    monkeypatch.setattr(cross_entropy, "WGRAD_SLICE_ELEMENTS", 7 * 32)
    hidden, weight, labels = _data()
    ref = _run(fused_linear_cross_entropy_ref, hidden.double(), weight.double(), labels)
    low = _run(fused_linear_cross_entropy_ref, hidden.to(dtype), weight.to(dtype), labels)
    for chunk_size in (8, None):
        out = _run(FNS[impl], hidden.to(dtype), weight.to(dtype), labels, chunk_size=chunk_size)
        for name, o, r, lo in zip(("loss", "dhidden", "dweight"), out, ref, low):
            assert_close_rel_torch(f"{impl} {name} {dtype} chunk={chunk_size}", o, r, lo)
        assert out[1].dtype == dtype and out[2].dtype == dtype


def test_ref_is_torch_cross_entropy_mean():
    hidden, weight, labels = _data()
    logits = hidden @ weight.t()
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    torch.testing.assert_close(fused_linear_cross_entropy_ref(hidden, weight, labels), expected)


@pytest.mark.parametrize("impl", sorted(FNS))
def test_linear_ce_ignored_rows_get_no_gradient_and_all_ignored_is_zero(impl):
    hidden, weight, labels = _data(N=12, n_ignored=4)
    _, gh, _ = _run(FNS[impl], hidden, weight, labels, chunk_size=5)
    assert torch.all(gh[labels == -100] == 0)
    assert torch.all(gh[labels != -100].abs().sum(-1) > 0)
    all_ignored = torch.full_like(labels, -100)
    loss, gh, gw = _run(FNS[impl], hidden, weight, all_ignored)
    assert loss.item() == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("impl", sorted(FNS))
def test_linear_ce_without_grad_gives_the_same_loss(impl):
    hidden, weight, labels = _data()
    with torch.no_grad():
        loss = FNS[impl](hidden, weight, labels, chunk_size=16)
    torch.testing.assert_close(loss, fused_linear_cross_entropy_ref(hidden, weight, labels))


@pytest.mark.parametrize("impl", sorted(FNS))
def test_linear_ce_bad_input_is_a_clear_error(impl):
    hidden, weight, labels = _data(N=6, V=10)
    bad = labels.clone()
    bad[0] = 10
    with pytest.raises(ValueError, match="outside"):
        FNS[impl](hidden, weight, bad)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        FNS[impl](hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="weight is"):
        FNS[impl](hidden, weight.half(), labels)


def test_chunked_linear_ce_passes_fp64_gradcheck():
    # The pure-PyTorch path also serves fp64 gradient checks of the model.
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (9,), generator=g)
    y[2] = -100
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_linear_cross_entropy(h, w, y, chunk_size=4), (h, w)
    )
