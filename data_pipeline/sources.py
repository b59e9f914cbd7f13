"""Corpus sources: the embedded stdlib corpus and user files, read in a stable order.

A source is ``"stdlib"`` (this Python's standard library: every ``.py`` file as a code document
in sorted path order, then every ``pydoc_data`` topic as a prose document, sorted by name) or a
mapping ``{path, weight, text_field}`` where ``path`` is a file, a directory (searched
recursively) or a glob of ``.txt`` (one document per file), ``.jsonl`` and ``.jsonl.gz`` (one
document per line, the string at ``text_field``). Files are read in sorted path order.

Mixing weights are *shares of the written text*: with weights w_i, source i makes up about
w_i / sum(w) of the text bytes written (train + val), and the total written is about the size of
all sources together (or ``max_corpus_mb``). A source whose share is larger than itself is
repeated (whole passes plus a seeded random part of its documents); a smaller share keeps a
seeded random subset of documents. Which documents are kept, repeated or held out for
validation depends only on (seed, source index, document index): reproducible, no ``hash()``.

Undecodable bytes never stop a build: they become U+FFFD and are counted in the summary. A
``.txt`` file that is not text at all (mostly NUL or non-UTF-8 bytes: a binary file with a text
name) is an error naming it.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
STDLIB = "stdlib"


# Undecodable input: replace with U+FFFD and count the bytes replaced (per process).
class DecodeStats:
    bad_bytes = 0
    bad_docs = 0
    first_culprit: Optional[str] = None


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    DecodeStats.bad_bytes += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("slam_count_replace", _count_replace)


def decode_text(raw: bytes, culprit: str) -> str:
    """UTF-8 decode; undecodable bytes become U+FFFD and are counted in ``DecodeStats``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        DecodeStats.bad_docs += 1
        if DecodeStats.first_culprit is None:
            DecodeStats.first_culprit = culprit
        return raw.decode("utf-8", errors="slam_count_replace")


NOT_TEXT_FRACTION = 0.05  # NUL or undecodable bytes beyond this share: binary, not text with a few bad bytes


def not_text(raw: bytes, probe: int = 1 << 20) -> Optional[str]:
    """Why ``raw`` is not UTF-8 text (None when it is, or is text with a few bad bytes).

    Looks at the first ``probe`` bytes: NUL bytes (never in text; UTF-16 has one every other
    byte) and bytes that are not UTF-8 together above NOT_TEXT_FRACTION mean a binary file (an
    image, an archive, a PDF) given a .txt name; a few bad bytes are replaced and counted instead.
    """
    head = raw[:probe]
    if not head:
        return None
    nul = head.count(0)
    undecodable = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if nul + undecodable <= NOT_TEXT_FRACTION * len(head):
        return None
    return (f"{100 * (nul + undecodable) / len(head):.0f}% of its first {len(head):,} bytes are NUL or not "
            "UTF-8: a binary file")


@dataclass
class Source:
    """One resolved entry of ``data.sources``."""

    index: int
    kind: str  # "stdlib" or "files"
    path: str  # as written in the config
    weight: float
    text_field: str
    files: list[Path] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"data.sources[{self.index}]"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path, "weight": self.weight}
        if self.kind == STDLIB:
            out["python"] = sys.version.split()[0]
        else:
            out["files"] = len(self.files)
            out["text_field"] = self.text_field
        return out

    def disk_bytes(self) -> int:
        """Bytes on disk (for progress totals; the scan measures the text exactly)."""
        if self.kind == STDLIB:
            return sum(p.stat().st_size for p in _stdlib_files()) + 500_000
        return sum(p.stat().st_size for p in self.files)

    def fingerprint(self) -> str:
        """sha256 over the inputs' names, sizes and mtimes (cheap: no content is read)."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        files = _stdlib_files() if self.kind == STDLIB else self.files
        for p in files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        """Every document of this source, in the stable order (empty documents skipped)."""
        if self.kind == STDLIB:
            yield from _stdlib_documents()
            return
        for p in self.files:
            name = p.name
            if name.endswith(".txt"):
                raw = p.read_bytes()
                why = not_text(raw)
                if why:
                    raise DataError(f"{self.key}: {p} is not text ({why}): .txt sources must be UTF-8 text; "
                                    "remove the file from the source or convert it")
                text = decode_text(raw, str(p))
                if text:
                    yield text
            else:
                yield from _jsonl_documents(p, self.text_field)


def resolve_sources(entries: list[Any], prefix: str = "data.sources") -> list[Source]:
    """Turn config entries into ``Source`` objects; DataError for missing or empty inputs."""
    if not entries:
        raise DataError(f"{prefix} is empty: list 'stdlib' or {{path: FILE_DIR_OR_GLOB}} entries")
    out: list[Source] = []
    for i, entry in enumerate(entries):
        key = f"{prefix}[{i}]"
        if entry == STDLIB or (isinstance(entry, dict) and entry.get("path") == STDLIB):
            weight = float(entry.get("weight", 1.0)) if isinstance(entry, dict) else 1.0
            out.append(Source(i, STDLIB, STDLIB, weight, "text"))
            continue
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"{key}={entry!r} is invalid: use 'stdlib' or a mapping with a 'path' key")
        path = str(entry["path"])
        files = _expand(path, key)
        out.append(Source(i, "files", path, float(entry.get("weight", 1.0)),
                          str(entry.get("text_field", "text")), files))
    return out


def _expand(path: str, key: str) -> list[Path]:
    valid = "/".join(TEXT_SUFFIXES)
    p = Path(path).expanduser().absolute()
    if any(c in path for c in "*?["):
        hits = [Path(x).absolute() for x in glob.glob(os.path.expanduser(path), recursive=True)]
        files = sorted(x for x in hits if x.is_file() and x.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{key}.path={path!r} matches no {valid} files")
        return files
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file() and x.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{key}.path={path!r} is a directory without {valid} files")
        return files
    if p.is_file():
        if not p.name.endswith(TEXT_SUFFIXES):
            raise DataError(f"{key}.path={path!r} is not a {valid} file")
        return [p]
    raise DataError(f"{key}.path={path!r} does not exist (a file, directory or glob of {valid} files)")


def _jsonl_documents(p: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if p.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = decode_text(raw, f"{p}:{lineno}")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{p}:{lineno}: no string field {text_field!r} (found {keys}); "
                                    "set text_field in the source entry")
                if text:
                    yield text
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{p}: unreadable after line {lineno} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# The embedded corpus: this interpreter's standard library.

def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted, in place: os.walk then descends in a stable order.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise DataError(f"data.sources: 'stdlib' found no .py files under {root}")
    return files


def _stdlib_documents() -> Iterator[str]:
    for p in _stdlib_files():
        text = decode_text(p.read_bytes(), str(p))
        if text:
            yield text
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        if topics[name]:
            yield topics[name]


# ---------------------------------------------------------------------------------------------
# Seeded per-document decisions (no hash(), no time, no pid).

def unit_hash(seed: int, tag: str, source: int, doc: int) -> float:
    """A uniform number in [0, 1) fixed by its arguments."""
    digest = hashlib.blake2b(f"{seed}:{tag}:{source}:{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def mixing_rates(sizes: list[int], weights: list[float], total: Optional[int] = None) -> list[float]:
    """Sampling rate per source (expected copies of each document) so that source i makes up
    weights[i] / sum(weights) of ``total`` bytes (default: all sources together)."""
    total = sum(sizes) if total is None else total
    wsum = sum(weights)
    return [(w / wsum) * total / s if s else 0.0 for s, w in zip(sizes, weights)]


def copies_for(rate: float, u: float) -> int:
    """floor(rate) copies plus one more with probability frac(rate)."""
    whole = int(rate)
    return whole + (1 if u < rate - whole else 0)
