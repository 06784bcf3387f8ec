"""Shard sets at a URL, against real servers this module starts on 127.0.0.1: moto's S3 server
(a real S3 HTTP API) and `python -m http.server`. No traffic leaves the machine.

What users rely on: a remote set streams exactly the global order of the same set on disk (any
world size, with or without workers, after a resume at another world size); a rank downloads
only the shards its positions touch; a cache smaller than the set still gives the same stream;
a server that stops answering for a while is ridden out by retries, one that is gone ends in an
error naming the URL; bad_shard_policy applies to shards missing remotely; `megapt data shard`
uploads (split jobs too, manifest last) and the tiny model trains from s3:// exactly as from disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megapt.cli import main
from megapt.config import RemoteConfig
from megapt.data.loader import build_loader
from megapt.data.manifest import load_manifest
from megapt.data.tarformat import ShardError
from tests.integration.scale_utils import ROOT, base_env, prepare_data, write_micro_config
from tests.integration.servers import HttpServer, S3Server
from tests.unit.loader_util import data_cfg, ids_of, loaders, make_set, run_global

N = 100  # samples: 7 shards of 16 (ids 0-15 in train-000-00000.tar, ...), the last one of 4
B = 4
URL = "s3://bkt/set"
pytestmark = [pytest.mark.infra, pytest.mark.slow]  # real S3 (moto) and HTTP servers


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory):
    """Credentials and endpoint variables for this process (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def s3(tmp_path_factory, aws_env):
    d = tmp_path_factory.mktemp("s3")
    srv = S3Server(d / "moto.log")
    for k, v in srv.env(d).items():
        aws_env.setenv(k, v)
    srv.make_bucket("bkt")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("local") / "set"
    make_set(d, N, val=20)
    return d


@pytest.fixture(scope="module")
def uploaded(s3, local_set):
    s3.upload_dir(local_set, "bkt", "set")
    return URL


@pytest.fixture(scope="module")
def reference(local_set):
    """Three epochs of the global order from the set on disk (one rank, no workers)."""
    order, _ = run_global(loaders(data_cfg(), local_set, 1, B), 3 * N // B)
    return order


def remote(tmp: Path, **kw) -> RemoteConfig:
    kw.setdefault("retries", 2)
    kw.setdefault("retry_wait_s", 0.2)
    kw.setdefault("timeout_s", 5.0)
    return RemoteConfig(cache_dir=str(tmp), **kw)


def _shard_of(i: int) -> str:
    return f"train-000-{i // 16:05d}.tar"


# --------------------------------------------------------------------------------------------
# Streaming from S3
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("W,workers", [(1, 0), (2, 2), (3, 0)])
def test_s3_set_streams_the_global_order_of_the_set_on_disk(
    uploaded, reference, tmp_path, W, workers
):
    cfg = data_cfg(remote=remote(tmp_path / "cache"))
    lds = loaders(cfg, uploaded, W, B, workers=workers)
    order, state = run_global(lds, 2 * N // (W * B) + 1)
    assert order == reference[: len(order)]
    assert state["sets"][0]["path"] == URL  # the same state dict as local, naming the URL
    stats = [ld.remote_stats for ld in lds]
    assert sum(s["downloads"] for s in stats) >= 7  # every shard came over the network


@pytest.mark.timeout(300)
def test_each_rank_downloads_only_the_shards_its_positions_touch(uploaded, tmp_path):
    """4 ranks x micro batch 16 = one shard per rank per step without shuffling: rank r reads
    shards r, r + 4 only; each rank has its own cache (as on separate nodes)."""
    m = load_manifest(uploaded, remote(tmp_path / "m"))
    size = {e["name"]: e["bytes"] for e in m["splits"]["train"]["shards"]}
    for r in range(4):
        cfg = data_cfg(shuffle=False, remote=remote(tmp_path / f"rank{r}"))
        ld = build_loader(
            cfg,
            uploaded,
            "train",
            rank=r,
            world_size=4,
            micro_batch=16,
            seed=0,
            infinite=False,
            pin_memory=False,
        )
        ids = [i for batch in ld for _, i in ids_of(batch)]
        touched = {_shard_of(i) for i in ids}
        assert touched == {f"train-000-{k:05d}.tar" for k in range(r, 7, 4)}
        assert sorted(name for _, name in ld.downloaded) == sorted(touched)
        assert ld.remote_stats["bytes"] == sum(size[n] for n in touched)


@pytest.mark.timeout(300)
def test_resume_at_another_world_size_from_s3_sees_every_sample_once(uploaded, reference, tmp_path):
    cfg = data_cfg(remote=remote(tmp_path / "a"))
    first, state = run_global(loaders(cfg, uploaded, 2, 3, workers=2), 7)  # 42 samples
    cfg2 = data_cfg(remote=remote(tmp_path / "b"))  # another node: a cold cache
    rest, _ = run_global(loaders(cfg2, uploaded, 3, 2, state=state), 12)  # 12 steps after
    both = first + rest
    assert both == reference[: len(both)]
    assert sorted(i for _, i in both[:N]) == list(range(N))


def _cached_bytes(root):
    """Bytes of the shards in the cache now. The prefetch threads evict while the test looks, so
    a file listed a moment ago may be gone by the time its size is read: it counts as 0."""
    total = 0
    for p in root.rglob("*.tar"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


@pytest.mark.timeout(300)
def test_a_cache_smaller_than_the_set_gives_the_same_stream(uploaded, reference, tmp_path):
    m = load_manifest(uploaded, remote(tmp_path / "m"))
    shard_bytes = max(e["bytes"] for e in m["splits"]["train"]["shards"])
    cap = 3 * shard_bytes  # 3 of the 7 shards
    cfg = data_cfg(remote=remote(tmp_path / "cache", cache_gb=cap / 1e9, prefetch=1))
    (ld,) = loaders(cfg, uploaded, 1, B)
    it = iter(ld)
    order, peak = [], 0
    for _ in range(2 * N // B):
        order += ids_of(next(it))
        peak = max(peak, _cached_bytes(tmp_path / "cache"))
    it.close()
    assert order == reference[: len(order)]
    stats = ld.remote_stats
    assert stats["evicted"] > 0 and stats["downloads"] > 7  # epoch 2 fetched shards again
    assert peak <= cap + shard_bytes  # at most one download ahead of the trim
    assert _cached_bytes(tmp_path / "cache") <= cap


@pytest.mark.timeout(300)
def test_a_missing_remote_shard_follows_bad_shard_policy(s3, local_set, tmp_path):
    s3.upload_dir(local_set, "bkt", "holes")
    url, gone = "s3://bkt/holes", "train-000-00002.tar"  # ids 32..47
    kw = dict(shuffle=False, max_bad_fraction=0.2)
    strict = build_loader(
        data_cfg(remote=remote(tmp_path / "r"), **kw),
        url,
        "train",
        rank=0,
        world_size=1,
        micro_batch=B,
        seed=0,
        pin_memory=False,
    )
    skip = build_loader(
        data_cfg(remote=remote(tmp_path / "s"), bad_shard_policy="skip", **kw),
        url,
        "train",
        rank=0,
        world_size=1,
        micro_batch=B,
        seed=0,
        pin_memory=False,
    )
    s3.delete("bkt", f"holes/{gone}")  # after start-up: gone while training
    ids = []
    for batch in skip:
        ids += [i for _, i in ids_of(batch)]
        if len(ids) >= N:
            break
    assert len(ids) == N and not set(range(32, 48)) & set(ids)  # full batches, filled
    assert (0, gone) in skip.bad_shards
    with pytest.raises(
        ShardError, match=f"{url}/{gone}: shard listed in the manifest is not there"
    ) as err:
        for _ in strict:
            pass
    assert err.value.exit_code == 5


@pytest.mark.timeout(300)
def test_a_server_that_stops_answering_for_a_while_is_ridden_out_by_retries(
    local_set, tmp_path, monkeypatch, caplog
):
    srv = S3Server(tmp_path / "moto.log")
    for k, v in srv.env(tmp_path).items():
        monkeypatch.setenv(k, v)
    try:
        srv.make_bucket("bkt")
        srv.upload_dir(local_set, "bkt", "set")
        cfg = data_cfg(
            shuffle=False,
            remote=remote(
                tmp_path / "c",
                s3_endpoint_url=srv.url,
                retries=6,
                retry_wait_s=0.5,
                timeout_s=1.0,
                prefetch=1,
            ),
        )
        (ld,) = loaders(cfg, URL, 1, B)
        it = iter(ld)
        ids = [i for _ in range(2) for _, i in ids_of(next(it))]  # shard 0 is in
        srv.pause()  # SIGSTOP: connections hang, requests time out
        threading.Timer(4.0, srv.resume).start()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="megapt.data.remote"):
            while len(ids) < N:
                ids += [i for _, i in ids_of(next(it))]
        it.close()
        assert ids == list(range(N))  # no shuffle: the manifest order, nothing lost
        assert time.monotonic() - t0 > 3.0  # it did wait for the server
        retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert retried and all(URL + "/train-000-" in m for m in retried), retried
    finally:
        srv.kill()


@pytest.mark.timeout(300)
def test_a_server_gone_for_good_ends_in_an_error_naming_the_url(local_set, tmp_path, monkeypatch):
    srv = S3Server(tmp_path / "moto.log")
    for k, v in srv.env(tmp_path).items():
        monkeypatch.setenv(k, v)
    try:
        srv.make_bucket("bkt")
        srv.upload_dir(local_set, "bkt", "set")
        cfg = data_cfg(
            shuffle=False,
            remote=remote(
                tmp_path / "c",
                s3_endpoint_url=srv.url,
                retries=2,
                retry_wait_s=0.2,
                timeout_s=1.0,
                prefetch=1,
            ),
        )
        (ld,) = loaders(cfg, URL, 1, B)
        it = iter(ld)
        ids = [i for _ in range(3) for _, i in ids_of(next(it))]
        srv.kill()  # SIGKILL mid-epoch
        with pytest.raises(ShardError) as err:
            while True:
                ids += [i for _, i in ids_of(next(it))]
        text = str(err.value)
        assert err.value.exit_code == 5
        assert f"{URL}/train-000-0000" in text and "failed after 3 attempt(s)" in text, text
        assert ids == list(range(len(ids))) and len(ids) >= 12  # what came before was right
    finally:
        srv.kill()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_http_set_streams_the_same_order_and_is_read_only(local_set, reference, tmp_path, capsys):
    root = tmp_path / "www"
    shutil.copytree(local_set, root / "set")
    shutil.copytree(local_set, root / "holes")
    (root / "holes" / "train-000-00004.tar").unlink()
    srv = HttpServer(root, tmp_path / "http.log")
    try:
        cfg = data_cfg(remote=remote(tmp_path / "c"))
        order, _ = run_global(loaders(cfg, f"{srv.url}/set", 2, 2, workers=2), N // 4 + 3)
        assert order == reference[: len(order)]
        with pytest.raises(
            ShardError,
            match=f"{srv.url}/holes/train-000-00004.tar: shard listed in the manifest is not there",
        ):
            run_global(
                loaders(data_cfg(remote=remote(tmp_path / "d")), f"{srv.url}/holes", 1, B), N // B
            )
        rc = main(
            ["data", "index", f"{srv.url}/set", "--vocab-size=60000", "--eos-id=1", "--force"]
        )  # reads every shard over HTTP, then may not write
        assert rc == 2 and "is read-only for megapt" in capsys.readouterr().err
        # train never prepares data into a URL: without a manifest it says what to run
        from megapt.config import load_config
        from megapt.data.prepare import ensure_data_for_ranks

        cfg = load_config(
            [], [f"--data.shard_dir={srv.url}/nothing-here", f"--run.work_dir={tmp_path / 'work'}"]
        )
        with pytest.raises(
            ShardError,
            match="nothing-here/manifest.json not found: train reads "
            "shards from a URL but does not make them",
        ):
            ensure_data_for_ranks(cfg, rank=0, world_size=1, gather=lambda x: [x])
        assert not (tmp_path / "work").exists()
    finally:
        srv.kill()


# --------------------------------------------------------------------------------------------
# Writing to S3 and training from it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("micro")
    cfg = write_micro_config(tmp)
    prepare_data(cfg)
    return tmp, cfg


@pytest.mark.timeout(300)
def test_split_shard_jobs_upload_to_s3_and_merge_there(s3, micro, capsys):
    tmp, cfg = micro
    url = "s3://bkt/split"
    common = ["-c", str(cfg), f"--data.remote.cache_dir={tmp / 'cache'}"]
    assert main(["data", "shard", *common, "--out", url, "--num-shards=2", "--shard-index=0"]) == 0
    with pytest.raises(ShardError, match="not found, but 1 partial manifest"):
        load_manifest(url)  # job 1 has not run: no manifest.json yet
    assert main(["data", "shard", *common, "--out", url, "--num-shards=2", "--shard-index=1"]) == 0
    assert main(["data", "merge", *common, "--dir", url]) == 0
    m = load_manifest(url)
    local = load_manifest(tmp / "work" / "shards" / "seq32")
    for split in ("train", "val"):  # a K-way split holds exactly the samples of one job
        assert m["splits"][split]["samples"] == local["splits"][split]["samples"]
    assert main(["data", "verify", *common, "--dir", url]) == 0
    assert "0 bad" in capsys.readouterr().out
    assert not list((tmp / "cache" / "upload").rglob("*.tar"))  # staged copies were removed


@pytest.mark.timeout(400)
def test_tiny_model_trains_from_s3_exactly_as_from_disk(s3, micro, tmp_path):
    tmp, cfg = micro
    url = "s3://bkt/micro/seq32"
    local = tmp / "work" / "shards" / "seq32"
    assert (
        main(
            [
                "data",
                "shard",
                "-c",
                str(cfg),
                "--out",
                url,
                f"--data.remote.cache_dir={tmp_path / 'up'}",
            ]
        )
        == 0
    )
    ours = load_manifest(url)
    theirs = load_manifest(local)
    assert ours["splits"] == theirs["splits"]  # byte-identical shards (sha256) went up
    env = base_env(**s3.env(tmp_path))
    curves = {}
    for name, shard_dir in (("disk", str(local)), ("s3", url)):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "megapt",
                "train",
                "-c",
                str(cfg),
                f"--run.name={name}",
                f"--data.shard_dir={shard_dir}",
                "--train.max_steps=6",
                "--train.micro_batch=4",
                f"--data.remote.cache_dir={tmp_path / 'cache'}",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [
            json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        curves[name] = [r["loss"] for r in rows if r["kind"] == "train"]
        if name == "s3":
            assert f"loader train: {url}" in p.stderr
    assert len(curves["s3"]) == 6 and curves["s3"] == curves["disk"]
