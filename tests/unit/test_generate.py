"""Generation: KV-cached decoding gives the same tokens as recomputing the prefix, batches of
mixed-length prompts give the same tokens as one prompt at a time, sampling filters behave."""

import pytest
import torch

from megapt.model.gpt import GPT, ModelArgs
from megapt.model.ops import Backends
from megapt.model.sampling import filter_logits, generate, sample_next

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        vocab_size=50,
        max_seq_len=48,
    )
    m = GPT(args, EAGER, seed=5).eval()
    with torch.no_grad():  # a larger init so the sampled distribution is far from uniform
        m.output.weight.mul_(20.0)
    return m


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13], [3]]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 10, 0.9)])
def test_cached_equals_uncached(model, temperature, top_k, top_p):
    a = generate(model, PROMPTS, 12, temperature, top_k, top_p, seed=3, use_cache=True)
    b = generate(model, PROMPTS, 12, temperature, top_k, top_p, seed=3, use_cache=False)
    assert a == b
    assert all(len(x) == 12 for x in a)


def test_batch_of_mixed_lengths_equals_one_by_one(model):
    batch = generate(model, PROMPTS, 10, 0.0)
    single = [generate(model, [p], 10, 0.0)[0] for p in PROMPTS]
    assert batch == single


def test_greedy_matches_plain_argmax_loop(model):
    ids = list(PROMPTS[0])
    for _ in range(6):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    assert generate(model, [PROMPTS[0]], 6, 0.0)[0] == ids[len(PROMPTS[0]) :]


def test_stop_token_ends_the_row_and_is_excluded(model):
    free = generate(model, [PROMPTS[0]], 10, 0.0)[0]
    stop = free[3]
    first = free.index(stop)
    out = generate(model, [PROMPTS[0]], 10, 0.0, stop_ids=[stop])[0]
    assert out == free[:first]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probs ~ [0.09, 0.67, 0.24, 0.03]: nucleus 0.7 keeps the top two tokens
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 1, 1.0, [g])) for _ in range(20)}
    assert draws == {1}


def test_too_long_and_empty_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len=48"):
        generate(model, [[1] * 40], 10)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 4)


def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megapt.weights.hf import export_hf

    export_hf(model, model.args, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    prompt = torch.tensor([PROMPTS[0]])
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generate(model, [PROMPTS[0]], 8, 0.0) == [ref]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A megapt weights folder (1 layer, max_seq_len 64) with its tokenizer."""
    from megapt.config import load_config
    from megapt.data.tokenizer import train_tokenizer
    from megapt.weights.source import save_weights

    root = tmp_path_factory.mktemp("gen")
    cfg = load_config(overrides=["--tokenizer.vocab_size=300"])
    tok = train_tokenizer(cfg.tokenizer, ["import os\nimport sys\n" * 40], root / "spm.model")
    args = ModelArgs(
        n_layers=1,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        vocab_size=tok.vocab_size,
        max_seq_len=64,
    )
    save_weights(root / "w", GPT(args, EAGER, seed=1), args, root / "spm.model")
    return root / "w"


def test_cli_generate_greedy_is_deterministic_and_stops(weights, tmp_path, capsys):
    from megapt.cli import main

    argv = [
        "generate",
        "--from",
        str(weights),
        "--prompt",
        "import",
        "--prompt",
        "import os\n",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        f"--run.out_dir={tmp_path}",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv + ["--no-cache"]) == 0
    assert capsys.readouterr().out == first
    assert first.count("=== ") == 2


# each bad argument: exit 2 (usage error), one line on stderr naming it, no traceback, no output
BAD_ARGS = [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "import os " * 40], "exceed the model's max_seq_len=64"),
    (["--prompt", "import", "--max-tokens", "0"], "--max-tokens) must be >= 1, got 0"),
    (["--prompt", "import", "--top-p", "0"], "--top-p) must be in (0, 1], got 0.0"),
    (
        ["--prompt", "import", "--temperature", "-1"],
        "must be finite and >= 0 (0 = greedy), got -1.0",
    ),
    (
        ["--prompt", "import", "--temperature", "nan"],
        "must be finite and >= 0 (0 = greedy), got nan",
    ),
    (
        ["--prompt", "import", "--temperature", "inf"],
        "must be finite and >= 0 (0 = greedy), got inf",
    ),
    (["--prompt", "import", "--top-k", "-2"], "--top-k) must be >= 0 (0 = off), got -2"),
    (["--prompt", "import", "--stop", "import os sys"], "a stop must be one token"),
    (["--prompt-file", "no_such_prompts.txt"], "--prompt-file no_such_prompts.txt: cannot read it"),
]


@pytest.mark.parametrize("extra,needle", BAD_ARGS, ids=[str(i) for i in range(len(BAD_ARGS))])
def test_cli_generate_bad_arguments_are_one_line_exit_2(weights, tmp_path, capsys, extra, needle):
    from megapt.cli import main

    rc = main(["generate", "--from", str(weights), f"--run.out_dir={tmp_path}", *extra])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith("megapt generate: usage error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_cli_generate_missing_model_is_a_model_error_exit_4(tmp_path, capsys):
    from megapt.cli import main

    rc = main(
        ["generate", "--from", str(tmp_path / "nope"), "--prompt", "x", f"--run.out_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert rc == 4 and err.startswith("megapt generate: model error: ") and "nope" in err, err
    assert err.count("\n") == 1
