"""Reliability promises that need no training run (issue 9): checkpoint choice on load, safe loading,
out-of-space during checkpoint and shard writes, and every CLI verb's answer to a bad override.

Out-of-space uses a real 1-4 MiB tmpfs (needs root to mount; skipped with the reason otherwise).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import re
import subprocess
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from megapt.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ["megapt", "kernels", "benchmarks", "launch"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class FakeEngine:
    """Stands in for the DeepSpeed engine: save_checkpoint writes one weights file of ``size`` bytes."""

    def __init__(self, size: int):
        self.size = size

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "mp_rank_00_model_states.pt", "wb") as f:
            for _ in range(self.size // 65536):
                f.write(os.urandom(65536))
            f.flush()
            os.fsync(f.fileno())


def _save(root: Path, step: int, size: int, keep_last: int = 3) -> Path:
    return ck.save_checkpoint(
        root,
        step,
        FakeEngine(size),
        {"step": step, "tokens_seen": 0},
        config_text="x: 1\n",
        tokenizer_path=None,
        keep_last=keep_last,
    )


class _Ckpt:
    def __init__(self, load: str = "", resume: bool = False):
        self.load, self.resume = load, resume


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs to simulate a full disk: {r.stderr.strip() or r.returncode}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


# --------------------------------------------------------------------------------------------
# 1. checkpoint choice: a corrupt checkpoint is refused on load, resume falls back
# --------------------------------------------------------------------------------------------


def test_load_of_a_corrupt_checkpoint_names_the_file_and_resume_takes_the_previous(tmp_path):
    _save(tmp_path, 1, 65536)
    second = _save(tmp_path, 2, 65536)
    _flip = second / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(_flip.read_bytes())
    data[100] ^= 0xFF  # same size: only the sha256 catches it
    _flip.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError) as ei:
        ck.resolve_checkpoint(_Ckpt(load=str(second)), tmp_path)
    assert "mp_rank_00_model_states.pt" in str(ei.value) and "sha256 mismatch" in str(ei.value)
    assert ck.resolve_checkpoint(_Ckpt(resume=True), tmp_path).name == "step_0000001"
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resolve_checkpoint(_Ckpt(load=str(tmp_path / "step_0000009")), tmp_path)


def test_unfinished_save_is_never_chosen_and_the_next_save_removes_it(tmp_path):
    _save(tmp_path, 1, 65536, keep_last=1)
    (tmp_path / "step_0000002.tmp" / "ds").mkdir(parents=True)  # a save killed before its rename
    (tmp_path / "step_0000002.tmp" / ck.META).write_text(json.dumps({"step": 2}))
    assert ck.resolve_checkpoint(_Ckpt(resume=True), tmp_path).name == "step_0000001"
    _save(tmp_path, 3, 65536, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003"]


# --------------------------------------------------------------------------------------------
# 7. out of space
# --------------------------------------------------------------------------------------------


def test_disk_full_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as root:
        _save(root, 1, 512 * 1024)  # ~0.5 MiB: fits
        with pytest.raises(OSError) as ei:
            _save(root, 2, 4 * 1024 * 1024)  # cannot fit
        assert ei.value.errno == errno.ENOSPC
        assert ck.find_latest_valid(root).name == "step_0000001"
        assert not (root / "step_0000002").exists()


def test_the_save_after_a_disk_full_failure_reclaims_the_failed_saves_space(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as root:
        _save(root, 1, 512 * 1024)
        with pytest.raises(OSError):
            _save(root, 2, 4 * 1024 * 1024)  # leaves ~1.5 MiB in step_0000002.tmp
        _save(root, 3, 256 * 1024, keep_last=3)  # fits once the failed save's leftovers are gone
        assert [p.name for _, p in ck.list_checkpoints(root)] == ["step_0000001", "step_0000003"]
        assert not list(root.glob("*.tmp"))
        assert ck.find_latest_valid(root).name == "step_0000003"


def test_disk_full_while_megapt_writes_its_own_checkpoint_files(tmp_path):
    """DeepSpeed's files fit, megapt's metadata/manifest do not: the step is not renamed into place."""
    with tmpfs(tmp_path / "disk", "1m") as root:
        _save(root, 1, 128 * 1024)
        big_meta = {"step": 2, "tokens_seen": 0, "pad": "x" * (2 * 1024 * 1024)}
        with pytest.raises(OSError) as ei:
            ck.save_checkpoint(
                root,
                2,
                FakeEngine(64 * 1024),
                big_meta,
                config_text="x: 1\n",
                tokenizer_path=None,
                keep_last=1,
            )
        assert ei.value.errno == errno.ENOSPC
        assert [p.name for _, p in ck.list_checkpoints(root)] == ["step_0000001"]
        assert ck.verify_checkpoint(root / "step_0000001") == []


def test_disk_full_during_a_shard_write_leaves_earlier_shards_intact(tmp_path):
    from megapt.data.manifest import load_manifest
    from megapt.data.shard import write_token_dataset
    from megapt.data.tarformat import verify_shard

    def rows(n, seed):
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 500, 129).astype(np.uint16) for _ in range(n)]

    with tmpfs(tmp_path / "disk", "2m") as disk:
        write_token_dataset(
            disk / "a", {"train": rows(200, 0)}, seq_len=128, vocab_size=512, shard_samples=64
        )
        before = {p.name: p.read_bytes() for p in (disk / "a").iterdir()}
        with pytest.raises(OSError) as ei:  # ~2.5 MiB of samples into the ~1.8 MiB left
            write_token_dataset(
                disk / "b", {"train": rows(4000, 1)}, seq_len=128, vocab_size=512, shard_samples=256
            )
        assert ei.value.errno == errno.ENOSPC
        # the earlier dataset: byte for byte as it was, and it verifies
        assert {p.name: p.read_bytes() for p in (disk / "a").iterdir()} == before
        m = load_manifest(disk / "a")
        for e in m["splits"]["train"]["shards"]:
            verify_shard(disk / "a" / e["name"], e)
        # the failed one: no manifest, no partial shard under a final name, no .tmp left behind
        assert not (disk / "b" / "manifest.json").exists()
        assert not list((disk / "b").glob("*.tmp"))
        for p in (disk / "b").glob("*.tar"):
            with tarfile.open(p) as tf:
                assert len(tf.getmembers()) == 256  # only complete shards were renamed into place


# --------------------------------------------------------------------------------------------
# 5. safe loading
# --------------------------------------------------------------------------------------------


def _py_files() -> list[Path]:
    out = []
    for d in SOURCE_DIRS:
        out += sorted((ROOT / d).rglob("*.py"))
    return out


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def unsafe_loads(files: list[Path]) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, yaml.load/unsafe_load
    without a SafeLoader, pickle/marshal/dill loads, numpy loads with allow_pickle=True."""
    problems = []
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{f.relative_to(ROOT)}:{node.lineno}: {name}"
            last = name.rsplit(".", 1)[-1]
            if name.endswith("torch.load"):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(where + " without weights_only=True")
            elif name.startswith("yaml.") and last in (
                "load",
                "load_all",
                "unsafe_load",
                "full_load",
                "unsafe_load_all",
                "full_load_all",
            ):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if last.startswith(("unsafe", "full")) or not (
                    loader is not None and "Safe" in _dotted(loader)
                ):
                    problems.append(where + " (use yaml.safe_load)")
            elif name.split(".")[0] in (
                "pickle",
                "cPickle",
                "_pickle",
                "dill",
                "marshal",
                "shelve",
                "joblib",
            ) and last in ("load", "loads", "open", "Unpickler"):
                problems.append(where + " (unpickling runs code)")
            elif name.endswith(("np.load", "numpy.load")):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(where + " with allow_pickle")
    return problems


def test_the_scanner_flags_every_unsafe_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch, yaml, pickle, numpy as np\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nyaml.load(s)\nyaml.unsafe_load(s)\n"
        "yaml.load(s, Loader=yaml.FullLoader)\npickle.loads(b)\nnp.load('x', allow_pickle=True)\n"
        "torch.load('a', weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n"
        "np.load('x')\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = unsafe_loads([bad])
    finally:
        ROOT = saved
    assert [int(p.split(":")[1]) for p in found] == [2, 3, 4, 5, 6, 7, 8]


def test_source_tree_loads_nothing_unsafely():
    files = _py_files()
    assert len(files) > 30
    assert unsafe_loads(files) == []
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    assert (
        "torch.load(" in text
    )  # the scanner looks at real code (consolidate.py loads ZeRO-0 weights)


def test_exported_and_consolidated_weights_are_safetensors_only():
    """Every writer of weights in megapt uses safetensors; nothing calls torch.save/pickle.dump."""
    writers = []
    for f in _py_files():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name.endswith(("torch.save", "pickle.dump", "pickle.dumps")) or name.endswith(
                    ".save_pretrained"
                ):
                    writers.append(f"{f.relative_to(ROOT)}:{node.lineno}: {name}")
    assert writers == []
    for mod in (
        "megapt/weights/hf.py",
        "megapt/weights/consolidate.py",
        "megapt/weights/source.py",
    ):
        text = (ROOT / mod).read_text()
        assert "write_safetensors(" in text, mod  # megapt.weights.hf: save_file + the umask's mode
    hf = (ROOT / "megapt/weights/hf.py").read_text()
    assert "save_file(state, str(path), metadata=metadata)" in hf


def _evil_file(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # runs at unpickling time

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Evil(), "optimizer_state_dict": Evil()}, path)


def _meta(ckpt: Path, stage: int) -> None:
    (ckpt / ck.META).write_text(json.dumps({"step": 1, "zero_stage": stage}))


def test_zero0_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    from megapt.weights.consolidate import full_state_dict

    c = tmp_path / "step_0000001"
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"
    _evil_file(c / "ds" / "mp_rank_00_model_states.pt", marker)
    _meta(c, 0)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        full_state_dict(c)
    assert not marker.exists()


def test_zero_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    from megapt.weights.consolidate import full_state_dict

    c = tmp_path / "step_0000001"
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"
    _evil_file(c / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    _evil_file(c / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    _meta(c, 2)
    with contextlib.suppress(Exception):
        full_state_dict(c)
    assert not marker.exists(), "unpickling the checkpoint ran code"


# --------------------------------------------------------------------------------------------
# 8. every CLI verb refuses a bad override with exit 2 and one message listing every problem
# --------------------------------------------------------------------------------------------


def _verbs():
    from megapt.cli import VERBS

    return sorted(VERBS)


# the positional / required arguments a verb needs so that argparse lets it reach the config
_REQUIRED = {
    ("ckpt", "consolidate"): ["CKPT"],
    ("ckpt", "universal"): ["CKPT"],
    ("bench",): ["train"],
    ("export",): ["--out", "OUT"],
    ("data", "index"): ["CKPT"],
}
BAD = ["--train.bogus_key=1", "--train.lr=fast", "--model.attention=flash9", "--data.seq_len=long"]


@pytest.mark.parametrize("verb", _verbs(), ids=lambda v: "-".join(v))
def test_every_verb_rejects_bad_overrides_with_exit_2_listing_all(
    verb, tmp_path, capsys, monkeypatch
):
    from megapt.cli import main

    monkeypatch.chdir(tmp_path)
    extra = [str(tmp_path / a) if a in ("CKPT", "OUT") else a for a in _REQUIRED.get(verb, [])]
    rc = main([*verb, *extra, *BAD])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.count("config error") == 1, err
    for key in ("train.bogus_key", "train.lr", "model.attention", "data.seq_len"):
        assert key in err, (key, err)
    assert re.search(r"\b4 problem", err), err
    assert list(tmp_path.iterdir()) == []  # refused before doing anything
