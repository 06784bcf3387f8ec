"""Shard sets at a URL: one store interface, retries with backoff, and the local shard cache.

``open_store(location, remote_cfg)`` gives the same small interface over a local folder
(``LocalStore``) and a URL (``RemoteStore``, fsspec: s3fs for ``s3://``, gcsfs for ``gs://``,
aiohttp for ``https://``; megapt.urls has the table): read an object, list a folder, fetch a
file, upload a file, write JSON, delete. Writes are atomic: a local file goes to ``.tmp`` then
``os.replace``; an object store makes an object visible only once its upload is complete.

Every remote call is retried ``data.remote.retries`` times on transient errors (connection
refused or reset, timeouts, 5xx, throttling), waiting ``retry_wait_s``, then twice as long each
time (at most 60 s); a missing object or refused credentials are not retried. When the retries
are spent the error (ShardError, exit 5) names the URL, the attempts and the last cause. The
S3 endpoint is ``data.remote.s3_endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, else AWS; credentials and region come from the usual AWS variables or
files (botocore). A scheme whose package is missing is a clear error naming the extra to install.

``ShardCache`` keeps local copies of one remote set's shards in ``data.remote.cache_dir``: a
shard is fetched whole the first time a process needs it (or earlier: ``prefetch`` queues the
shards the reader will need next, fetched by background threads), its size and sha256 are
checked against the manifest once, on download, and only then is it renamed into the cache
(``<sha256[:16]>-<name>``, so a re-sharded set never reads a stale copy). Processes on a node
share the folder: a per-shard lock makes one of them download while the others wait. After
each download the cache is trimmed to ``cache_gb``: least recently used shards first, never one
this process has queued or is reading; a cap smaller than those is exceeded with a warning.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import getpass
import hashlib
import importlib
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from megapt.config import RemoteConfig
from megapt.data.tarformat import ShardError
from megapt.errors import UsageError
from megapt.urls import Scheme, location, scheme_of

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WAIT_S = 60.0
PART = ".megapt-part-"  # a download in progress: <cached name>.megapt-part-<pid>-<thread>


# --------------------------------------------------------------------------------------------
# Filesystems (one per process: fsspec's async filesystems must not cross a fork)
# --------------------------------------------------------------------------------------------

_FILESYSTEMS: dict[tuple, Any] = {}


def s3_endpoint(cfg: RemoteConfig) -> str | None:
    return (
        cfg.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _require(url: str, scheme: Scheme) -> None:
    try:
        importlib.import_module(scheme.module)
    except ImportError:
        raise UsageError(
            f"{url}: reading {url.split('://')[0]}:// URLs needs the {scheme.module} "
            f'package: pip install "megapt[{scheme.extra}]"'
        ) from None


def filesystem(url: str, cfg: RemoteConfig) -> Any:
    """The fsspec filesystem for ``url``'s scheme with megapt's settings (cached per process)."""
    scheme = scheme_of(url)
    _require(url, scheme)
    import fsspec

    t = float(cfg.timeout_s)
    key: tuple = (os.getpid(), scheme.protocol, t)
    if scheme.protocol == "s3":
        key += (s3_endpoint(cfg),)
    fs = _FILESYSTEMS.get(key)
    if fs is not None:
        return fs
    common = {"skip_instance_cache": True, "use_listings_cache": False}
    if scheme.protocol == "s3":
        # one attempt per call inside botocore and s3fs: the retries are ours (counted, logged)
        fs = fsspec.filesystem(
            "s3",
            endpoint_url=s3_endpoint(cfg),
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": t, "read_timeout": t},
            **common,
        )
        fs.retries = 1
    elif scheme.protocol == "http":
        import aiohttp

        fs = fsspec.filesystem(
            "http",
            client_kwargs={
                "timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
            },
            **common,
        )
    else:
        fs = fsspec.filesystem(scheme.protocol, **common)
    _FILESYSTEMS[key] = fs
    return fs


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------

_PERMANENT_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "NoRegionError",
    "ParamValidationError",
    "InvalidS3AddressingStyleError",
}
_TRANSIENT: tuple[type, ...] | None = None


def _transient_types() -> tuple[type, ...]:
    global _TRANSIENT
    if _TRANSIENT is None:
        found: list[type] = [OSError, TimeoutError, ConnectionError]
        for module, names in (
            ("botocore.exceptions", ("BotoCoreError", "ClientError")),
            ("aiohttp", ("ClientError",)),
            ("fsspec.exceptions", ("FSTimeoutError",)),
        ):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            found += [getattr(mod, n) for n in names if hasattr(mod, n)]
        _TRANSIENT = tuple(found)
    return _TRANSIENT


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def with_retries(fn: Callable[[], T], url: str, cfg: RemoteConfig, what: str) -> T:
    """``fn()``, retried on transient errors; FileNotFoundError passes through untouched; other
    failures end in a ShardError naming ``url``."""
    attempts = int(cfg.retries) + 1
    wait = float(cfg.retry_wait_s)
    t0 = time.monotonic()
    last: BaseException | None = None
    for k in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, UsageError):
            raise
        except PermissionError as exc:
            raise ShardError(
                f"{url}: {what}: access denied ({_why(exc)}); check the "
                f"credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / gcloud auth)"
            ) from None
        except Exception as exc:  # classified below; bugs are re-raised
            if type(exc).__name__ in _PERMANENT_NAMES:
                raise ShardError(
                    f"{url}: {what}: {_why(exc)}; check the credentials, region and "
                    f"endpoint (data.remote.s3_endpoint_url)"
                ) from None
            if not isinstance(exc, _transient_types()):
                raise
            last = exc
            if k + 1 < attempts:
                log.warning(
                    "%s: %s failed (%s); retry %d of %d in %.1f s",
                    url,
                    what,
                    _why(exc),
                    k + 1,
                    attempts - 1,
                    wait,
                )
                time.sleep(wait)
                wait = min(2 * wait, MAX_WAIT_S)
    assert last is not None
    raise ShardError(
        f"{url}: {what} failed after {attempts} attempt(s) in "
        f"{time.monotonic() - t0:.1f} s: {_why(last)}; check the network, the "
        f"endpoint (data.remote.s3_endpoint_url / AWS_ENDPOINT_URL) and "
        f"data.remote.retries"
    )


# --------------------------------------------------------------------------------------------
# Stores: a local folder or a URL behind one interface
# --------------------------------------------------------------------------------------------


class LocalStore:
    """A shard folder on a (possibly shared) filesystem."""

    is_remote = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def local_path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()  # FileNotFoundError when missing

    def list(self) -> dict[str, int]:
        """File name -> size of the folder's files (not recursive); {} when it does not exist."""
        if not self.root.is_dir():
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(self.root) if e.is_file()}

    def get(self, name: str, dest: Path) -> None:
        import shutil

        shutil.copyfile(self.root / name, dest)

    def put(self, src: Path, name: str) -> None:
        dest = self.root / name
        if Path(src).resolve() == dest.resolve():
            return
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write to ``name.tmp``, fsync, then rename: readers see the old or the new file."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / name
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteStore:
    """A shard "folder" at a URL (fsspec), every call retried (see the module docstring)."""

    is_remote = True

    def __init__(self, root: str, cfg: RemoteConfig):
        self.root, self.cfg = root.rstrip("/"), cfg
        self.scheme = scheme_of(root)
        self.fs = filesystem(root, cfg)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def local_path(self, name: str) -> None:
        return None

    def _retry(self, fn: Callable[[], T], name: str, what: str) -> T:
        return with_retries(fn, self.url(name) if name else self.root, self.cfg, what)

    def exists(self, name: str) -> bool:
        return bool(self._retry(lambda: self.fs.exists(self.url(name)), name, "exists"))

    def read_bytes(self, name: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self.url(name)), name, "read")

    def list(self) -> dict[str, int]:
        def ls() -> dict[str, int]:
            try:
                items = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
            out = {}
            for it in items:
                if it.get("type") == "file":
                    out[it["name"].rstrip("/").rsplit("/", 1)[-1]] = int(it.get("size") or 0)
            return out

        return self._retry(ls, "", "list")

    def get(self, name: str, dest: Path) -> None:
        self._retry(lambda: self.fs.get_file(self.url(name), str(dest)), name, "download")

    def check_writable(self) -> None:
        if not self.scheme.writable:
            raise UsageError(
                f"{self.root}: {self.root.split('://')[0]}:// is read-only for "
                f"megapt; write shards to a folder, s3:// or gs://"
            )

    def put(self, src: Path, name: str) -> None:
        self.check_writable()
        self._retry(lambda: self.fs.put_file(str(src), self.url(name)), name, "upload")

    def write_bytes(self, name: str, data: bytes) -> None:
        self.check_writable()
        self._retry(lambda: self.fs.pipe_file(self.url(name), data), name, "upload")

    def delete(self, name: str) -> None:
        self.check_writable()

        def rm() -> None:
            try:
                self.fs.rm_file(self.url(name))
            except FileNotFoundError:
                pass

        self._retry(rm, name, "delete")


Store = LocalStore | RemoteStore


def open_store(where: str | os.PathLike, cfg: RemoteConfig | None = None) -> Store:
    """The store of a shard folder or URL (UsageError for an unsupported URL)."""
    loc = location(str(where) if not isinstance(where, Path) else where)
    if isinstance(loc, Path):
        return LocalStore(loc)
    return RemoteStore(loc, cfg or RemoteConfig())


def write_json(store: Store, name: str, obj: Any) -> None:
    store.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------
# The local shard cache
# --------------------------------------------------------------------------------------------


def cache_root(cfg: RemoteConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"megapt-shard-cache-{user}"


def set_dirname(url: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def _data_files(root: Path) -> list[tuple[float, int, Path]]:
    """(mtime, size, path) of every cached shard under ``root`` (locks and partial files not)."""
    out = []
    for sub in os.scandir(root) if root.is_dir() else []:
        if not sub.is_dir():
            continue
        for e in os.scandir(sub.path):
            if e.name.endswith((".lock", ".tmp")) or PART in e.name:
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, Path(e.path)))
    return out


class ShardCache:
    """Local, verified copies of one remote set's shards (see the module docstring).

    ``read(j)`` returns shard ``j``'s bytes (fetching it when needed; ShardError naming the URL
    after the retries); ``prefetch(js)`` queues shards in the order they will be needed.
    ``stats``: downloads and bytes fetched by this process, cache hits, and the seconds the
    caller waited for shards (``wait_s``: the stall the reader saw).
    """

    def __init__(
        self,
        store: RemoteStore,
        entries: list[dict],
        cfg: RemoteConfig,
        *,
        depth: int,
        threads: int = 4,
    ):
        self.store, self.entries, self.cfg = store, entries, cfg
        self.root = cache_root(cfg)
        self.dir = self.root / set_dirname(store.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cap = int(cfg.cache_gb * 1e9)
        self.depth = max(1, int(depth))
        self.threads = max(1, min(int(threads), self.depth))
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.busy: set[int] = set()  # being fetched or read by this process
        self._queue: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._warned_cap = False
        self.stats = {
            "downloads": 0,
            "bytes": 0,
            "hits": 0,
            "wait_s": 0.0,
            "evicted": 0,
            "retried_reads": 0,
        }
        self.downloaded: list[str] = []  # shard names this process downloaded, in order

    def path(self, j: int) -> Path:
        e = self.entries[j]
        return self.dir / f"{e['sha256'][:16]}-{e['name']}"

    # ---- reading ----

    def read(self, j: int) -> bytes:
        t0 = time.perf_counter()
        try:
            for _ in range(3):
                with self._lock:
                    fut = self.pending.pop(j, None)
                path = None
                if fut is not None:
                    try:
                        path = fut.result()
                    except ShardError as exc:  # a background fetch gave up: try again now
                        log.info("prefetch of %s failed (%s); fetching it now", self.url(j), exc)
                if path is None:
                    path = self._fetch(j)
                try:
                    data = path.read_bytes()
                    os.utime(path)  # recently used
                    return data
                except FileNotFoundError:  # evicted by another process between fetch and read
                    self.stats["retried_reads"] += 1
            raise ShardError(
                f"{self.url(j)}: the cached copy keeps disappearing from {self.dir}; "
                f"data.remote.cache_gb is too small for the processes sharing it"
            )
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0
            with self._lock:
                self.busy.discard(j)

    def url(self, j: int) -> str:
        return self.store.url(self.entries[j]["name"])

    def prefetch(self, js: Iterable[int]) -> None:
        """Queue the first ``depth`` of ``js`` (in order of need) that are not local yet."""
        queued = 0
        for j in js:
            if queued >= self.depth:
                break
            queued += 1
            if j in self.pending:
                continue
            p = self.path(j)
            if p.exists():
                try:
                    os.utime(p)  # needed soon: the last to be evicted
                except FileNotFoundError:
                    pass
                else:
                    continue
            fut: concurrent.futures.Future = concurrent.futures.Future()
            with self._lock:
                self.pending[j] = fut
                self.busy.add(j)
            self._queue.put((j, fut))
            self._start_workers()

    def _start_workers(self) -> None:
        while len(self._workers) < self.threads:
            t = threading.Thread(
                target=self._work, daemon=True, name=f"megapt-prefetch-{len(self._workers)}"
            )
            t.start()
            self._workers.append(t)

    def _work(self) -> None:
        while True:
            j, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._fetch(j))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader via the future
                fut.set_exception(exc)

    # ---- fetching ----

    def _fetch(self, j: int) -> Path:
        """Shard ``j`` in the cache: downloaded, size- and sha256-checked, renamed in."""
        with self._lock:
            self.busy.add(j)
        final = self.path(j)
        entry = self.entries[j]
        if self._usable(final, entry):
            with self._lock:
                self.stats["hits"] += 1
            return final
        with open(final.with_name(final.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the node downloads, the rest wait
            try:
                if self._usable(final, entry):
                    with self._lock:
                        self.stats["hits"] += 1
                    return final
                self._download(j, final)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._trim()
        return final

    def _usable(self, path: Path, entry: dict) -> bool:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size == entry["bytes"]:
            return True
        path.unlink(missing_ok=True)  # truncated by a full disk or a crash: fetch again
        return False

    def _download(self, j: int, final: Path) -> None:
        entry, url = self.entries[j], self.url(j)
        tmp = final.with_name(f"{final.name}{PART}{os.getpid()}-{threading.get_ident()}")

        def once() -> None:
            try:
                self.store.fs.get_file(url, str(tmp))
                size = tmp.stat().st_size
                if size != entry["bytes"]:  # a cut transfer: retried
                    raise ConnectionError(f"got {size} bytes, the manifest says {entry['bytes']}")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        try:
            with_retries(once, url, self.cfg, "download")
        except FileNotFoundError:
            raise ShardError(
                f"{url}: shard listed in the manifest is not there; re-run the shard "
                f"job that wrote it (`megapt data shard --out ...`)"
            ) from None
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        if h.hexdigest() != entry["sha256"]:
            tmp.unlink(missing_ok=True)
            raise ShardError(
                f"{url}: sha256 mismatch: {h.hexdigest()[:16]}... downloaded, the "
                f"manifest says {entry['sha256'][:16]}... (corrupt or replaced shard)"
            )
        os.replace(tmp, final)
        with self._lock:  # prefetch threads and the reader count here
            self.stats["downloads"] += 1
            self.stats["bytes"] += entry["bytes"]
            self.downloaded.append(entry["name"])

    def _trim(self) -> None:
        """Evict least recently used shards until the cache fits ``cache_gb`` (see the module
        docstring)."""
        files = _data_files(self.root)
        total = sum(size for _, size, _ in files)
        if total <= self.cap:
            return
        with self._lock:
            keep = {self.path(j) for j in self.busy | set(self.pending)}
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.cap:
                break
            if path in keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= size
            with self._lock:
                self.stats["evicted"] += 1
        if total > self.cap and not self._warned_cap:
            self._warned_cap = True
            log.warning(
                "shard cache %s holds %.2f GB, over data.remote.cache_gb=%g: the shards "
                "this process needs soon do not fit; raise the cap (or lower "
                "data.remote.prefetch)",
                self.root,
                total / 1e9,
                self.cfg.cache_gb,
            )
