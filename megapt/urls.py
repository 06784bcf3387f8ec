"""Where shards live: a local folder or a URL, and which package reads each URL scheme.

``data.shard_dir``, every ``data.mix[i].path``, ``megapt data shard --out`` and the other
shard-folder arguments take a local path or one of these URLs:

    s3://bucket/prefix      any S3-compatible store (AWS, MinIO, Ceph): pip install "megapt[s3]"
    gs://bucket/prefix      Google Cloud Storage (gcs:// too):           pip install "megapt[gcs]"
    https://host/path       read-only (http:// too):                      pip install "megapt[http]"
    file:///abs/path        the same as the local path /abs/path

Anything else that looks like a URL (``ftp://x``, ``s3:bucket`` without ``//``) is an error,
never a local folder: ``s3:/bucket`` must not become ``./s3:/bucket``. This module is the one
table of schemes; it imports nothing from megapt but the error types, so the config can check
locations when it loads.

    location("s3://b/shards")      -> "s3://b/shards" (a URL stays a string)
    location("runs/shards")        -> Path("runs/shards")
    location_problem("s3:b/x")     -> "... did you mean 's3://b/x'? ..."
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from megapt.errors import UsageError


@dataclass(frozen=True)
class Scheme:
    protocol: str  # the fsspec protocol
    extra: str  # the megapt extra that installs the package (pip install "megapt[<extra>]")
    module: str  # the package that must be importable
    writable: bool  # `megapt data shard --out` may upload there


SCHEMES: dict[str, Scheme] = {
    "s3": Scheme("s3", "s3", "s3fs", True),
    "gs": Scheme("gcs", "gcs", "gcsfs", True),
    "gcs": Scheme("gcs", "gcs", "gcsfs", True),
    "http": Scheme("http", "http", "aiohttp", False),
    "https": Scheme("http", "http", "aiohttp", False),
}
SUPPORTED = "s3://, gs://, https://, http://, file:// or a local path"

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
_BARE = re.compile(r"^(s3|gs|gcs|https?|file):/?(?!/)(.*)$", re.I | re.S)  # s3:b, s3:/b


def location_problem(text: str) -> str | None:
    """Why ``text`` is not a usable shard location (None when it is)."""
    m = _URL.match(text)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            return (
                None
                if rest.startswith("/")
                else (f"{text!r}: a file:// URL needs an absolute path (file:///abs/path)")
            )
        if scheme not in SCHEMES:
            return f"{text!r}: unsupported URL scheme {scheme + '://'!r}; use {SUPPORTED}"
        if not rest.split("/", 1)[0]:
            what = "host" if scheme.startswith("http") else "bucket"
            return f"{text!r}: no {what} after {scheme}://"
        return None
    m = _BARE.match(text)
    if m:
        return (
            f"{text!r} looks like a URL without '//': did you mean "
            f"'{m.group(1).lower()}://{m.group(2)}'? (a local folder with that name would need "
            f"'./{text}')"
        )
    return None


def is_url(text: str | Path) -> bool:
    """A remote URL (not file://)? Raises UsageError for a malformed or unsupported one."""
    if isinstance(text, Path):
        return False
    problem = location_problem(text)
    if problem:
        raise UsageError(problem)
    m = _URL.match(text)
    return m is not None and m.group(1).lower() != "file"


def location(text: str | Path) -> Path | str:
    """A shard location: a remote URL as a string (normalised: no trailing '/'), else a Path.
    Raises UsageError (exit 2) for an unsupported or malformed URL."""
    if isinstance(text, Path):
        return text
    remote = is_url(text)  # raises for a bad URL
    m = _URL.match(text)
    if m is None:
        return Path(text)
    scheme, rest = m.groups()
    if remote:
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return Path(rest)  # file:///abs -> /abs


def scheme_of(url: str) -> Scheme:
    m = _URL.match(url)
    if m is None or m.group(1).lower() not in SCHEMES:
        raise UsageError(f"{url!r}: not a URL of {', '.join(SCHEMES)}")
    return SCHEMES[m.group(1).lower()]


def join(base: Path | str, name: str) -> Path | str:
    """``base / name`` for a folder or a URL."""
    return base / name if isinstance(base, Path) else f"{base}/{name}"
