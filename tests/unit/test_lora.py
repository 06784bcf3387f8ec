"""LoRA: adapters start as a no-op, only adapters train, and merging gives the same outputs."""

import pytest
import torch

from megapt.model.gpt import GPT, ModelArgs
from megapt.model.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from megapt.model.ops import Backends

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")


def _model():
    args = ModelArgs(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        vocab_size=40,
        max_seq_len=16,
    )
    return GPT(args, EAGER, seed=0)


def test_lora_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = _model()
    ids = torch.randint(0, 40, (3, 10))
    with torch.no_grad():
        base_logits = model(ids).logits
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = apply_lora(model, rank=4, alpha=8, targets=["wq", "wv", "w2"])
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():  # B = 0 at start: same function as the base model
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), n  # base weights untouched
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapters learned something
    assert set(lora_state_dict(model)) == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert merge_lora(model) == 6
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(dict(model.named_parameters())) == set(base)  # plain model names again
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unknown_target_names_the_linear_layers():
    with pytest.raises(ValueError, match="matched no Linear layer.*wq"):
        apply_lora(_model(), 2, 4, ["q_proj"])
