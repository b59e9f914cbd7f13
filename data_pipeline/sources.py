"""Corpus sources: the embedded stdlib corpus and user files, read in a stable order.

A source is ``"stdlib"`` (this Python's standard library: every ``.py`` file as a code document
in sorted path order, then every ``pydoc_data`` topic as a prose document, sorted by name), a
mapping ``{path, weight, text_field, filters}`` where ``path`` is a file, a directory (searched
recursively) or a glob of ``.txt`` (one document per file), ``.jsonl`` and ``.jsonl.gz`` (one
document per line, the string at ``text_field``) and ``.parquet`` (one document per row, the
column ``text_field``, read one row group at a time), or a Hugging Face dataset ``{hf: NAME or
LOCAL_PATH, split, subset, revision, data_files, streaming, text_field, filters}``. Files are read
in sorted path order. Null and empty texts are skipped.

``filters`` (Parquet and Hugging Face sources) keep the rows for which every ``[column, op,
value]`` holds (op: == != < <= > >= in, not in; a null never matches).

Work is cut into **units** that depend only on the inputs (never on how many processes read
them): one per ``.py``/``.txt``/``.jsonl`` file, one per Parquet row group, one per
``HF_UNIT_ROWS`` rows of a map-style Hugging Face dataset or one per shard (file) of a streaming
one. ``prepare --part I/N`` takes a contiguous run of units.

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

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
STDLIB = "stdlib"
HF = "hf"
HF_UNIT_ROWS = 8192  # rows per unit of a map-style Hugging Face dataset


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


@dataclass(frozen=True)
class Unit:
    """A piece of a source read as a whole: a file, a Parquet row group, a range of rows or a
    shard of a Hugging Face dataset. ``key`` names it in errors and in a distributed build's plan."""

    source: int
    index: int  # position in the source's unit list
    key: str
    ref: tuple  # how to read it (kind-specific)


@dataclass
class Source:
    """One resolved entry of ``data.sources``."""

    index: int
    kind: str  # "stdlib", "files" or "hf"
    path: str  # as written in the config (the dataset name or folder for "hf")
    weight: float
    text_field: str
    files: list[Path] = field(default_factory=list)
    filters: list = field(default_factory=list)
    hf: dict[str, Any] = field(default_factory=dict)  # split, subset, revision, data_files, streaming
    _units: Optional[list[Unit]] = field(default=None, repr=False)
    _hf_ds: Any = field(default=None, repr=False)
    _pq: Any = field(default=None, repr=False)  # (path, ParquetFile) of the last file read
    _hf_view: Any = field(default=None, repr=False)  # the map-style dataset's columns, Arrow format

    @property
    def key(self) -> str:
        return f"data.sources[{self.index}]"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path, "weight": self.weight}
        if self.kind == STDLIB:
            out["python"] = sys.version.split()[0]
        elif self.kind == HF:
            out["text_field"] = self.text_field
            out.update({k: v for k, v in self.hf.items() if v is not None})
        else:
            out["files"] = len(self.files)
            out["text_field"] = self.text_field
        if self.filters:  # only when set: fingerprints of older builds stay valid
            out["filters"] = self.filters
        return out

    def disk_bytes(self) -> int:
        """Bytes on disk (for progress totals; the scan measures the text exactly)."""
        if self.kind == STDLIB:
            return sum(p.stat().st_size for p in _stdlib_files()) + 500_000
        return sum(p.stat().st_size for p in self._stat_files())

    def _stat_files(self) -> list[Path]:
        if self.kind == STDLIB:
            return _stdlib_files()
        if self.kind == HF:
            local = Path(self.path).expanduser()
            return sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return self.files

    def fingerprint(self) -> str:
        """sha256 over the inputs' names, sizes and mtimes (cheap: no content is read). A Hugging
        Face dataset from the Hub is identified by its name, subset, split and revision."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for p in self._stat_files():
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    # -- units ------------------------------------------------------------------------------------

    def units(self) -> list[Unit]:
        """The source's units in reading order (metadata only: Parquet footers, dataset sizes)."""
        if self._units is None:
            i = self.index
            if self.kind == STDLIB:
                refs = [("py", p) for p in _stdlib_files()] + [("pydoc",)]
                keys = [str(r[1]) for r in refs[:-1]] + ["pydoc_data.topics"]
            elif self.kind == HF:
                refs, keys = self._hf_units()
            else:
                refs, keys = [], []
                for p in self.files:
                    if p.name.endswith(".parquet"):
                        n = self._parquet(p).metadata.num_row_groups
                        refs += [("parquet", p, g) for g in range(n)]
                        keys += [f"{p} row group {g}" for g in range(n)]
                    else:
                        refs.append(("file", p))
                        keys.append(str(p))
            self._units = [Unit(i, k, key, ref) for k, (key, ref) in enumerate(zip(keys, refs))]
        return self._units

    def documents(self) -> Iterator[str]:
        """Every document of this source, in the stable order (empty documents skipped)."""
        for u in self.units():
            yield from self.unit_documents(u)

    def unit_documents(self, u: Unit) -> Iterator[str]:
        """The documents of one unit, in order (null and empty ones skipped)."""
        kind = u.ref[0]
        if kind == "py":
            text = decode_text(u.ref[1].read_bytes(), str(u.ref[1]))
            if text:
                yield text
        elif kind == "pydoc":
            yield from _pydoc_documents()
        elif kind == "file":
            yield from self._file_documents(u.ref[1])
        else:
            for table in self._arrow_tables(u):
                yield from _arrow_texts(table, self.text_field, self.filters, f"{self.key}: {u.key}")

    def unit_lengths(self, u: Unit) -> list[int]:
        """UTF-8 byte length of each document of ``unit_documents(u)`` (vectorized for Arrow units)."""
        if u.ref[0] in ("parquet", "hf_rows", "hf_shard"):
            return [n for t in self._arrow_tables(u) for n in _arrow_lengths(t, self.text_field, self.filters, f"{self.key}: {u.key}")]
        return [len(t.encode("utf-8")) for t in self.unit_documents(u)]

    def _file_documents(self, p: Path) -> Iterator[str]:
        if p.name.endswith(".txt"):
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

    # -- Parquet ----------------------------------------------------------------------------------

    def _parquet(self, p: Path) -> Any:
        """The (cached) ParquetFile of ``p``; DataError naming it when it is not Parquet or lacks a column."""
        if self._pq is not None and self._pq[0] == p:
            return self._pq[1]
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
            names = pf.schema_arrow.names
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.key}: {p} is not a readable Parquet file ({_one_line(e)})") from None
        for col in [self.text_field] + [f[0] for f in self.filters]:
            if col not in names:
                what = "text_field" if col == self.text_field else "filter column"
                raise DataError(f"{self.key}: {p} has no column {col!r} ({what}; columns: {', '.join(names[:12])}); "
                                "set text_field / filters in the source entry")
        self._pq = (p, pf)
        return pf

    def _columns(self) -> list[str]:
        return list(dict.fromkeys([self.text_field] + [f[0] for f in self.filters]))

    def _arrow_tables(self, u: Unit) -> Iterator[Any]:
        """The unit's rows as pyarrow Tables (one per row group or range; batches of a streamed shard)."""
        kind = u.ref[0]
        try:
            if kind == "parquet":
                yield self._parquet(u.ref[1]).read_row_group(u.ref[2], columns=self._columns())
                return
            ds = self._hf_dataset()
            if kind == "hf_rows":
                if self._hf_view is None:
                    self._hf_view = ds.select_columns(self._columns()).with_format("arrow")
                yield self._hf_view[u.ref[1]:u.ref[2]]
                return
            shard = ds.shard(num_shards=ds.num_shards, index=u.ref[1]).select_columns(self._columns())
            yield from shard.with_format("arrow").iter(batch_size=4096)
        except DataError:
            raise
        except Exception as e:  # pyarrow / datasets / fsspec errors: one line naming the file and unit
            raise DataError(f"{self.key}: {u.key}: unreadable ({_one_line(e)})") from None

    # -- Hugging Face datasets --------------------------------------------------------------------

    def _hf_dataset(self) -> Any:
        """The datasets.Dataset or IterableDataset of this source, loaded once."""
        if self._hf_ds is not None:
            return self._hf_ds
        try:
            import datasets
        except ImportError:
            raise DataError(f"{self.key}: Hugging Face sources need the 'datasets' package: pip install "
                            "-c constraints.txt datasets") from None
        datasets.disable_progress_bars()
        o = self.hf
        local = Path(self.path).expanduser()
        try:
            if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(local))  # save_to_disk output: Arrow, memory-mapped
                if isinstance(ds, datasets.DatasetDict):
                    if o["split"] not in ds:
                        raise DataError(f"{self.key}: {local} has no split {o['split']!r} (splits: "
                                        f"{', '.join(ds)}); set split in the source entry")
                    ds = ds[o["split"]]
            else:
                ds = datasets.load_dataset(str(local) if local.exists() else self.path, o.get("subset"),
                                           split=o["split"], revision=o.get("revision"),
                                           data_files=o.get("data_files"), streaming=o["streaming"])
        except DataError:
            raise
        except Exception as e:  # not found, offline, bad config name, bad files: one line
            raise DataError(f"{self.key}: cannot load Hugging Face dataset {self.path!r} "
                            f"(split {o['split']!r}): {_one_line(e)}") from None
        names = ds.column_names
        if names is not None:
            for col in self._columns():
                if col not in names:
                    raise DataError(f"{self.key}: Hugging Face dataset {self.path!r} has no column {col!r} "
                                    f"(columns: {', '.join(names[:12])}); set text_field / filters")
        self._hf_ds = ds
        return ds

    def _hf_units(self) -> tuple[list[tuple], list[str]]:
        import datasets

        ds = self._hf_dataset()
        if not isinstance(ds, datasets.IterableDataset):  # map-style: fixed row ranges
            n = ds.num_rows
            refs = [("hf_rows", a, min(a + HF_UNIT_ROWS, n)) for a in range(0, n, HF_UNIT_ROWS)]
            return refs, [f"{self.path} rows {a}-{b - 1}" for _, a, b in refs]
        refs = [("hf_shard", k) for k in range(ds.num_shards)]
        return refs, [f"{self.path} shard {k} of {ds.num_shards}" for k in range(ds.num_shards)]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


_OPS = {"==": "equal", "!=": "not_equal", "<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal"}


def _arrow_mask(table: Any, text_field: str, filters: list, where: str) -> Any:
    """Boolean mask of the rows to keep: a non-empty text and every filter true (null = false)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(text_field)
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise DataError(f"{where}: column {text_field!r} holds {t}, not text; set text_field to a string column")
    mask = pc.fill_null(pc.greater(pc.binary_length(col), 0), False)
    for name, op, value in filters:
        c = table.column(name)
        try:
            if op in ("in", "not in"):
                m = pc.is_in(c, value_set=pa.array(value))
                m = pc.invert(m) if op == "not in" else m
                m = pc.and_(m, pc.is_valid(c))
            else:
                m = getattr(pc, _OPS[op])(c, pa.scalar(value))
        except (pa.ArrowException, TypeError) as e:
            raise DataError(f"{where}: filter [{name}, {op}, {value!r}] cannot be applied to column {name!r} "
                            f"of type {c.type} ({_one_line(e)})") from None
        mask = pc.and_(mask, pc.fill_null(m, False))
    return mask


def _arrow_lengths(table: Any, text_field: str, filters: list, where: str) -> list[int]:
    import pyarrow.compute as pc

    if table is None or table.num_rows == 0:
        return []
    col = table.column(text_field).filter(_arrow_mask(table, text_field, filters, where))
    return pc.binary_length(col).to_numpy(zero_copy_only=False).tolist()


def _arrow_texts(table: Any, text_field: str, filters: list, where: str) -> Iterator[str]:
    import pyarrow as pa

    if table is None or table.num_rows == 0:
        return
    col = table.column(text_field).filter(_arrow_mask(table, text_field, filters, where))
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        for k, raw in enumerate(col.to_pylist()):
            yield decode_text(raw, f"{where} row {k}")
    else:
        yield from col.to_pylist()


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
        if not isinstance(entry, dict) or ("path" not in entry and "hf" not in entry):
            raise DataError(f"{key}={entry!r} is invalid: use 'stdlib' or a mapping with a 'path' or 'hf' key")
        filters = [list(f) for f in entry.get("filters", []) or []]
        text_field = str(entry.get("text_field", "text"))
        if "hf" in entry:
            opts = {"split": entry.get("split", "train"), "subset": entry.get("subset"),
                    "revision": entry.get("revision"), "data_files": entry.get("data_files"),
                    "streaming": bool(entry.get("streaming", True))}
            out.append(Source(i, HF, str(entry["hf"]), float(entry.get("weight", 1.0)), text_field,
                              filters=filters, hf=opts))
            continue
        path = str(entry["path"])
        files = _expand(path, key)
        if filters and not all(p.name.endswith(".parquet") for p in files):
            raise DataError(f"{key}.filters apply to columns: only Parquet files have them, but {path!r} "
                            "holds other files; split the source or drop the filters")
        out.append(Source(i, "files", path, float(entry.get("weight", 1.0)), text_field, files, filters=filters))
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


def _pydoc_documents() -> Iterator[str]:
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
