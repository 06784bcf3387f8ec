"""`megapt train` at world size 2 with no prepared data: rank 0 prepares it while rank 1 waits on
a status file, not inside a collective, so a preparation longer than train.collective_timeout_s
no longer kills the job; a node that does not share rank 0's storage gets a clear error telling
the user to prepare the data first, instead of training on nothing or waiting forever."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.integration.scale_utils import ROOT, base_env, free_port

TIMEOUT_S = 5  # train.collective_timeout_s: far shorter than preparing the built-in corpus
pytestmark = pytest.mark.slow

# the built-in corpus (the Python stdlib, ~30 MB cleaned): preparing it takes > 10 s on 2 cores
COMMON = [
    "--tokenizer.vocab_size=512",
    "--tokenizer.num_threads=1",
    "--data.seq_len=32",
    "--data.num_proc=1",
    "--model.n_layers=2",
    "--model.d_model=64",
    "--model.n_heads=2",
    "--model.n_kv_heads=1",
    "--train.device=cpu",
    "--train.micro_batch=2",
    "--train.max_steps=2",
    "--train.warmup_steps=1",
    "--train.eval_every=0",
    "--train.sample_tokens=0",
    "--checkpoint.every=0",
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--logging.all_ranks=true",
    f"--train.collective_timeout_s={TIMEOUT_S}",
]


@pytest.mark.timeout(500)
def test_ranks_wait_out_a_preparation_longer_than_the_collective_timeout(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "megapt.cli",
        "train",
        *COMMON,
        f"--run.work_dir={tmp_path / 'work'}",
        f"--run.out_dir={tmp_path / 'runs'}",
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=450)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-5000:]
    took = float(re.search(r"prepare: done in ([\d.]+)s", log).group(1))
    waited = float(re.search(r"rank 1: data ready after ([\d.]+) s of waiting", log).group(1))
    assert took > TIMEOUT_S and waited > TIMEOUT_S, (took, waited)  # the case at hand (~2x)
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert not list((tmp_path / "work" / "shards").rglob(".megapt-*"))  # no status files left


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private mount namespace",
)
def test_a_node_without_shared_storage_gets_a_clear_error(tmp_path):
    """Rank 1 runs in its own mount namespace where the work folder is an empty tmpfs: it stands
    for a second node that does not see rank 0's filesystem."""
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    args = [
        "-m",
        "megapt.cli",
        "train",
        *COMMON,
        f"--run.work_dir={work}",
        f"--run.out_dir={tmp_path / 'runs'}",
    ]
    procs = []
    for rank in (0, 1):
        env = base_env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            MEGAPT_PROBE_WAIT_S="3",
        )  # not 60 s: a tmpfs
        cmd = [sys.executable, *args]
        if rank == 1:
            inner = " ".join(map(_quote, cmd))
            cmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs {_quote(str(work))} && exec {inner}",
            ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 5, out[-2000:] + err[-4000:]
        line = [x for x in err.splitlines() if x.startswith("megapt train: data error:")]
        assert line and "Traceback" not in err, err[-4000:]
        assert "ranks [1]" in line[0] and "not on storage shared by every node" in line[0]
        assert "megapt data prepare" in line[0]
    assert not (work / "clean").exists()  # rank 0 did not start preparing for nothing


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
