"""HF Llama export/import: transformers loads our export unchanged and gives the same logits,
and a random HF LlamaForCausalLM imported into megapt gives the same logits (fp32)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megapt.model.gpt import GPT, ModelArgs  # noqa: E402
from megapt.model.ops import Backends  # noqa: E402
from megapt.weights.hf import ExportError, export_hf, load_hf  # noqa: E402

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")


def tiny_args(**kw):
    base = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        vocab_size=101,
        max_seq_len=32,
        rope_theta=500.0,
        norm_eps=1e-5,
    )
    base.update(kw)
    return ModelArgs(**base)


def _ids(vocab, B=2, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    torch.manual_seed(0)
    args = tiny_args(tie_embeddings=tie)
    model = GPT(args, EAGER, seed=3).eval()
    with torch.no_grad():  # non-trivial norm gains so a swapped norm mapping would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = export_hf(model, args, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), torch_dtype=torch.float32
    ).eval()
    ids = _ids(args.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_random_hf_llama_imports_with_same_logits(tmp_path, tie):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=40,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, args = load_hf(tmp_path / "hf")
    model.set_backends(EAGER)
    model.eval()
    assert (args.n_layers, args.d_model, args.n_heads, args.n_kv_heads, args.tie_embeddings) == (
        2,
        48,
        6,
        2,
        tie,
    )
    ids = _ids(97, T=17, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_import_shape_mismatch_names_the_tensor(tmp_path):
    args = tiny_args()
    export_hf(GPT(args, EAGER), args, tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 128  # config now disagrees with the saved mlp weights
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        ExportError, match=r"layers\.0\.feed_forward\.w1\.weight.*\(96, 64\).*\(128, 64\)"
    ):
        load_hf(tmp_path / "hf")


def test_unsupported_config_is_named(tmp_path):
    args = tiny_args()
    export_hf(GPT(args, EAGER), args, tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = "gelu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="hidden_act"):
        load_hf(tmp_path / "hf")


def test_exported_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path):
    from megapt.config import load_config
    from megapt.data.tokenizer import train_tokenizer

    text = (
        "def add(a, b):\n    return a + b\n\n\nclass Point:\n\tx = 1  # tab\n    y = 2\n"
        "print('héllo wörld', 3.14159)\n"
    ) * 30
    cfg = load_config(overrides=["--tokenizer.vocab_size=320"])
    tok = train_tokenizer(cfg.tokenizer, [text], tmp_path / "spm.model")
    args = tiny_args(vocab_size=tok.vocab_size)
    export_hf(GPT(args, EAGER), args, tmp_path / "hf", tokenizer_path=tmp_path / "spm.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for s in [
        "def add(a, b):\n    return a + b\n",
        "  leading spaces\n\n\nx\t=\t1",
        "héllo 3.14 <|endoftext|>",
    ]:
        assert hf_tok(s)["input_ids"] == tok.encode(s), s
        assert hf_tok.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["eos_token_id"] == tok.eos_id and cfg_json["pad_token_id"] == tok.pad_id


def test_cli_export_roundtrip_hf_and_back(tmp_path, capsys):
    from megapt.cli import main
    from megapt.config import load_config
    from megapt.data.tokenizer import train_tokenizer
    from megapt.weights.source import load_source, save_weights

    cfg = load_config(overrides=["--tokenizer.vocab_size=300"])
    train_tokenizer(cfg.tokenizer, ["def f(x):\n    return x * 2\n" * 50], tmp_path / "spm.model")
    args = tiny_args(vocab_size=300, tie_embeddings=True)
    model = GPT(args, EAGER, seed=9)
    save_weights(tmp_path / "w", model, args, tmp_path / "spm.model")
    common = [f"--run.out_dir={tmp_path}", "--logging.tensorboard=false"]
    assert (
        main(
            [
                "export",
                "--format",
                "hf",
                "--from",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path / "hf"),
                *common,
            ]
        )
        == 0
    )
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    assert (
        main(
            [
                "export",
                "--format",
                "megapt",
                "--from",
                str(tmp_path / "hf"),
                "--out",
                str(tmp_path / "back"),
                *common,
            ]
        )
        == 0
    )
    back = load_source(load_config(overrides=common), str(tmp_path / "back"))
    assert back.args == args
    for (n, p), (_, q) in zip(model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(p, q), n
    assert "wrote Hugging Face LlamaForCausalLM folder" in capsys.readouterr().out


def test_tokenizer_without_pad_token_is_named(tmp_path):
    import sentencepiece as spm

    from megapt.weights.hf import write_hf_tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["def f(x): return x\n"] * 200),
        model_prefix=str(tmp_path / "nopad"),
        vocab_size=300,
        byte_fallback=True,
        user_defined_symbols=["<|endoftext|>"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match=r"no pad token '<\|pad\|>'"):
        write_hf_tokenizer(
            tmp_path / "nopad.model", tmp_path / "out", "<|endoftext|>", "<|pad|>", 32
        )


@pytest.fixture()
def hf_dir(tmp_path):
    args = tiny_args()
    export_hf(GPT(args, EAGER, seed=3), args, tmp_path / "hf")
    return tmp_path / "hf"


# HF configs megapt cannot represent: each is refused by `megapt export --format megapt` with the
# model-error exit code (4) and one line naming the key, never a traceback
UNSUPPORTED = [
    ({"head_dim": 32}, "head_dim=32"),  # 4 heads x 32 != hidden 64
    (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
        "rope_scaling type 'llama3'",
    ),
    (
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}},
        "rope_parameters type 'llama3'",
    ),
    ({"attention_bias": True}, "attention_bias"),
]


@pytest.mark.parametrize(
    "change,needle", UNSUPPORTED, ids=["head_dim", "llama3_scaling", "llama3_params", "bias"]
)
def test_cli_import_of_an_unsupported_hf_config_is_one_line_exit_4(
    hf_dir, tmp_path, capsys, change, needle
):
    from megapt.cli import main

    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    rc = main(
        [
            "export",
            "--format",
            "megapt",
            "--from",
            str(hf_dir),
            "--out",
            str(tmp_path / "w"),
            f"--run.out_dir={tmp_path}",
            "--logging.tensorboard=false",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 4, err
    assert err.startswith("megapt export: model error: "), err
    assert needle in err and "config.json" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_cli_export_to_a_safetensors_path_writes_that_one_file(hf_dir, tmp_path, capsys):
    """`--format megapt --out x.safetensors` writes the file x.safetensors (never a folder of that
    name) and nothing else; the file alone rebuilds the same model (config in its metadata)."""
    from megapt.cli import main
    from megapt.config import load_config
    from megapt.weights.source import load_source

    out = tmp_path / "out" / "tiny.safetensors"
    common = [f"--run.out_dir={tmp_path}", "--logging.tensorboard=false"]
    rc = main(["export", "--format", "megapt", "--from", str(hf_dir), "--out", str(out), *common])
    assert rc == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["tiny.safetensors"]
    from megapt.weights.hf import _umask

    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # safetensors alone makes it 0600
    cfg = load_config(overrides=common)
    ref, back = load_source(cfg, str(hf_dir)), load_source(cfg, str(out))
    assert back.args == ref.args and back.kind == "weights"
    for (n, p), (_, q) in zip(ref.model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(p, q), n
    # hf format writes a folder: a .safetensors name there is refused before anything is written
    hf_out = tmp_path / "h.safetensors"
    rc = main(["export", "--format", "hf", "--from", str(out), "--out", str(hf_out), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "--format hf writes a folder" in err and not hf_out.exists()
    # an --out that is an existing file is refused and kept (it was a NotADirectoryError traceback)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    rc = main(["export", "--format", "hf", "--from", str(out), "--out", str(mine), *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"megapt export: usage error: {mine}: exists and is not a folder; "
        f"remove it or write somewhere else"
    ]
    assert mine.read_text() == "mine"
