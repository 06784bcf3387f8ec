"""Shard locations: a URL is read as a URL or refused with one clear line, never taken for a local
folder (`s3:/bucket` once became `./s3:/bucket` and the corpus was prepared again there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megapt.cli import main
from megapt.data.remote import open_store
from megapt.errors import UsageError
from megapt.urls import location, location_problem


@pytest.mark.parametrize(
    "text,want",
    [
        ("s3://bucket/shards/seq64/", "s3://bucket/shards/seq64"),
        ("S3://bucket/x", "s3://bucket/x"),
        ("gs://b/p", "gs://b/p"),
        ("https://host:8080/data/set", "https://host:8080/data/set"),
        ("file:///abs/shards", Path("/abs/shards")),
        ("runs/shards", Path("runs/shards")),
        ("./s3:bucket", Path("./s3:bucket")),  # a local folder with a colon, spelled explicitly
    ],
)
def test_locations(text, want):
    assert location(text) == want


@pytest.mark.parametrize(
    "text,needle",
    [
        ("s3:/bucket/shards", "did you mean 's3://bucket/shards'"),
        ("s3:bucket/shards", "did you mean 's3://bucket/shards'"),
        ("ftp://host/x", "unsupported URL scheme 'ftp://'"),
        ("s3://", "no bucket after s3://"),
        ("https:///x", "no host after https://"),
        ("file://rel/path", "file:// URL needs an absolute path"),
    ],
)
def test_malformed_or_unsupported_urls_are_refused(text, needle):
    assert needle in location_problem(text)
    with pytest.raises(UsageError, match="'" + text):
        location(text)


@pytest.mark.parametrize(
    "override",
    ["--data.shard_dir=s3:/bucket/shards", "--data.mix=[{path: 'ftp://h/x', weight: 1}]"],
)
def test_train_with_a_bad_url_is_one_line_and_makes_no_local_folder(
    tmp_path, monkeypatch, capsys, override
):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "train",
            override,
            f"--run.work_dir={tmp_path / 'work'}",
            f"--run.out_dir={tmp_path / 'runs'}",
            "--logging.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert "megapt train: config error" in err and ("did you mean" in err or "ftp://" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing prepared, no ./s3:


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_scheme_without_its_package_names_the_extra(capsys):
    assert main(["data", "verify", "--dir", "gs://bucket/shards"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "megapt[gcs]"' in err and "gcsfs" in err


def test_http_is_read_only_before_any_request():
    store = open_store("https://127.0.0.1:9/never/contacted")
    with pytest.raises(UsageError, match="https:// is read-only for megapt"):
        store.write_bytes("manifest.json", b"{}")
