"""Config tree: YAML + overrides fill it; every bad key/value is reported at once."""

import subprocess
import sys

import pytest
import yaml

from megapt.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_tiny_config_loads():
    cfg = load_config(["configs/tiny.yaml"])
    assert cfg.model.preset == "tiny"
    assert cfg.data.seq_len == 256
    assert isinstance(cfg.train.lr, float)


def test_overrides_win_over_yaml_and_parse_types(tmp_path):
    p = write(tmp_path, "a.yaml", "train:\n  lr: 1.0e-3\n  max_steps: 10\n")
    cfg = load_config(
        [p],
        [
            "--train.lr=3e-4",
            "--deepspeed.zero_stage=2",
            "--train.compile=true",
            "--tokenizer.special_tokens=[<|endoftext|>, <|pad|>, <|sep|>]",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 10
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.train.compile is True
    assert cfg.tokenizer.special_tokens[-1] == "<|sep|>"


def test_unknown_keys_and_wrong_types_are_all_listed(tmp_path):
    p = write(
        tmp_path,
        "bad.yaml",
        "train:\n  lr: fast\n  mirco_batch: 4\nbogus:\n  x: 1\n"
        "model:\n  attention: flash9\n  n_layers: 2.5\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_config([p])
    msg = str(ei.value)
    for needle in [
        "train.lr",
        "train.mirco_batch: unknown key",
        "bogus: unknown key",
        "model.attention",
        "model.n_layers",
        str(p),
    ]:
        assert needle in msg, needle
    assert "5 problem" in msg


def test_value_range_errors_are_all_listed():
    with pytest.raises(ConfigError) as ei:
        config_from_dict(
            {
                "train": {"micro_batch": 0, "lr": -1.0},
                "deepspeed": {"zero_stage": 4, "offload_params": "cpu"},
                "tokenizer": {"eos_token": "</s>"},
            }
        )
    msg = str(ei.value)
    for needle in [
        "train.micro_batch",
        "train.lr",
        "deepspeed.zero_stage",
        "deepspeed.offload_params",
        "tokenizer.eos_token",
    ]:
        assert needle in msg, needle


def test_broken_yaml_names_the_file(tmp_path):
    p = write(tmp_path, "broken.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config([p])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])


def test_yaml_is_parsed_safely(tmp_path):
    p = write(tmp_path, "evil.yaml", "run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(p)


def test_base_include_and_cycle(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  lr: 1.0e-3\n  max_steps: 5\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 7\n")
    cfg = load_config([child])
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-3, 7)
    a = write(tmp_path, "ca.yaml", "base: cb.yaml\n")
    write(tmp_path, "cb.yaml", "base: ca.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([a])


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError):
        parse_overrides(["--trainlr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        [], ["--train.lr=1e-4", "--train.min_lr=1e-5", "--data.sources=[{path: a.txt, weight: 2}]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again == cfg
    assert again.data.sources[0].weight == 2.0
    assert isinstance(yaml.safe_load((tmp_path / "config.yaml").read_text()), dict)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "megapt", "config", "--train.bogus=1", "--train.lr=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "train.bogus: unknown key" in r.stderr and "train.lr" in r.stderr


def test_every_key_has_help():
    import dataclasses

    from megapt.config import _hints

    missing = []
    stack = [(Config, "")]
    while stack:
        cls, prefix = stack.pop()
        for f in dataclasses.fields(cls):
            if not f.metadata.get("help"):
                missing.append(prefix + f.name)
            tp = _hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                stack.append((tp, prefix + f.name + "."))
    assert not missing, missing


def test_a_yaml_with_problems_of_every_kind_lists_them_all(tmp_path):
    """Unknown key, wrong type, out-of-range value and an inconsistent pair in one file: one error
    lists all of them (not only the first kind found)."""
    p = write(
        tmp_path,
        "bad.yaml",
        "train:\n  lr: fast\n  mirco_batch: 4\n  beta2: 1.5\n"
        "data:\n  num_proc: -3\n  shuffle_buffer: -1\n  seq_len: 1\n"
        "  clean: {min_chars: 50, max_chars: 10}\n"
        "deepspeed:\n  offload_params: cpu\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_config([p])
    msg = str(ei.value)
    for needle in [
        "train.lr: expected float",
        "train.mirco_batch: unknown key",
        "train.beta2: must be in [0, 1)",
        "data.num_proc: must be >= 0, got -3",
        "data.shuffle_buffer: must be >= 0, got -1",
        "data.seq_len: must be >= 2, got 1",
        "data.clean.max_chars: must be >= data.clean.min_chars=50",
        "deepspeed.offload_params: parameter offload needs zero_stage 3",
    ]:
        assert needle in msg, (needle, msg)
    assert "8 problem" in msg


def test_negative_counts_and_sizes_are_rejected_with_exit_2():
    bad = [
        "--data.num_proc=-3",
        "--data.shuffle_buffer=-1",
        "--data.loader_workers=-1",
        "--train.eval_batches=0",
        "--train.log_every=0",
        "--tokenizer.num_threads=-2",
        "--finetune.batch_size=0",
        "--plan.nodes=0",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "megapt", "config", *bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "8 problem" in r.stderr, r.stderr
    assert r.stderr.startswith("megapt config: config error: overrides: 8 problem(s):")
    for key in (
        "data.num_proc",
        "data.shuffle_buffer",
        "data.loader_workers",
        "train.eval_batches",
        "train.log_every",
        "tokenizer.num_threads",
        "finetune.batch_size",
        "plan.nodes",
    ):
        assert f"{key}: must be" in r.stderr, key


def test_every_numeric_key_has_a_range_and_its_default_is_in_it():
    """A new int/float knob must state its allowed values (RANGES); every default satisfies them."""
    import dataclasses
    import typing

    from megapt.config import RANGES, SourceConfig, _hints, in_range

    numeric, stack = {}, [(Config(), "")]
    stack.append((SourceConfig(), "data.sources."))
    while stack:
        obj, prefix = stack.pop()
        for f in dataclasses.fields(obj):
            tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
            if dataclasses.is_dataclass(tp):
                stack.append((value, prefix + f.name + "."))
                continue
            args = set(typing.get_args(tp)) - {type(None)}
            if tp in (int, float) or (args and args <= {int, float}):
                numeric[prefix + f.name] = value
    assert sorted(numeric) == sorted(RANGES)
    for key, default in numeric.items():
        assert default is None or in_range(default, RANGES[key]), (key, default)


def test_pep604_optionals_check_like_typing_optional():
    # `X | None` (what ruff's pyupgrade writes for Optional[X]) must convert and be reported
    # exactly as Optional[X]: a wrong value is an error naming the key, None is allowed.
    import dataclasses

    from megapt.config import _build

    @dataclasses.dataclass
    class Old:
        n: int | None = None

    @dataclasses.dataclass
    class New:
        n: int | None = None

    for cls in (Old, New):
        errors: list[str] = []
        assert _build(cls, {"n": 3}, "s", errors).n == 3 and not errors
        assert _build(cls, {"n": None}, "s", errors).n is None and not errors
        _build(cls, {"n": "x"}, "s", errors)
        assert errors == ["s.n: expected int or NoneType, got str 'x'"], cls
