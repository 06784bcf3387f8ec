"""Helpers for the integration tests: a micro corpus + config, process runners, and two
"hosts" made of Linux network namespaces joined by a veth pair (10.77.0.1 <-> 10.77.0.2).

Addresses live only inside the namespaces the test creates; nothing is configured in the host's
own namespace, and the namespaces (with their veth ends) are deleted in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
ADDRS = ("10.77.0.1", "10.77.0.2")
IFNAME = "mp0"  # the veth end inside each namespace (same name in both: separate namespaces)


def base_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        MEGAPT_PLAN_ARGS="--check-only",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def write_micro_config(tmp: Path, name: str = "micro", **sections: dict) -> Path:
    """A 2-layer, 64-wide model on a ~100 KB slice of the Python stdlib; data prepared once."""
    corpus = tmp / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for f in sorted(stdlib.glob("*.py"))[:25]:
            (corpus / f"{f.stem}.txt").write_text(f.read_text(errors="ignore"), encoding="utf-8")
    cfg = {
        "run": {"name": name, "out_dir": str(tmp / "runs"), "work_dir": str(tmp / "work")},
        "data": {
            "sources": [{"path": str(corpus), "format": "text"}],
            "seq_len": 32,
            "shard_samples": 256,
            "val_fraction": 0.2,
            "num_proc": 1,
        },
        "tokenizer": {"vocab_size": 512, "num_threads": 1},
        "model": {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 2, "n_kv_heads": 1},
        "train": {
            "device": "cpu",
            "micro_batch": 2,
            "max_steps": 3,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
            "sample_tokens": 0,
            "collective_timeout_s": 120,
        },
        "checkpoint": {"every": 0, "keep_last": 3},
        "logging": {"tensorboard": False, "progress": False},
        "plan": {"gpus_per_node": 1},
    }
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def prepare_data(config: Path, timeout: int = 240) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megapt", "data", "prepare", "-c", str(config)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def write_micro_shards(d: Path, shard_samples: int) -> None:
    """``d/spm.model`` (vocab 512, trained on the stdlib ``json`` package) and ``d/shards``: the
    package's token stream (EOS between files) cut into rows of 33 tokens (seq_len 32); the first
    32 rows are ``val``, the rest ``train``, ``shard_samples`` rows per shard."""
    import json as json_pkg

    import numpy as np

    from megapt.config import load_config
    from megapt.data.shard import write_token_dataset
    from megapt.data.tokenizer import train_tokenizer

    cfg = load_config([], ["--tokenizer.vocab_size=512", "--tokenizer.num_threads=1"])
    texts = [
        f.read_text(encoding="utf-8") for f in sorted(Path(json_pkg.__file__).parent.glob("*.py"))
    ]
    tok = train_tokenizer(cfg.tokenizer, texts, d / "spm.model")
    ids = np.array([i for t in texts for i in tok.encode(t) + [tok.eos_id]])
    n = len(ids) // 33
    samples = ids[: n * 33].reshape(n, 33)
    write_token_dataset(
        d / "shards",
        {"train": list(samples[32:]), "val": list(samples[:32])},
        seq_len=32,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        tokenizer_sha256=tok.sha256,
        shard_samples=shard_samples,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path, netns: str | None = None) -> subprocess.Popen:
    """Start ``cmd`` (inside ``netns`` when given) in its own process group, output to ``log``."""
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    fh = open(log, "w")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every process; on timeout kill each process group (only the ones we started)."""
    deadline = time.time() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        raise
    return codes


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"<no {path}>"


@dataclass
class Hosts:
    netns: tuple[str, str]
    addrs: tuple[str, str] = ADDRS
    ifname: str = IFNAME


def netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' command not found"
    return None


@contextlib.contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair; yields Hosts. Raises RuntimeError(reason) when
    namespaces cannot be made (callers turn that into a skip)."""
    reason = netns_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    tag = f"{os.getpid() % 100000}"
    ns = (f"mpt{tag}a", f"mpt{tag}b")
    veth = (f"mpv{tag}a", f"mpv{tag}b")

    def ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    created: list[str] = []
    try:
        for n in ns:
            ip("netns", "add", n)
            created.append(n)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, addr in zip(ns, veth, ADDRS):
            ip("link", "set", v, "netns", n)  # from here on the veth end exists only inside n
            ip("-n", n, "link", "set", v, "name", IFNAME)
            ip("-n", n, "addr", "add", f"{addr}/24", "dev", IFNAME)
            ip("-n", n, "link", "set", IFNAME, "up")
            ip("-n", n, "link", "set", "lo", "up")
        yield Hosts(ns)
    finally:
        for n in created:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True, timeout=20)
        # a veth whose move failed is still in the root namespace: remove it (ours by name only)
        for v in veth:
            if subprocess.run(["ip", "link", "show", v], capture_output=True).returncode == 0:
                subprocess.run(["ip", "link", "delete", v], capture_output=True, timeout=20)
