"""Reliability of `megapt train` under faults (issue 9), on CPU with a micro model and gloo.

* SIGKILL while a checkpoint is being written: the previous checkpoint stays loadable, the
  unfinished ``step_*.tmp`` is never loaded, ``--resume`` picks the previous one.
* SIGTERM (one process, and one of 2 ranks only): every rank saves at the next step boundary and
  exits 75; ``--resume`` continues from that step.
* A corrupt checkpoint file (sha256 mismatch): ``--resume`` falls back to the older valid one,
  ``checkpoint.load`` of the corrupt one exits 4 naming the file.
* Bad shards through the trainer: missing shard -> exit 5 at start-up; corrupt shard -> exit 5 with
  policy raise; skipped and training finishes with policy skip (bounded by data.max_bad_fraction);
  a member name escaping the folder is skipped like a corrupt shard.
* A rank that stalls before a collective: its peer fails after train.collective_timeout_s.

Fault hooks (a save that blocks, a rank that stalls) are monkeypatches applied by this file's own
``__main__`` before it calls ``megapt.cli.run``; nothing in megapt knows about them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
MICRO = [
    "--model.n_layers=2",
    "--model.d_model=64",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--data.seq_len=32",
    "--train.micro_batch=2",
    "--train.warmup_steps=2",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--train.sample_tokens=0",
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--train.collective_timeout_s=120",
    "--train.device=cpu",
    "--data.shuffle=false",
]
SHARD_SAMPLES = 32  # ~20 train shards: one bad shard is ~5% of them
START_TIMEOUT = (
    240  # one micro run: torch + DeepSpeed import and engine set-up dominate on a loaded 2-core box
)


def _env(**extra: str) -> dict:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for k in (
        "MEGAPT_FAULT_NAN_STEPS",
        "MEGAPT_FAULT_NAN_RANK",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(k, None)
    env.update(extra)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(
        [sys.executable, str(HERE), mode, *args],
        cwd=log.parent,
        env=_env(**env),
        stdout=f,
        stderr=subprocess.STDOUT,
    )


def _wait(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
        raise


def _train_rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if r.get("kind") == "train":
            out.append(r)
    return out


def _wait_for(cond, timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    t0 = time.time()
    while not cond():
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"process exited ({dead}) before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def _ckpts(run_dir: Path) -> list[str]:
    d = run_dir / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# --------------------------------------------------------------------------------------------
# data: a real tokenizer (vocab 512) and shards written by megapt's writer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.integration.scale_utils import write_micro_shards

    d = tmp_path_factory.mktemp("reliability")
    write_micro_shards(d, SHARD_SAMPLES)
    common = MICRO + [
        f"--tokenizer.path={d / 'spm.model'}",
        f"--data.shard_dir={d / 'shards'}",
        f"--run.out_dir={d / 'runs'}",
    ]
    return {"dir": d, "runs": d / "runs", "shards": d / "shards", "common": common}


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _train_shards(shard_dir: Path) -> list[str]:
    m = json.loads((shard_dir / "manifest.json").read_text())
    return [e["name"] for e in m["splits"]["train"]["shards"]]


def _flip_byte(p: Path, offset: int) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0xFF
    p.write_bytes(bytes(b))


def _unsafe_member_shard(shard_dir: Path, name: str) -> None:
    """Rewrite one shard so a member is named ``../../evil.tokens``; the manifest agrees with the new bytes
    (size + sha256), so only the member-name check can catch it."""
    p = shard_dir / name
    with tarfile.open(p) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    members[1] = ("../../evil.tokens", members[1][1])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for mname, payload in members:
            info = tarfile.TarInfo(mname)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    p.write_bytes(buf.getvalue())
    m = json.loads((shard_dir / "manifest.json").read_text())
    for e in m["splits"]["train"]["shards"]:
        if e["name"] == name:
            e["bytes"], e["sha256"] = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    (shard_dir / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------------------------
# 1 + 2: SIGKILL inside a save, then SIGTERM, then resume (one process)
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(3 * START_TIMEOUT + 60)
def test_kill_during_save_keeps_previous_checkpoint_then_sigterm_saves_and_resume_continues(
    data, tmp_path
):
    run = data["runs"] / "kill"
    common = data["common"] + ["--run.name=kill", "--checkpoint.keep_last=1"]
    marker = tmp_path / "saving"

    # (a) the second save (step 4) blocks after DeepSpeed wrote its files, before the manifest: SIGKILL it
    p = _start(
        "slow-save",
        common + ["--checkpoint.every=2", "--train.max_steps=6"],
        tmp_path / "a.log",
        RELIABILITY_BLOCK_SAVE="2",
        RELIABILITY_MARKER=str(marker),
    )
    try:
        _wait_for(marker.exists, START_TIMEOUT, [p], "the second checkpoint save")
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    from megapt.train.checkpoint import find_latest_valid, verify_checkpoint

    ck = run / "checkpoints"
    log_a = (tmp_path / "a.log").read_text()
    assert _ckpts(run) == ["step_0000002", "step_0000004.tmp"], log_a[-3000:]
    assert any((ck / "step_0000004.tmp" / "ds").iterdir())  # killed mid-save, not before it
    assert verify_checkpoint(ck / "step_0000002") == []
    assert find_latest_valid(ck).name == "step_0000002"

    # (b) --resume picks step 2 (the .tmp is never loaded); SIGTERM -> checkpoint at the next boundary, exit 75
    p = _start(
        "cli",
        common + ["--resume", "--checkpoint.every=0", "--train.max_steps=100000"],
        tmp_path / "b.log",
    )
    try:
        _wait_for(
            lambda: any(r["step"] >= 5 for r in _train_rows(run)), START_TIMEOUT, [p], "step 5"
        )
        p.send_signal(signal.SIGTERM)
        rc = _wait(p, 120)
    finally:
        if p.poll() is None:
            p.kill()
    log_b = (tmp_path / "b.log").read_text()
    assert rc == 75, log_b[-3000:]
    assert "resumed from" in log_b and "step_0000002" in log_b, log_b[-3000:]
    (saved,) = _ckpts(run)  # keep_last=1: the preemption checkpoint only, the stale .tmp removed
    s = int(saved.split("_")[1])
    assert s >= 5 and verify_checkpoint(ck / saved) == []
    assert (
        max(r["step"] for r in _train_rows(run)) == s
    )  # saved at the boundary of the last step it logged
    # (a) logged steps 3-4 before it was killed; (b) re-ran them from step 2: one row per step
    # remains, the replaced rows are kept aside
    assert [r["step"] for r in _train_rows(run)] == list(range(1, s + 1))
    aside = [json.loads(x) for x in (run / "metrics-superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in aside if r["kind"] == "train"] == [3, 4]

    # (c) --resume continues after the preemption step
    before = len(_train_rows(run))
    p = _start(
        "cli",
        common + ["--resume", "--checkpoint.every=0", f"--train.max_steps={s + 2}"],
        tmp_path / "c.log",
    )
    rc = _wait(p, START_TIMEOUT)
    log_c = (tmp_path / "c.log").read_text()
    assert rc == 0, log_c[-3000:]
    assert f"step_{s:07d}" in log_c and "resumed from" in log_c
    assert [r["step"] for r in _train_rows(run)[before:]] == [s + 1, s + 2]
    assert [r["step"] for r in _train_rows(run)] == list(range(1, s + 3))


@pytest.mark.timeout(START_TIMEOUT + 60)
def test_preemption_signal_during_start_up_still_exits_75(data, tmp_path):
    marker = tmp_path / "starting"
    p = _start(
        "slow-init",
        data["common"] + ["--run.name=early", "--train.max_steps=50", "--checkpoint.every=0"],
        tmp_path / "early.log",
        RELIABILITY_MARKER=str(marker),
    )
    try:
        _wait_for(marker.exists, START_TIMEOUT, [p], "start-up")
        p.send_signal(
            signal.SIGUSR1
        )  # Slurm's --signal=USR1@120 warning, arriving before the first step
        rc = _wait(p, START_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 75, (rc, (tmp_path / "early.log").read_text()[-2000:])


# --------------------------------------------------------------------------------------------
# SIGKILL of the trainer: its DataLoader workers die with it (issue 15, item 10)
# --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status waits for its new parent


@pytest.mark.timeout(START_TIMEOUT + 60)
def test_sigkill_of_the_trainer_takes_its_loader_workers_with_it(data, tmp_path):
    """`megapt train` with data.loader_workers=2, killed with SIGKILL mid-training: both workers are
    gone within 5 s (they used to live on as orphans, ~300 MB each, for minutes). micro_batch 64 x
    seq 32 makes one worker message (16 micro-steps, 67 KB) larger than a pipe's buffer: the case
    where a worker whose parent died blocked at exit forever."""
    run = data["runs"] / "orphans"
    args = [
        "--run.name=orphans",
        "--data.loader_workers=2",
        "--train.micro_batch=64",
        "--train.max_steps=100000",
        "--checkpoint.every=0",
    ]
    p = _start("cli", data["common"] + args, tmp_path / "o.log")
    workers: list[int] = []
    survivors: list[int] = []
    try:
        _wait_for(lambda: len(_train_rows(run)) >= 2, START_TIMEOUT, [p], "step 2")
        workers = _children(p.pid)
        assert len(workers) == 2, (workers, (tmp_path / "o.log").read_text()[-2000:])
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 5:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
    finally:
        if p.poll() is None:
            p.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert not survivors, f"DataLoader workers {survivors} outlived the killed trainer by > 5 s"


# --------------------------------------------------------------------------------------------
# 2: SIGTERM to one of two ranks
# --------------------------------------------------------------------------------------------


def _start_two_ranks(
    mode: str, args: list[str], tmp_path: Path, tag: str, **env: str
) -> list[subprocess.Popen]:
    port = str(_port())
    return [
        _start(
            mode,
            args,
            tmp_path / f"{tag}{r}.log",
            RANK=str(r),
            WORLD_SIZE="2",
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **env,
        )
        for r in (0, 1)
    ]


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.mark.timeout(2 * START_TIMEOUT + 60)
def test_sigterm_to_one_of_two_ranks_checkpoints_all_ranks_and_resumes(data, tmp_path):
    run = data["runs"] / "preempt2"
    common = data["common"] + ["--run.name=preempt2", "--checkpoint.every=0"]
    procs = _start_two_ranks("cli", common + ["--train.max_steps=100000"], tmp_path, "a")
    try:
        _wait_for(
            lambda: any(r["step"] >= 3 for r in _train_rows(run)), START_TIMEOUT, procs, "step 3"
        )
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only; rank 0 never sees a signal
        codes = [_wait(p, 120) for p in procs]
    finally:
        _stop_all(procs)
    logs = [(tmp_path / f"a{r}.log").read_text() for r in (0, 1)]
    assert codes == [75, 75], "\n".join(log[-2000:] for log in logs)
    assert "a peer rank's signal" in logs[0] or "SIGTERM" in logs[0]
    (saved,) = _ckpts(run)
    s = int(saved.split("_")[1])
    ds = run / "checkpoints" / saved / "ds"
    from megapt.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(run / "checkpoints" / saved) == []
    rng = json.loads((run / "checkpoints" / saved / "rng.json").read_text())
    assert len(rng["ranks"]) == 2 and any(ds.iterdir())  # both ranks took part in the save

    before = len(_train_rows(run))
    procs = _start_two_ranks(
        "cli", common + ["--resume", f"--train.max_steps={s + 2}"], tmp_path, "b"
    )
    try:
        codes = [_wait(p, START_TIMEOUT) for p in procs]
    finally:
        _stop_all(procs)
    log0 = (tmp_path / "b0.log").read_text()
    assert codes == [0, 0], log0[-3000:]
    assert "resumed from" in log0 and saved in log0
    assert [r["step"] for r in _train_rows(run)[before:]] == [s + 1, s + 2]


# --------------------------------------------------------------------------------------------
# 1 + 4: corrupt checkpoint and data faults through `megapt train` (one driver process)
# --------------------------------------------------------------------------------------------


def _driver(actions: list[dict], tmp_path: Path) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"actions": actions, "out": str(tmp_path / "results.json")}))
    p = _start("driver", [str(spec)], tmp_path / "driver.log")
    rc = _wait(p, 420)
    assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]
    return json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def faults(data, tmp_path_factory):
    """Every scenario of this fixture runs `megapt train` (megapt.cli.main) inside one process, in order;
    each result is {rc, err} (err = what the run wrote to stderr)."""
    tmp = tmp_path_factory.mktemp("faults")
    base = data["common"] + ["--train.max_steps=3", "--checkpoint.every=0"]
    names = _train_shards(data["shards"])
    n = len(names)
    assert n >= 15  # one bad shard <= 1/15 < data.max_bad_fraction=0.1 below

    missing = _copy_shards(data["shards"], tmp / "missing")
    (missing / names[n // 2]).unlink()
    corrupt = _copy_shards(data["shards"], tmp / "corrupt")
    _flip_byte(
        corrupt / names[0], 512 + 8
    )  # a token of the first sample: same size, sha256 differs
    truncated = _copy_shards(data["shards"], tmp / "truncated")
    (truncated / names[0]).write_bytes((truncated / names[0]).read_bytes()[:3000])
    two_bad = _copy_shards(data["shards"], tmp / "two_bad")
    _flip_byte(two_bad / names[0], 512 + 8)
    _flip_byte(two_bad / names[1], 512 + 8)
    unsafe = _copy_shards(data["shards"], tmp / "unsafe")
    _unsafe_member_shard(unsafe, names[0])

    ck = data["runs"] / "ckfall" / "checkpoints"
    actions = [
        {"name": "missing", "argv": base + ["--run.name=missing", f"--data.shard_dir={missing}"]},
        {
            "name": "corrupt_raise",
            "argv": base + ["--run.name=craise", f"--data.shard_dir={corrupt}"],
        },
        {
            "name": "truncated_raise",
            "argv": base
            + [
                "--run.name=traise",
                f"--data.shard_dir={truncated}",
                "--data.verify_checksums=false",
            ],
        },
        {
            "name": "corrupt_skip",
            "argv": base
            + [
                "--run.name=cskip",
                f"--data.shard_dir={corrupt}",
                "--data.bad_shard_policy=skip",
                "--data.max_bad_fraction=0.1",
            ],
        },
        {
            "name": "too_many_bad",
            "argv": base
            + [
                "--run.name=tmb",
                f"--data.shard_dir={two_bad}",
                "--data.bad_shard_policy=skip",
                f"--data.max_bad_fraction={1.5 / n}",
            ],
        },
        {
            "name": "unsafe_raise",
            "argv": base + ["--run.name=uraise", f"--data.shard_dir={unsafe}"],
        },
        {
            "name": "unsafe_skip",
            "argv": base
            + [
                "--run.name=uskip",
                f"--data.shard_dir={unsafe}",
                "--data.bad_shard_policy=skip",
                "--data.max_bad_fraction=0.1",
            ],
        },
        # checkpoints at steps 1 and 2, then step 2's weights file is corrupted (same size)
        {
            "name": "ck_make",
            "argv": base
            + [
                "--run.name=ckfall",
                "--train.max_steps=2",
                "--checkpoint.every=1",
                "--checkpoint.keep_last=3",
            ],
        },
        {"flip": str(ck / "step_0000002" / "ds" / "mp_rank_00_model_states.pt"), "offset": -100},
        {
            "name": "ck_load_corrupt",
            "argv": base + ["--run.name=ckload", f"--checkpoint.load={ck / 'step_0000002'}"],
        },
        {"name": "ck_resume", "argv": base + ["--run.name=ckfall", "--resume"]},
        # a checkpoint whose weights file is a pickle that runs code, with a manifest that agrees with it
        {
            "evil": str(ck / "step_0000001"),
            "dst": str(tmp / "evil" / "step_0000001"),
            "marker": str(tmp / "evil_ran"),
        },
        {
            "name": "evil_load",
            "argv": base
            + ["--run.name=evil", f"--checkpoint.load={tmp / 'evil' / 'step_0000001'}"],
            "marker": str(tmp / "evil_ran"),
        },
    ]
    return _driver(actions, tmp), names


@pytest.mark.timeout(600)
def test_missing_shard_is_a_startup_error_of_megapt_train(faults, data):
    res, names = faults
    r = res["missing"]
    assert r["rc"] == 5, r["err"][-2000:]
    assert names[len(names) // 2] in r["err"] and "missing" in r["err"]
    assert not (data["runs"] / "missing" / "metrics.jsonl").exists()  # not a single step trained


@pytest.mark.timeout(600)
def test_corrupt_shard_policy_raise_stops_training_naming_the_shard(faults):
    res, names = faults
    r = res["corrupt_raise"]
    assert r["rc"] == 5, r["err"][-2000:]
    assert names[0] in r["err"] and "sha256" in r["err"]
    r = res["truncated_raise"]  # without checksums the size/tar structure checks still catch it
    assert r["rc"] == 5, r["err"][-2000:]
    assert names[0] in r["err"] and ("size mismatch" in r["err"] or "truncated" in r["err"])


@pytest.mark.timeout(600)
def test_corrupt_shard_policy_skip_trains_on_and_reports_it(faults, data):
    res, names = faults
    r = res["corrupt_skip"]
    assert r["rc"] == 0, r["err"][-2000:]
    assert "skipping bad shard" in r["err"] and names[0] in r["err"]
    assert [x["step"] for x in _train_rows(data["runs"] / "cskip")] == [1, 2, 3]
    # the skipped shard is in metrics.jsonl (a data row at the step that met it, a count in the
    # train rows, the list at the end) and in the final summary line, not only in a warning
    metrics = (data["runs"] / "cskip" / "metrics.jsonl").read_text().splitlines()
    data_rows = [x for x in map(json.loads, metrics) if x["kind"] == "data"]
    assert [x.get("bad_shard") for x in data_rows[:-1]] == [names[0]]
    assert "sha256" in data_rows[0]["reason"]
    assert data_rows[-1]["step"] == 3
    assert [Path(x).name for x in data_rows[-1]["bad_shards"]] == [names[0]]
    assert _train_rows(data["runs"] / "cskip")[-1]["bad_shards"] == 1
    summary = r["err"].split("done:")[1]
    assert "1 bad shard(s) skipped" in summary and f"corrupt/{names[0]}" in summary


@pytest.mark.timeout(600)
def test_skip_policy_stops_once_bad_shards_exceed_max_bad_fraction(faults):
    res, _ = faults
    r = res["too_many_bad"]
    assert r["rc"] == 5, r["err"][-2000:]
    assert "2 of" in r["err"] and "bad" in r["err"]


@pytest.mark.timeout(600)
def test_member_name_escaping_the_folder_is_refused_or_skipped(faults, data):
    res, names = faults
    assert res["unsafe_raise"]["rc"] == 5 and "unsafe" in res["unsafe_raise"]["err"], res[
        "unsafe_raise"
    ]["err"][-2000:]
    r = res["unsafe_skip"]
    assert r["rc"] == 0, r["err"][-2000:]
    assert names[0] in r["err"] and "unsafe" in r["err"]
    assert (
        not (data["dir"] / "evil.tokens").exists() and not (data["runs"] / "evil.tokens").exists()
    )


@pytest.mark.timeout(600)
def test_corrupt_checkpoint_is_rejected_and_resume_falls_back(faults, data):
    res, _ = faults
    assert res["ck_make"]["rc"] == 0, res["ck_make"]["err"][-2000:]
    r = res["ck_load_corrupt"]
    assert r["rc"] == 4, r["err"][-2000:]
    assert "mp_rank_00_model_states.pt" in r["err"] and "sha256 mismatch" in r["err"]
    r = res["ck_resume"]
    assert r["rc"] == 0, r["err"][-2000:]
    assert "not valid, trying an older one" in r["err"] and "step_0000001" in r["err"]
    rows = _train_rows(data["runs"] / "ckfall")
    assert [x["step"] for x in rows] == [1, 2, 3]  # steps 2-3 redone from the step-1 checkpoint ...
    aside = (data["runs"] / "ckfall" / "metrics-superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside if '"train"' in x] == [
        2
    ]  # ... the first step 2 aside


@pytest.mark.timeout(600)
def test_checkpoint_with_a_pickle_payload_is_refused_by_the_trainer_without_running_it(faults):
    res, _ = faults
    r = res["evil_load"]
    assert not r["code_ran"], "loading the checkpoint ran code from it"
    assert r["rc"] == 4, r["err"][-2000:]


# --------------------------------------------------------------------------------------------
# 7: the checkpoint disk fills up during a save of `megapt train`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_full(data, tmp_path_factory):
    """Checkpoints on a 3 MiB tmpfs: the step-2 checkpoint (~1.1 MB) fits, the step-4 one does not."""
    from megapt.train.checkpoint import find_latest_valid, verify_checkpoint

    tmp = tmp_path_factory.mktemp("diskfull")
    disk = tmp / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs to simulate a full disk: {r.stderr.strip() or r.returncode}"
        )
    try:
        p = _start(
            "cli",
            data["common"]
            + [
                "--run.name=diskfull",
                "--train.max_steps=6",
                "--checkpoint.every=2",
                f"--checkpoint.dir={disk / 'ck'}",
            ],
            tmp / "run.log",
        )
        rc = _wait(p, START_TIMEOUT)
        ck = disk / "ck"
        latest = find_latest_valid(ck)
        return {
            "rc": rc,
            "log": (tmp / "run.log").read_text(),
            "names": sorted(x.name for x in ck.iterdir()),
            "latest": latest.name if latest else None,
            "step2_problems": verify_checkpoint(ck / "step_0000002"),
            "dir": str(ck),
        }
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


@pytest.mark.timeout(START_TIMEOUT + 60)
def test_disk_full_during_a_training_save_stops_and_keeps_the_previous_checkpoint(disk_full):
    assert disk_full["rc"] not in (0, 75), disk_full["log"][-2000:]
    assert disk_full["step2_problems"] == [] and disk_full["latest"] == "step_0000002", disk_full
    assert (
        "step_0000004" not in disk_full["names"]
    )  # at most step_0000004.tmp, which is never loaded


@pytest.mark.timeout(START_TIMEOUT + 60)
def test_disk_full_during_a_training_save_says_so(disk_full):
    log = disk_full["log"]
    assert disk_full["rc"] == 4, log[-2000:]
    assert "space" in log.lower() and disk_full["dir"] in log, log[-2000:]


# --------------------------------------------------------------------------------------------
# 6: a stalled rank inside training
# --------------------------------------------------------------------------------------------

STALL_TIMEOUT = (
    20  # also bounds the rendezvous and the engine's start-up broadcasts: not too small under load
)


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_rank_stalled_before_a_collective_fails_its_peer_after_collective_timeout(data, tmp_path):
    """Rank 1 sleeps at step 3 (before its forward, so before the gradient all-reduce); rank 0 must fail
    with an error naming the collective after ~train.collective_timeout_s, not hang."""
    marker = tmp_path / "stalled"
    args = data["common"] + [
        "--run.name=stall",
        "--train.max_steps=50",
        "--checkpoint.every=0",
        f"--train.collective_timeout_s={STALL_TIMEOUT}",
    ]
    procs = _start_two_ranks(
        "stall",
        args,
        tmp_path,
        "s",
        RELIABILITY_STALL_RANK="1",
        RELIABILITY_STALL_ATTEMPT="3",
        RELIABILITY_MARKER=str(marker),
    )
    try:
        _wait_for(marker.exists, START_TIMEOUT, procs, "rank 1 to stall")
        try:
            rc0 = procs[0].wait(STALL_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"rank 0 still waiting {STALL_TIMEOUT + 30}s after its peer stalled "
                f"(train.collective_timeout_s={STALL_TIMEOUT})"
            )
    finally:
        _stop_all(procs)
    log0 = (tmp_path / "s0.log").read_text()
    assert rc0 not in (0, 75), log0[-3000:]
    assert "timed out" in log0.lower() and "all_reduce" in log0, log0[-3000:]


# --------------------------------------------------------------------------------------------
# fault hooks: `python test_reliability_train.py MODE megapt-train-args...`
# --------------------------------------------------------------------------------------------


def _install_hooks(mode: str) -> None:
    if mode == "slow-save":  # the N-th save blocks after DeepSpeed's files, before the manifest
        from megapt.train import checkpoint as ck

        orig, n = ck.write_manifest, [0]

        def blocking(path):
            n[0] += 1
            if n[0] == int(os.environ["RELIABILITY_BLOCK_SAVE"]):
                Path(os.environ["RELIABILITY_MARKER"]).write_text(str(path))
                time.sleep(3600)
            return orig(path)

        ck.write_manifest = blocking
    elif (
        mode == "slow-init"
    ):  # start-up (Trainer.__init__, before fit) pauses while choosing the checkpoint
        from megapt.train import checkpoint as ck

        orig_resolve = ck.resolve_checkpoint

        def slow_resolve(*a, **kw):
            Path(os.environ["RELIABILITY_MARKER"]).write_text("starting")
            time.sleep(5)
            return orig_resolve(*a, **kw)

        ck.resolve_checkpoint = slow_resolve
    elif mode == "stall":  # one rank sleeps at the start of one step attempt
        from megapt.train import trainer as tr

        orig_step = tr.Trainer.train_step

        def stalled(self):
            if self.rank == int(os.environ["RELIABILITY_STALL_RANK"]) and self.attempt + 1 == int(
                os.environ["RELIABILITY_STALL_ATTEMPT"]
            ):
                Path(os.environ["RELIABILITY_MARKER"]).write_text("stalled")
                time.sleep(3600)
            return orig_step(self)

        tr.Trainer.train_step = stalled


class _RunsCode:
    """Pickles to a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run_driver(spec_path: str) -> int:
    import contextlib

    from megapt.cli import main
    from megapt.train import dist

    # one process group for all the runs: DeepSpeed keeps its groups across engines, so a group
    # destroyed by one run's cli_main and created again by the next would not be DeepSpeed's
    dist.destroy = lambda: None
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for act in spec["actions"]:
        if "flip" in act:
            p = Path(act["flip"])
            _flip_byte(p, p.stat().st_size + act["offset"])
            continue
        if "evil" in act:
            import shutil

            import torch

            from megapt.train.checkpoint import write_manifest

            shutil.copytree(act["evil"], act["dst"])
            torch.save(
                {"module": _RunsCode(act["marker"])},
                Path(act["dst"]) / "ds" / "mp_rank_00_model_states.pt",
            )
            write_manifest(Path(act["dst"]))
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(["train"] + act["argv"])
            except BaseException as exc:  # noqa: BLE001 - recorded; the test decides
                rc = f"{type(exc).__name__}: {exc}"
        results[act["name"]] = {"rc": rc, "err": err.getvalue()}
        if "marker" in act:
            results[act["name"]]["code_ran"] = Path(act["marker"]).exists()
        print(act["name"], rc, flush=True)
    Path(spec["out"]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    _mode, _args = sys.argv[1], sys.argv[2:]
    if _mode == "driver":
        from megapt.train.dist import exit_process

        exit_process(_run_driver(_args[0]))  # no interpreter tear-down: see exit_process
    _install_hooks(_mode)
    from megapt.cli import run

    run(["train"] + _args)
