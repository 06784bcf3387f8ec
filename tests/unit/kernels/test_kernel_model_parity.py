"""The GPT model with every op on the Triton kernels trains like the eager model (loss and grads).

Runs the kernels through the interpreter on CPU (fp32, one tiny layer): the calling conventions
of megapt.model.ops (shapes, strides, cos/sin tables, ignore_index) are exercised end to end.
"""
import torch

from kernel_testing import DEVICE
from megapt.model.gpt import GPT, ModelArgs
from megapt.model.ops import Backends


def _loss_and_grads(backends):
    torch.manual_seed(0)
    args = ModelArgs(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=100,
                     max_seq_len=32)
    model = GPT(args, backends).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 100, (2, 13), generator=g).to(DEVICE)
    y = torch.randint(0, 100, (2, 13), generator=g).to(DEVICE)
    y[0, :4] = -100
    out = model(x, labels=y)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gpt_with_triton_backends_matches_eager():
    eager = _loss_and_grads(Backends(attention="eager", norm="eager", rope="eager", loss="eager"))
    fused = _loss_and_grads(Backends(attention="triton", norm="triton", rope="triton", loss="triton"))
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-5)
    assert set(fused[1]) == set(eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
