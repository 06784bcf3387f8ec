"""Evaluation: metrics against hand-computed values, perplexity over text windows, int8
weight-only quantization error bounds, and `megapt eval` writing its JSON."""

import json
import math

import pytest
import torch

from megapt.eval.evaluate import perplexity, text_windows
from megapt.model.gpt import GPT, ModelArgs
from megapt.model.ops import Backends
from megapt.quantize import Int8Linear, quantize_int8, quantize_per_channel
from megapt.tasks.metrics import classification_metrics, majority_baseline

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")


def test_classification_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: a: P=1, R=2/3 -> 0.8; b: P=1/2, R=1/2 -> 0.5; c: P=1/2, R=1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert majority_baseline([1, 1, 0], [1, 0, 0, 0])["accuracy"] == 0.25


def test_per_channel_int8_roundtrip_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scale
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all(
        (q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7
    )  # half a step per row
    assert torch.allclose(s, w.abs().amax(1) / 127)
    lin = torch.nn.Linear(40, 16, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(3, 40)
    torch.testing.assert_close(Int8Linear(lin)(x), lin(x), atol=0.05, rtol=0.02)


def _model(vocab=64):
    args = ModelArgs(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        vocab_size=vocab,
        max_seq_len=32,
    )
    return GPT(args, EAGER, seed=0)


def test_perplexity_is_token_weighted_and_int8_close():
    torch.manual_seed(0)
    model = _model()
    ids = torch.randint(0, 64, (4, 9))
    labels = ids.clone()
    labels[0, :5] = -100
    batches = [
        {"input_ids": ids[:2], "labels": labels[:2]},
        {"input_ids": ids[2:], "labels": labels[2:]},
    ]
    res = perplexity(model, batches)
    with torch.no_grad():
        logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    assert res["tokens"] == 4 * 9 - 5
    assert res["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(float(ref)), rel=1e-5)
    names = quantize_int8(model)
    assert len(names) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per block + output
    q = perplexity(model, batches)
    assert q["loss"] != res["loss"] and abs(q["loss"] - res["loss"]) < 0.01


class _Tok:
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 60 + 1 for c in text]


def test_text_windows_cover_the_stream(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefghij" * 3)
    batches = text_windows(_Tok(), [str(f)], seq_len=7, batch_size=2)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape == (3, 7)  # 31 tokens (30 + EOS) -> 3 windows of 8
    stream = _Tok().encode("abcdefghij" * 3) + [0]
    assert batches[0]["input_ids"][0].tolist() == stream[:7]
    assert batches[0]["labels"][0].tolist() == stream[1:8]
    assert batches[1]["input_ids"][0].tolist() == stream[16:23]


def test_eval_cli_text_int8_writes_json(tmp_path):
    from megapt.cli import main
    from megapt.config import load_config
    from megapt.data.tokenizer import train_tokenizer
    from megapt.weights.source import save_weights

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20
    cfg = load_config(overrides=["--tokenizer.vocab_size=300"])
    tok = train_tokenizer(cfg.tokenizer, [text], tmp_path / "spm.model")
    model = _model(tok.vocab_size)
    save_weights(tmp_path / "w", model, model.args, tmp_path / "spm.model")
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            "--from",
            str(tmp_path / "w"),
            "--text",
            str(tmp_path / "t.txt"),
            "--int8",
            "--seq-len",
            "16",
            "--out",
            str(out),
            f"--run.out_dir={tmp_path}",
            "--logging.tensorboard=false",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())["lm"]
    assert res["fp32"]["tokens"] > 100 and res["int8"]["tokens"] == res["fp32"]["tokens"]
    assert 0.98 < res["int8_cost"]["ppl_ratio"] < 1.02
    assert res["int8_cost"]["weight_bytes_int8"] < res["int8_cost"]["weight_bytes_fp32"]
