"""Test helpers shared by every test file: a tiny real dataset and a loopback HTTP file server.

``build_tiny_dataset(out_dir)`` runs the real ``prepare`` on the first ~1 MB of the running
Python's standard library (a few seconds on 2 cores) and returns the manifest path. Build it once
per session; ``shared_tiny_dataset`` builds it once for all test files (``prepare`` is
idempotent, so later calls return at once)::

    @pytest.fixture(scope="session")
    def tiny_manifest(tmp_path_factory):
        return shared_tiny_dataset(tmp_path_factory)  # read-only: copy the folder to damage it
"""

from __future__ import annotations

import os
import random
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare_from_config


def tiny_data_config(out_dir: Union[str, os.PathLike], seq_len: int = 128, *, corpus_mb: float = 1.0,
                     shard_size_mb: float = 0.25, val_fraction: float = 0.05, tokenizer_type: str = "bpe",
                     seed: int = 1234, sources: Optional[list[Any]] = None, **overrides: Any) -> DataConfig:
    """A DataConfig for a small, fast build (uneven shards: the last one is smaller)."""
    cfg = DataConfig(sources=sources or ["stdlib"], dataset_dir=str(out_dir), seq_len=seq_len,
                     tokenizer_type=tokenizer_type, tokenizer_sample_mb=0.3, shard_size_mb=shard_size_mb,
                     val_fraction=val_fraction, seed=seed, max_corpus_mb=corpus_mb, num_workers=0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_dataset(out_dir: Union[str, os.PathLike], seq_len: int = 128, vocab_size: int = 2048,
                       **kwargs: Any) -> Path:
    """Build (or reuse, if already built with the same settings) a tiny dataset; returns the manifest path.

    Defaults: ~1 MB of stdlib text, ~2,700 rows of 129 tokens in ~12 shards of 0.25 MB, a val
    split of a few documents. ``kwargs`` go to ``tiny_data_config`` (corpus_mb, shard_size_mb, ...).
    """
    cfg = tiny_data_config(out_dir, seq_len, **kwargs)
    return prepare_from_config(cfg, vocab_size, quiet=True)


def shared_tiny_dataset(tmp_path_factory: Any) -> Path:
    """The default tiny dataset in the session's base temp folder, shared by every test file."""
    return build_tiny_dataset(Path(tmp_path_factory.getbasetemp()) / "tiny_data_shared")


def write_text_corpus(folder: Union[str, os.PathLike], n_docs: int = 60, words: Optional[list[str]] = None,
                      seed: int = 0, doc_words: int = 120) -> list[str]:
    """Write ``n_docs`` small .txt documents of seeded random words; returns the texts in file order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = words or ["alpha", "beta", "gamma", "delta", "kappa", "lambda", "sigma", "omega", "pi", "rho"]
    texts = []
    for i in range(n_docs):
        lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(doc_words // 12)]
        text = "\n".join(lines) + "\n"
        (folder / f"doc_{i:04d}.txt").write_text(text)
        texts.append(text)
    return texts


class _Handler(SimpleHTTPRequestHandler):
    """Static files; with ``ranges`` it answers ``Range: bytes=a-b`` with 206 (as nginx/S3 do)."""

    def __init__(self, *args: Any, ranges: bool, stats: dict, **kw: Any):
        self._ranges, self._stats = ranges, stats
        super().__init__(*args, **kw)

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _count(self, n: int) -> None:
        with self._stats["lock"]:
            self._stats["bytes"] += n
            self._stats["requests"] += 1

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not (self._ranges and rng and rng.startswith("bytes=") and os.path.isfile(path)):
            if os.path.isfile(path):
                self._count(os.path.getsize(path))
            return super().do_GET()
        size = os.path.getsize(path)
        lo_s, hi_s = rng[len("bytes="):].split("-", 1)
        lo, hi = int(lo_s), min(int(hi_s) if hi_s else size - 1, size - 1)
        if lo >= size or lo > hi:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(lo)
            body = f.read(hi - lo + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._count(len(body))


class FileServer:
    """A running loopback server: ``url`` (ends with '/'), ``bytes_sent``, ``requests``."""

    def __init__(self, folder: Union[str, os.PathLike], ranges: bool = True):
        self.stats = {"bytes": 0, "requests": 0, "lock": threading.Lock()}
        handler = partial(_Handler, directory=str(folder), ranges=ranges, stats=self.stats)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def bytes_sent(self) -> int:
        return self.stats["bytes"]

    @property
    def requests(self) -> int:
        return self.stats["requests"]


@contextmanager
def serve_directory(folder: Union[str, os.PathLike], ranges: bool = True) -> Iterator[FileServer]:
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; stopped on exit."""
    server = FileServer(folder, ranges)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)
