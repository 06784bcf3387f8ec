"""Fine-tuning: freezing keeps frozen weights bit-identical and out of the optimizer, layer-wise
LR, classification/SFT data rules and the errors users get for bad rows."""

import json
import re

import pytest
import torch

from megapt.config import load_config
from megapt.data.tokenizer import train_tokenizer
from megapt.finetune.freeze import apply_freezing
from megapt.finetune.run import finetune
from megapt.model.gpt import GPT, ModelArgs
from megapt.model.heads import GPTForSequenceClassification, pool_hidden
from megapt.model.ops import Backends
from megapt.tasks import data as D
from megapt.train.optim import param_groups
from megapt.weights.source import load_source, save_weights

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")
WORDS = {
    "a": "alpha apple avocado anchor arrow",
    "b": "bravo banana butter bottle button",
    "c": "charlie cherry carrot candle cable",
}


def _texts():
    out = []
    for w in WORDS.values():
        ws = w.split()
        for i in range(12):
            out.append(" ".join(ws[(i + j) % 5] for j in range(3 + i % 3)))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenizer, a tiny pretrained-shaped weights folder and classification/SFT files."""
    root = tmp_path_factory.mktemp("ft")
    cfg = load_config(overrides=["--tokenizer.vocab_size=300"])
    tok = train_tokenizer(cfg.tokenizer, _texts() * 4, root / "spm.model")
    args = ModelArgs(
        n_layers=3,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        vocab_size=tok.vocab_size,
        max_seq_len=32,
    )
    save_weights(root / "base", GPT(args, EAGER, seed=1), args, root / "spm.model")
    rows = []
    for k, w in WORDS.items():
        ws = w.split()
        for i in range(10):
            rows.append({"text": " ".join(ws[(i + j) % 5] for j in range(2 + i % 4)), "label": k})
    for name, sl in (("train", slice(0, None)), ("val", slice(0, None, 3))):
        with open(root / f"{name}.jsonl", "w") as f:
            for r in rows[sl]:
                f.write(json.dumps(r) + "\n")
    with open(root / "sft.jsonl", "w") as f:
        for k, w in WORDS.items():
            f.write(json.dumps({"prompt": f"{k}:", "response": w}) + "\n")
    return root, tok, args


def _cfg(root, *extra):
    return load_config(overrides=_overrides(root, *extra))


def _overrides(root, *extra):
    return [
        f"--run.out_dir={root}/runs",
        "--run.name=t",
        "--logging.tensorboard=false",
        f"--tokenizer.path={root}/spm.model",
        f"--finetune.init_from={root}/base",
        f"--finetune.train_file={root}/train.jsonl",
        f"--finetune.val_file={root}/val.jsonl",
        "--finetune.batch_size=8",
        "--finetune.epochs=1",
        "--finetune.lr=1e-2",
        "--data.seq_len=16",
        "--model.attention=eager",
        *extra,
    ]


def test_frozen_params_bit_identical_and_not_in_optimizer(workdir):
    root, tok, args = workdir
    model = GPTForSequenceClassification(GPT(args, EAGER, seed=2), args.d_model, 3, "last", 0.0)
    apply_freezing(model, args.n_layers, freeze_embeddings=True, freeze_layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(
        model, 0.1, lr=1e-2, n_layers=args.n_layers, layer_lr_decay=0.5, head_lr_mult=10.0
    )
    in_opt = {n for g in groups for n in g["names"]}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (in_opt & frozen)
    assert any(n.startswith("backbone.layers.2.") for n in in_opt)
    assert not any(re.match(r"backbone\.(tok_embeddings|layers\.[01]\.)", n) for n in in_opt)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    ids = torch.randint(0, args.vocab_size, (4, 9))
    for _ in range(3):
        loss = model(ids, None, torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state_ids = {id(p) for p in opt.state}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
            assert id(p) not in state_ids
    assert not torch.equal(model.head.proj.weight, before["head.proj.weight"])


def test_layerwise_lr_decay_and_head_multiplier(workdir):
    _, _, args = workdir  # 3 blocks: depth 0 emb, 1..3 blocks, 4 final norm/head
    model = GPTForSequenceClassification(GPT(args, EAGER), args.d_model, 3, "mean", 0.0)
    lr = {
        n: g["lr"]
        for g in param_groups(model, 0.0, lr=1.0, n_layers=3, layer_lr_decay=0.5, head_lr_mult=4.0)
        for n in g["names"]
    }
    assert lr["backbone.tok_embeddings.weight"] == pytest.approx(0.5**4)
    assert lr["backbone.layers.0.attention.wq.weight"] == pytest.approx(0.5**3)
    assert lr["backbone.layers.2.feed_forward.w2.weight"] == pytest.approx(0.5)
    assert lr["backbone.norm.weight"] == pytest.approx(1.0)
    assert lr["head.proj.weight"] == pytest.approx(4.0)


def test_pooling_respects_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).view(
        2, 4, 1
    )  # values = position index + 4*row
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_hidden(h, mask, "last").flatten().tolist() == [1.0, 7.0]
    assert pool_hidden(h, mask, "mean").flatten().tolist() == [0.5, 5.5]
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_hidden(h, left, "last").flatten().tolist() == [3.0, 7.0]


def test_padded_batch_gives_same_prediction_as_single_row(workdir):
    _, _, args = workdir
    model = GPTForSequenceClassification(
        GPT(args, EAGER, seed=4), args.d_model, 3, "last", 0.0
    ).eval()
    short, long = D.Example([5, 6, 7], 0), D.Example([5, 6, 7, 8, 9, 10], 1)
    b = D.collate([short, long], pad_id=1)
    with torch.no_grad():
        both = model(b["input_ids"], b["attention_mask"]).logits
        alone = model(torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)


def test_sft_labels_only_on_response(workdir):
    root, tok, _ = workdir
    rows = D.read_rows(str(root / "sft.jsonl"), ["prompt", "response"])
    ex = D.build_sft(rows[:1], tok, 32, "prompt", "response")[0]
    p, r = tok.encode("a:"), tok.encode(WORDS["a"]) + [tok.eos_id]
    assert ex.input_ids == (p + r)[:-1]
    assert ex.labels == [-100] * (len(p) - 1) + r


def test_bad_rows_name_the_row(workdir, tmp_path):
    root, tok, _ = workdir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "alpha", "label": "a"}\n{"text": "bravo", "label": "zzz"}\n')
    rows = D.read_rows(str(bad), ["text", "label"])
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: label 'zzz' is not one of the 3 classes"):
        D.build_classification(rows, tok, 16, "text", "label", ["a", "b", "c"])
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "x", "response": "  "}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: empty response"):
        D.build_sft(D.read_rows(str(bad), ["prompt", "response"]), tok, 16, "prompt", "response")
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: missing field\(s\) \['response'\]"):
        D.read_rows(str(bad), ["prompt", "response"])


def test_checkpoint_shape_mismatch_names_tensor(workdir, tmp_path):
    root, _, args = workdir
    save_weights(tmp_path / "w", GPT(args, EAGER), args)
    cfg_file = tmp_path / "w" / "model_config.json"
    d = json.loads(cfg_file.read_text())
    d["ffn_hidden"] = 80
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(Exception, match=r"feed_forward\.w1\.weight.*\(64, 32\).*\(80, 32\)"):
        load_source(_cfg(root), str(tmp_path / "w"))


def test_classification_finetune_learns_and_saves_best(workdir):
    root, _, _ = workdir
    cfg = _cfg(
        root,
        "--finetune.task=classify",
        "--finetune.epochs=6",
        "--finetune.head_lr_mult=3",
        "--finetune.freeze_embeddings=true",
        "--finetune.early_stopping_patience=3",
        f"--finetune.test_file={root}/val.jsonl",
        f"--finetune.out_dir={root}/clf",
    )
    res = finetune(cfg)
    assert res["test"]["accuracy"] > 0.8  # 3 well-separated classes
    assert (
        res["test"]["accuracy"] == res["val"]["accuracy"]
    )  # test == val file: best weights restored
    src = load_source(cfg, str(root / "clf"))  # reload: same predictions from the saved folder
    assert src.meta["classes"] == ["a", "b", "c"] and set(src.extra) == {
        "head.proj.weight",
        "head.proj.bias",
    }
    base = load_source(cfg, str(root / "base"))
    assert torch.equal(src.model.tok_embeddings.weight, base.model.tok_embeddings.weight)  # frozen
    from megapt.cli import (
        main,
    )  # `megapt eval` on the saved classifier scores the same rows the same way

    out = root / "clf_eval.json"
    assert (
        main(
            [
                "eval",
                "--from",
                str(root / "clf"),
                "--data",
                str(root / "val.jsonl"),
                "--out",
                str(out),
                f"--tokenizer.path={root}/spm.model",
                "--data.seq_len=16",
                f"--run.out_dir={root}/runs",
                "--logging.tensorboard=true",
            ]
        )
        == 0
    )
    scored = json.loads(out.read_text())["classification"]
    assert scored["accuracy"] == pytest.approx(res["test"]["accuracy"])
    assert scored["confusion_matrix"] == res["test"]["confusion_matrix"]
    assert list((root / "runs" / "tiny" / "tb_eval").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("lora", [False, True])
def test_sft_learns_response_and_saves_plain_weights(workdir, lora):
    root, tok, _ = workdir
    extra = (
        ["--finetune.lora_rank=8", "--finetune.lora_targets=[wq,wk,wv,wo,w1,w2,w3]"] if lora else []
    )
    cfg = _cfg(
        root,
        "--finetune.task=sft",
        f"--finetune.train_file={root}/sft.jsonl",
        f"--finetune.val_file={root}/sft.jsonl",
        "--finetune.epochs=15",
        "--finetune.batch_size=3",
        "--finetune.lr=3e-2",
        f"--finetune.out_dir={root}/sft",
        *extra,
    )
    res = finetune(cfg)
    first = res["history"][0]["val_score"]
    # a random base can only move its (frozen) tiny output logits a little through LoRA
    assert res["val"]["score"] > first + (0.1 if lora else 1.0)
    src = load_source(cfg, str(root / "sft"))  # LoRA merged: plain weights, no adapters left
    assert not any("lora" in n for n, _ in src.model.named_parameters())
    from megapt.tasks.model import lm_loss

    ex = D.build_sft(
        D.read_rows(str(root / "sft.jsonl"), ["prompt", "response"]), tok, 16, "prompt", "response"
    )
    assert lm_loss(src.model, ex, 3, tok.pad_id, "cpu")["loss"] == pytest.approx(
        res["val"]["loss"], abs=1e-4
    )


def test_unmerged_lora_adapters_are_part_of_the_loaded_model(workdir):
    # finetune.merge_lora=false keeps the adapters as tensors; every reader must fold them in
    # (they were dropped on load, so eval/generate/export silently used the base model)
    from megapt.tasks.model import lm_loss

    root, tok, _ = workdir
    out = root / "sft_lora"
    cfg = _cfg(
        root,
        "--finetune.task=sft",
        f"--finetune.train_file={root}/sft.jsonl",
        f"--finetune.val_file={root}/sft.jsonl",
        "--finetune.epochs=6",
        "--finetune.batch_size=3",
        "--finetune.lr=3e-2",
        "--finetune.lora_rank=4",
        "--finetune.lora_alpha=8",
        "--finetune.merge_lora=false",
        f"--finetune.out_dir={out}",
    )
    res = finetune(cfg)
    ex = D.build_sft(
        D.read_rows(str(root / "sft.jsonl"), ["prompt", "response"]), tok, 16, "prompt", "response"
    )
    src = load_source(cfg, str(out))
    assert src.meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo"]}
    loss = lm_loss(src.model, ex, 3, tok.pad_id, "cpu")["loss"]
    base = lm_loss(load_source(cfg, str(root / "base")).model, ex, 3, tok.pad_id, "cpu")["loss"]
    assert loss == pytest.approx(res["val"]["loss"], abs=1e-4) and abs(loss - base) > 1e-3


def test_lora_targets_that_match_nothing_are_a_config_error(workdir, capsys):
    from megapt.cli import main

    root, _, _ = workdir
    argv = _overrides(
        root,
        "--finetune.task=classify",
        "--finetune.lora_rank=4",
        "--finetune.lora_targets=[nope]",
        f"--finetune.out_dir={root}/never",
    )
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "megapt finetune: config error: finetune.lora_targets: LoRA targets ['nope']"
    ), err


def test_unknown_freeze_pattern_is_an_error(workdir):
    _, _, args = workdir
    with pytest.raises(ValueError, match="matched no parameter"):
        apply_freezing(GPT(args, EAGER), 3, freeze_pattern=r"^nothing\.")


def test_megapt_checkpoint_folder_loads_newest_step(workdir, tmp_path):
    """The trainer's checkpoint layout (ZeRO 0: DeepSpeed keeps the module weights in mp_rank_00)."""
    import dataclasses

    root, _, args = workdir
    for step, seed in ((1, 7), (2, 8)):
        ck = tmp_path / "checkpoints" / f"step_{step:07d}"
        (ck / "ds").mkdir(parents=True)
        model = GPT(args, EAGER, seed=seed)
        torch.save({"module": model.state_dict()}, ck / "ds" / "mp_rank_00_model_states.pt")
        (ck / "model_config.json").write_text(json.dumps(dataclasses.asdict(args)))
        (ck / "megapt.json").write_text(json.dumps({"step": step, "zero_stage": 0, "ds_tag": "ds"}))
        from megapt.train.checkpoint import write_manifest

        write_manifest(ck)
    src = load_source(_cfg(root), str(tmp_path / "checkpoints"))
    assert src.path.endswith("step_0000002")
    assert torch.equal(src.model.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)


def test_distill_kl_matches_torch_kl_div():
    from megapt.tasks.model import distill_kl

    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ref = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s / 2, -1),
            torch.log_softmax(t / 2, -1),
            log_target=True,
            reduction="batchmean",
        )
        * 4
    )
    assert float(distill_kl(s, t, None, 2.0)) == pytest.approx(float(ref), rel=1e-5)
    mask = torch.tensor([True, False, True, True, False])
    assert float(distill_kl(s, t, mask, 2.0)) == pytest.approx(
        float(distill_kl(s[mask], t[mask], None, 2.0))
    )


def test_distillation_pulls_student_toward_teacher(workdir):
    from megapt.tasks.model import distill_kl

    root, tok, args = workdir
    save_weights(root / "teacher", GPT(args, EAGER, seed=11), args, root / "spm.model")
    cfg = _cfg(
        root,
        "--finetune.task=sft",
        f"--finetune.train_file={root}/sft.jsonl",
        f"--finetune.val_file={root}/sft.jsonl",
        "--finetune.epochs=8",
        "--finetune.batch_size=3",
        f"--finetune.distill_from={root}/teacher",
        "--finetune.distill_alpha=1.0",
        "--finetune.distill_temperature=1.0",
        f"--finetune.out_dir={root}/distilled",
    )
    ex = D.build_sft(
        D.read_rows(str(root / "sft.jsonl"), ["prompt", "response"]), tok, 16, "prompt", "response"
    )
    batch = D.collate(ex, tok.pad_id)
    mask = batch["labels"] != -100

    def kl_to_teacher(path):
        with torch.no_grad():
            s = load_source(cfg, str(path)).model(batch["input_ids"]).logits
            t = load_source(cfg, str(root / "teacher")).model(batch["input_ids"]).logits
        return float(distill_kl(s, t, mask, 1.0))

    before = kl_to_teacher(root / "base")
    finetune(cfg)
    assert kl_to_teacher(root / "distilled") < 0.5 * before


def test_rows_from_csv_and_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "r.csv").write_text('text,label\n"x, y",1\nz,0\n')
    rows = D.read_rows(str(tmp_path / "r.csv"), ["text", "label"])
    assert [r.values for r in rows] == [{"text": "x, y", "label": "1"}, {"text": "z", "label": "0"}]
    assert rows[1].where.endswith("r.csv:3")  # line 3 in an editor (header is line 1)
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}).save_to_disk(
        str(tmp_path / "ds")
    )
    rows = D.read_rows(str(tmp_path / "ds"), ["text", "label"])
    assert D.infer_classes(rows, "label") == ["0", "1"] and rows[0].values["text"] == "a"


def test_stdlib_example_split_is_deterministic_balanced_and_disjoint(tmp_path):
    from megapt.finetune.stdlib_example import CAPS, FAMILIES, LOW_PER_CLASS, build_dataset

    a, b = build_dataset(tmp_path / "a"), build_dataset(tmp_path / "b")
    for split in ("train", "val", "test", "train_low"):
        assert a[split].read_bytes() == b[split].read_bytes(), split
    rows = {s: [json.loads(x) for x in a[s].read_text().splitlines()] for s in a}
    keys = {s: {r["key"] for r in rows[s]} for s in ("train", "val", "test")}
    assert (
        not (keys["train"] & keys["test"])
        and not (keys["train"] & keys["val"])
        and not (keys["val"] & keys["test"])
    )
    from collections import Counter

    train = Counter(r["label"] for r in rows["train"])
    assert set(train) == set(FAMILIES) and set(train.values()) == {CAPS["train"]}
    assert set(Counter(r["label"] for r in rows["train_low"]).values()) == {LOW_PER_CLASS}
    assert all(
        r["key"].split("/")[0] == r["label"] for r in rows["test"]
    )  # label = top-level package


def test_finetune_runs_through_deepspeed_engine_zero1_matches_zero0(workdir):
    """`megapt finetune` trains through the pretraining DeepSpeed engine: at one process ZeRO-1 gives
    ZeRO-0's losses; frozen weights stay bit-identical and get no optimizer state or ZeRO partition."""
    from deepspeed import DeepSpeedEngine

    root, _, _ = workdir
    base = load_source(_cfg(root), str(root / "base")).model.state_dict()
    runs = {}
    for stage in (0, 1):
        cfg = _cfg(
            root,
            "--finetune.task=classify",
            "--finetune.max_steps=4",
            "--finetune.eval_every=1",
            "--finetune.freeze_embeddings=true",
            "--finetune.freeze_layers=1",
            "--finetune.head_dropout=0",
            "--finetune.head_lr_mult=3",
            "--finetune.layer_lr_decay=0.5",
            f"--deepspeed.zero_stage={stage}",
            f"--finetune.out_dir={root}/z{stage}",
        )
        res = finetune(cfg, keep_engine=True)
        eng = res["engine"]
        assert isinstance(eng, DeepSpeedEngine) and eng.zero_optimization_stage() == stage
        frozen = {n: p for n, p in eng.module.named_parameters() if not p.requires_grad}
        assert (
            "backbone.tok_embeddings.weight" in frozen
            and "backbone.layers.0.attention.wq.weight" in frozen
        )
        for n, p in frozen.items():
            assert torch.equal(p.cpu(), base[n[len("backbone.") :]]), n
        frozen_ids = {id(p) for p in frozen.values()}
        opt = eng.optimizer
        # the schedule scales each group's own peak LR (layer-wise decay, head multiplier)
        peaks = sorted(g["initial_lr"] for g in opt.param_groups)
        assert peaks == pytest.approx(sorted(1e-2 * g["lr_scale"] for g in opt.param_groups))
        assert peaks[0] == pytest.approx(1e-2 * 0.5**2) and peaks[-1] == pytest.approx(3e-2)
        if stage == 0:  # the client AdamW: state only for trainable parameters
            assert opt.state and not frozen_ids & {id(p) for p in opt.state}
        else:  # ZeRO-1 flattens and partitions only the parameters it was given
            held = {id(p) for g in opt.bit16_groups for p in g}
            assert held and not frozen_ids & held
            assert sum(p.numel() for g in opt.bit16_groups for p in g) == res["trainable_params"]
        saved = load_source(cfg, str(root / f"z{stage}")).model
        assert torch.equal(
            saved.layers[0].attention.wq.weight, base["layers.0.attention.wq.weight"]
        )
        assert not torch.equal(
            saved.layers[2].attention.wq.weight, base["layers.2.attention.wq.weight"]
        )
        runs[stage] = [h["train_loss"] for h in res["history"]]
    assert len(runs[0]) == 4 and runs[0][-1] != runs[0][0]
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)


def test_stdlib_example_selects_each_arms_lr_on_validation_never_on_test():
    from megapt.finetune.stdlib_example import select_by_val

    runs = [
        {"lr": 1e-3, "val_accuracy": 0.70, "test_accuracy": 0.90},
        {"lr": 2e-3, "val_accuracy": 0.80, "test_accuracy": 0.60},
        {"lr": 4e-3, "val_accuracy": 0.80, "test_accuracy": 0.99},
    ]
    assert (
        select_by_val(runs)["lr"] == 2e-3
    )  # best val; the tie goes to the lower LR; test is ignored


def test_stdlib_example_runs_both_arms_over_the_lr_grid(workdir):
    """The built-in example trains pretrained and scratch at every grid LR, in both label regimes,
    reports for each arm the test accuracy of the LR its validation accuracy chose, and writes it."""
    from megapt.finetune.stdlib_example import run_example

    root, _, _ = workdir
    cfg = _cfg(
        root,
        "--finetune.max_steps=2",
        "--finetune.max_len=16",
        "--finetune.batch_size=4",
        "--finetune.pooling=mean",
    )
    res = run_example(cfg, lrs=[1e-3, 3e-2], seeds=[7])
    saved = json.loads((cfg.run_dir / "stdlib_example.json").read_text())
    assert saved["lr_grid"] == [1e-3, 3e-2] and saved["seeds"] == [7]
    for regime in ("full", "low"):
        r = res[regime]
        assert r["train_rows"] == (720 if regime == "full" else 120)
        for arm in ("pretrained", "scratch"):
            grid = r[arm]["grid"]
            assert sorted(g["lr"] for g in grid) == [1e-3, 3e-2]
            best = max(grid, key=lambda g: (g["val_accuracy"], -g["lr"]))
            assert r[arm]["selected_lr_per_seed"] == [best["lr"]]
            assert r[arm]["test_accuracy"] == best["test_accuracy"]
        assert 0 < r["majority"]["test_accuracy"] < 0.5
        assert saved[regime]["pretrained"]["test_accuracy"] == r["pretrained"]["test_accuracy"]


def test_a_diverging_finetune_is_one_line_with_exit_3(workdir, capsys):
    from megapt.cli import main
    from megapt.errors import EXIT_NONFINITE

    root, _, _ = workdir
    out = root / "diverged"
    argv = _overrides(
        root,
        "--finetune.task=classify",
        "--finetune.lr=1e30",
        "--finetune.epochs=4",
        f"--finetune.out_dir={out}",
    )
    assert main(["finetune", *argv]) == EXIT_NONFINITE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "megapt finetune: non-finite loss: the loss is not finite at step"
    ), err
    assert "finetune.lr (now 1e+30)" in err[0] and not out.exists()
