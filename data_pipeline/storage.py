"""Reading bytes from local paths and http(s) URLs: whole files, sizes, and byte ranges.

Shard rows are read with range requests (``Range: bytes=a-b``), so a rank transfers only its own
rows. A server that ignores ``Range`` (answers 200) gets the whole shard downloaded once into a
local cache (checked against its sha256, renamed into place), which is then read locally.
Transient network errors are retried with backoff; a missing file or a persistent failure is a
DataError naming the URL.

Local shards (and the local copies of remote ones) are memory-mapped while they are read; each
map holds a file descriptor, so a reader keeps at most ``OpenShards.capacity`` of them mapped
(least recently used ones are closed): a dataset of thousands of shards stays under the usual
1,024 open-files limit in every process.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, TypeVar
from urllib.parse import urljoin

import numpy as np

from data_pipeline.errors import CorruptData, DataError

_RETRIES = 4
_TIMEOUT = (10, 120)  # connect, read seconds
_warned: set[str] = set()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def fsync_dir(path: "os.PathLike[str] | str") -> None:
    """Make a rename (or a new entry) in ``path`` durable: fsync the directory itself (skipped where
    the filesystem refuses to open or fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: "os.PathLike[str] | str", data: "bytes | str | Callable[[Path], object]") -> Path:
    """Publish ``path`` all at once: write ``data`` (bytes, text, or ``data(tmp_path)`` for writers
    that open the file themselves) to a unique temporary sibling, fsync it, rename it over ``path``
    and fsync the folder. A reader sees the old file or the whole new one, never a part; on any
    error the temporary file is removed and ``path`` is untouched. The one implementation of
    atomic file publication in the project (checkpoints, exports, manifests, shards, metrics)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # a prepare cleanup matches *.tmp*
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create their files 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


T = TypeVar("T")


def atomic_dir(path: "os.PathLike[str] | str", build: "Callable[[Path], T]") -> T:
    """Publish the directory ``path`` all at once: ``build(tmp)`` fills a temporary sibling, every
    file in it and the folder are fsynced, and it is renamed to ``path`` (an existing ``path`` is
    moved aside first and removed after, so a reader sees the old folder or the whole new one).
    On any error the temporary folder is removed and ``path`` is untouched. Returns build's result."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        result = build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.is_dir() and any(path.iterdir()):
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)  # replaces an empty directory too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return result


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def join_location(base: str, name: str) -> str:
    """``name`` resolved against ``base`` (a directory path or a URL ending in '/')."""
    if is_url(name) or os.path.isabs(name):
        return name
    return urljoin(base, name) if is_url(base) else os.path.join(base, name)


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        print(f"[data] warning: {msg}", file=sys.stderr, flush=True)


_tls = threading.local()
_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
RANGE_CONCURRENCY = 4  # range requests in flight per process (x num_workers): latency bounds rows/s


def _http():
    """One requests.Session per thread and process (sessions must not cross a fork)."""
    if getattr(_tls, "pid", None) != os.getpid():
        import requests

        _tls.session, _tls.pid = requests.Session(), os.getpid()
    return _tls.session


def _range_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool, _pool_pid = ThreadPoolExecutor(RANGE_CONCURRENCY, thread_name_prefix="shard-range"), os.getpid()
    return _pool


def _request(method: str, url: str, headers: Optional[dict] = None, stream: bool = False):
    import requests

    last: Exception | None = None
    for attempt in range(_RETRIES):
        try:
            r = _http().request(method, url, headers=headers, stream=stream, timeout=_TIMEOUT)
            if r.status_code < 500:
                return r
            last = RuntimeError(f"HTTP {r.status_code}")
            r.close()
        except (requests.ConnectionError, requests.Timeout) as e:
            last = e
        if attempt + 1 < _RETRIES:
            time.sleep(0.25 * 2**attempt)
    raise DataError(f"{url}: unreachable after {_RETRIES} tries ({type(last).__name__}: {last})")


def read_bytes(location: str) -> bytes:
    """The whole content of a local path or URL."""
    if is_url(location):
        r = _request("GET", location)
        if r.status_code != 200:
            raise DataError(f"{location}: HTTP {r.status_code} (expected 200)")
        return r.content
    try:
        return Path(location).read_bytes()
    except OSError as e:
        raise DataError(f"{location}: cannot be read ({e.strerror or e})") from None


def size_of(location: str) -> Optional[int]:
    """Size in bytes, or None when the file does not exist."""
    if is_url(location):
        r = _request("HEAD", location)
        r.close()
        if r.status_code == 404:
            return None
        if r.status_code != 200 or "Content-Length" not in r.headers:
            raise DataError(f"{location}: HEAD gave HTTP {r.status_code} without a Content-Length")
        return int(r.headers["Content-Length"])
    try:
        return os.stat(location).st_size
    except FileNotFoundError:
        return None


def sha256_of(location: str) -> str:
    h = hashlib.sha256()
    if is_url(location):
        r = _request("GET", location, stream=True)
        if r.status_code != 200:
            raise DataError(f"{location}: HTTP {r.status_code} (expected 200)")
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
        return h.hexdigest()
    with open(location, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


DEFAULT_MAX_OPEN_SHARDS = 64  # mapped shards per reader and process (each holds one file descriptor)
# A file that cannot be opened for one of these reasons is not damaged: the process is out of
# descriptors or memory. Reported as such (DataError), never as a corrupt shard to skip.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class OpenShards:
    """The shards one reader has mapped, least recently used first; at most ``capacity`` at once.

    Shared by the ``ShardFile``s of one reader (``loader._RowSource``). Opening one more shard
    first closes the least recently used ones, so the number of descriptors and maps a process
    holds for its shards is bounded whatever the number of shards. Per process: a copy pickled
    into a worker starts empty, and maps inherited over ``fork`` are closed on first use in the
    child (closing them there leaves the parent's maps alone).
    """

    def __init__(self, capacity: int = DEFAULT_MAX_OPEN_SHARDS):
        if capacity < 1:
            raise DataError(f"max_open_shards={capacity} is invalid: must be >= 1")
        self.capacity = capacity
        self._open: "OrderedDict[ShardFile, None]" = OrderedDict()  # oldest first
        self._lock = threading.RLock()  # re-entered: closing an evicted file discards it here
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._open)

    def _forked(self) -> None:
        """Drop (and close, in this process only) the maps inherited from a parent process."""
        if self._pid != os.getpid():
            inherited, self._open, self._pid = list(self._open), OrderedDict(), os.getpid()
            for f in inherited:
                f.close()

    def used(self, f: "ShardFile") -> None:
        """``f`` (already mapped) was read: it becomes the most recently used."""
        with self._lock:
            self._forked()
            if f in self._open:
                self._open.move_to_end(f)

    def make_room(self, f: "ShardFile") -> None:
        """Close the least recently used shards so that ``f`` can be mapped within the capacity."""
        with self._lock:
            self._forked()
            self._open.pop(f, None)
            while len(self._open) >= self.capacity:
                old, _ = self._open.popitem(last=False)
                old.close()

    def add(self, f: "ShardFile") -> None:
        with self._lock:
            self._open[f] = None

    def discard(self, f: "ShardFile") -> None:
        with self._lock:
            self._open.pop(f, None)


class ShardFile:
    """Random access to the fixed-size records of one shard (local or remote).

    ``read(rows)`` returns records [k, record_bytes] for sorted, unique row ids and the number
    of bytes it had to transfer. Opened lazily, so instances can be pickled into workers. The
    local file (or the local copy of a remote one) stays mapped between reads until ``close()``;
    ``open_shards`` bounds how many shards of one reader are mapped at once (None: no bound, for
    a file used on its own).
    """

    def __init__(self, location: str, size: int, sha256: str, record_bytes: int, rows: int, cache_dir: Path,
                 open_shards: Optional[OpenShards] = None):
        self.location, self.size, self.sha256 = location, size, sha256
        self.record_bytes, self.rows, self.cache_dir = record_bytes, rows, cache_dir
        self.open_shards = open_shards
        self._mm: Optional[np.ndarray] = None  # [rows, record_bytes], a view of _map
        self._map: Optional[mmap.mmap] = None
        self._mm_pid = -1
        self._ranges_ok = True

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"], state["_map"], state["_mm_pid"] = None, None, -1
        return state

    def close(self) -> None:
        """Unmap the shard and release its descriptor (it is mapped again on the next read)."""
        mm, self._mm = self._map, None
        self._map, self._mm_pid = None, -1
        if self.open_shards is not None:
            self.open_shards.discard(self)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view of it is still alive somewhere: it closes when that goes
                pass

    def _local(self, path: str) -> np.ndarray:
        if self._mm is not None and self._mm_pid == os.getpid():
            if self.open_shards is not None:
                self.open_shards.used(self)
            return self._mm
        if self._mm is not None:  # inherited over fork: this process maps the file itself
            self.close()
        if self.open_shards is not None:
            self.open_shards.make_room(self)  # close first, so the bound holds while this one opens
        need = self.rows * self.record_bytes
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # holds a dup of the descriptor
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno in _RESOURCE_ERRNOS:
                raise DataError(f"shard {path}: cannot be opened ({e.strerror}): the process is out of file "
                                "descriptors or memory; raise `ulimit -n` or lower max_open_shards") from None
            raise CorruptData(f"shard {path}: cannot be read ({e}); re-run `slam-pretrain prepare`") from None
        if len(mm) < need:
            size = len(mm)
            mm.close()
            raise CorruptData(f"shard {path} is truncated ({size} bytes, {self.rows} rows need {need}); "
                              "re-run `slam-pretrain prepare`")
        arr = np.frombuffer(mm, dtype=np.uint8, count=need)
        self._map, self._mm, self._mm_pid = mm, arr.reshape(self.rows, self.record_bytes), os.getpid()
        if self.open_shards is not None:
            self.open_shards.add(self)
        return self._mm

    def runs(self, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(first index, end index, first byte, last byte) of each stretch of consecutive rows."""
        breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [rows.size])).tolist()
        R = self.record_bytes
        return [(s, e, int(rows[s]) * R, (int(rows[s]) + e - s) * R - 1) for s, e in zip(starts, ends)]

    def get_range(self, lo: int, hi: int) -> Optional[bytes]:
        """Bytes lo..hi (inclusive) over HTTP, or None when the server ignores Range."""
        r = _request("GET", self.location, headers={"Range": f"bytes={lo}-{hi}"})
        if r.status_code == 200:
            r.close()
            return None
        if r.status_code == 404:
            raise CorruptData(f"shard {self.location}: HTTP 404 (missing); re-run `slam-pretrain prepare`")
        body = r.content
        if r.status_code == 416 or (r.status_code == 206 and len(body) != hi - lo + 1):
            raise CorruptData(f"shard {self.location}: range {lo}-{hi} gave HTTP {r.status_code} with "
                              f"{len(body)} bytes (truncated shard?)")
        if r.status_code != 206:
            raise DataError(f"shard {self.location}: range {lo}-{hi} gave HTTP {r.status_code} "
                            "(expected 206 Partial Content)")
        return body

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, int]:
        """Records [k, record_bytes] of sorted row ids [k], and the bytes transferred."""
        return read_many([(self, rows)])[0]

    def _fallback(self, rows: np.ndarray) -> tuple[np.ndarray, int]:
        first = self._ranges_ok
        if first:
            warn_once(f"{self.location.rsplit('/', 1)[0]}/ ignores HTTP Range requests: "
                      f"downloading whole shards into {self.cache_dir}")
            self._ranges_ok = False
        return self._local(str(self._cached_copy()))[rows], self.size if first else 0

    def _cached_copy(self) -> Path:
        name = self.location.rstrip("/").rsplit("/", 1)[-1]
        path = self.cache_dir / name
        if path.exists() and path.stat().st_size == self.size:
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        r = _request("GET", self.location, stream=True)
        if r.status_code != 200:
            raise DataError(f"shard {self.location}: HTTP {r.status_code} (expected 200)")

        def download(tmp: Path) -> None:  # checked before it is published
            h = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != self.sha256:
                raise CorruptData(f"shard {self.location}: sha256 mismatch after download (corrupted shard); "
                                  "re-run `slam-pretrain prepare` or set data.skip_corrupt_shards=true")

        return atomic_write(path, download)


def read_many(requests_: list[tuple[ShardFile, np.ndarray]]) -> list[tuple[np.ndarray, int]]:
    """``ShardFile.read`` for several shards at once; remote ranges are fetched concurrently."""
    out: list[Optional[tuple[np.ndarray, int]]] = [None] * len(requests_)
    jobs = []  # (request index, first, end, lo, hi)
    for i, (f, rows) in enumerate(requests_):
        if not is_url(f.location):
            out[i] = (f._local(f.location)[rows], int(rows.size) * f.record_bytes)
        elif not f._ranges_ok:
            out[i] = f._fallback(rows)
        else:
            jobs.extend((i, *run) for run in f.runs(rows))
    if jobs:
        fetch = lambda job: requests_[job[0]][0].get_range(job[3], job[4])  # noqa: E731
        bodies = list(_range_pool().map(fetch, jobs)) if len(jobs) > 1 else [fetch(jobs[0])]
        recs = {i: np.empty((requests_[i][1].size, requests_[i][0].record_bytes), dtype=np.uint8)
                for i in {j[0] for j in jobs}}
        no_ranges = set()
        for (i, s, e, lo, hi), body in zip(jobs, bodies):
            if body is None:
                no_ranges.add(i)
            else:
                recs[i][s:e] = np.frombuffer(body, dtype=np.uint8).reshape(e - s, -1)
        for i, rec in recs.items():
            f, rows = requests_[i]
            out[i] = f._fallback(rows) if i in no_ranges else (rec, int(rows.size) * f.record_bytes)
    return out  # type: ignore[return-value]
