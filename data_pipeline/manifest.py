"""The dataset manifest (``manifest.json``): everything a loader or trainer needs to know.

Layout (format version 1)::

    {"format": "slam-tokens-webdataset", "version": 1, "dataset_id": sha256,
     "tokenizer": {"file": "tokenizer.model", "sha256", "vocab_size", "model_type",
                   "pad_id", "unk_id", "bos_id", "eos_id"},
     "seq_len": 128, "dtype": "uint16",
     "row": {"row_tokens": 129, "dtype", "record_bytes", "data_offset", "member_suffix"},
     "packing": {"row_tokens": 129, "stride": 128, "eos_after_each_document": true, ...},
     "splits": {"train": {"rows", "tokens", "documents", "shards": [{"url", "rows", "bytes", "sha256"}]},
                "val": {...}},
     "totals": {"documents", "tokens", "rows", "shards", "bytes", "text_bytes", ...},
     "sources": [{"kind", "path", "weight", ...}], "build": {"fingerprint", "settings", ...}}

Shard and tokenizer ``url``s are relative to the manifest's folder (or URL) unless absolute, so
a dataset folder can be moved or served over HTTP as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.shards import RowFormat

FORMAT = "slam-tokens-webdataset"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class ShardInfo:
    url: str  # as written in the manifest (usually relative)
    rows: int
    bytes: int
    sha256: str
    split: str
    index: int
    location: str = ""  # absolute path or URL


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]
    rows: int
    tokens: int
    documents: int


@dataclass
class Manifest:
    location: str  # where it was loaded from (path or URL)
    base: str  # folder path or URL prefix shard urls are relative to
    dataset_id: str
    version: int
    tokenizer: dict[str, Any]
    vocab_size: int
    seq_len: int
    dtype: str
    row_format: RowFormat
    splits: dict[str, SplitInfo]
    totals: dict[str, Any]
    sources: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    _tokenizer_checked: Optional[bytes] = field(repr=False, default=None, init=False, compare=False)

    @property
    def is_remote(self) -> bool:
        return storage.is_url(self.location)

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.tokenizer["sha256"])

    @property
    def tokenizer_location(self) -> str:
        return storage.join_location(self.base, str(self.tokenizer["file"]))

    @property
    def shards(self) -> list[ShardInfo]:
        """Every shard, train then val."""
        return [s for name in ("train", "val") if name in self.splits for s in self.splits[name].shards]

    def tokenizer_bytes(self) -> bytes:
        """The tokenizer model, from disk or over HTTP, checked against its sha256 (read once)."""
        if self._tokenizer_checked is None:
            data = storage.read_bytes(self.tokenizer_location)
            actual = hashlib.sha256(data).hexdigest()
            if actual != self.tokenizer_sha256:
                raise DataError(f"dataset file {self.tokenizer_location} is damaged or was replaced: its sha256 "
                                f"{actual[:12]}... is not {self.tokenizer_sha256[:12]}... as {self.location} "
                                "records; re-run `slam-pretrain prepare` (or restore the file)")
            self._tokenizer_checked = data
        return self._tokenizer_checked

    def verify_tokenizer(self) -> None:
        """DataError naming the file unless the tokenizer matches the manifest's sha256.

        Called when a dataset is opened for training (``check_compatible``, the loader), so a
        damaged ``tokenizer.model`` stops the run at start-up instead of being copied into every
        checkpoint and noticed at export.
        """
        self.tokenizer_bytes()

    def tokenizer_path(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
        """A local path of the tokenizer model (downloaded into ``cache_dir`` for remote manifests),
        checked against the manifest's sha256."""
        if not self.is_remote:
            self.verify_tokenizer()
            return Path(self.tokenizer_location)
        folder = Path(cache_dir) if cache_dir else default_cache_dir(self)
        path = folder / f"tokenizer-{self.tokenizer_sha256[:16]}.model"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            storage.atomic_write(path, self.tokenizer_bytes())
        return path

    def load_tokenizer(self):
        from data_pipeline.tokenizer import Tokenizer

        return Tokenizer(self.tokenizer_location, model_bytes=self.tokenizer_bytes())


def default_cache_dir(manifest: Manifest) -> Path:
    return Path(tempfile.gettempdir()) / "slam-pretrain-cache" / manifest.dataset_id[:16]


def load_manifest(path_or_url: Union[str, os.PathLike]) -> Manifest:
    """Read a manifest from a path or URL (of the file, or of a dataset folder holding manifest.json)."""
    loc = str(path_or_url)
    if storage.is_url(loc) and loc.endswith("/"):
        loc += MANIFEST_NAME  # a dataset folder URL
    elif not storage.is_url(loc) and os.path.isdir(loc):
        loc = os.path.join(loc, MANIFEST_NAME)
    if not storage.is_url(loc) and not os.path.exists(loc):
        raise DataError(f"manifest {loc!r} not found: run `slam-pretrain prepare --config FILE` first "
                        "(it writes DATASET_DIR/manifest.json)")
    raw = storage.read_bytes(loc)
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {loc!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise DataError(f"manifest {loc!r} is not a {FORMAT} manifest")
    if d.get("version") != VERSION:
        raise DataError(f"manifest {loc!r} has format version {d.get('version')}; this code reads "
                        f"version {VERSION}: re-run `slam-pretrain prepare`")
    base = loc.rsplit("/", 1)[0] + "/" if storage.is_url(loc) else os.path.dirname(os.path.abspath(loc))
    try:
        splits = {}
        for name, s in d["splits"].items():
            shards = [ShardInfo(str(x["url"]), int(x["rows"]), int(x["bytes"]), str(x["sha256"]), name, i,
                                storage.join_location(base, str(x["url"])))
                      for i, x in enumerate(s["shards"])]
            splits[name] = SplitInfo(name, shards, int(s["rows"]), int(s["tokens"]), int(s.get("documents", 0)))
        m = Manifest(location=loc, base=base, dataset_id=str(d["dataset_id"]), version=int(d["version"]),
                     tokenizer=dict(d["tokenizer"]), vocab_size=int(d["tokenizer"]["vocab_size"]),
                     seq_len=int(d["seq_len"]), dtype=str(d["dtype"]), row_format=RowFormat.from_dict(d["row"]),
                     splits=splits, totals=dict(d.get("totals", {})), sources=list(d.get("sources", [])), raw=d)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"manifest {loc!r} is incomplete or damaged ({type(e).__name__}: {e}); re-run prepare") from None
    problem = _inconsistency(m)
    if problem:
        raise DataError(f"manifest {loc} is damaged or was edited ({problem}); re-run `slam-pretrain prepare`")
    return m


def compute_dataset_id(tokenizer_sha256: str, seq_len: int, dtype: str, shard_sha256s: list[str]) -> str:
    """The dataset id ``prepare`` writes: sha256 over the tokenizer, packing and every shard's sha256
    (train shards, then val), so any change to what a loader would read changes it."""
    return hashlib.sha256(json.dumps([tokenizer_sha256, seq_len, dtype, shard_sha256s]).encode()).hexdigest()


def _inconsistency(m: Manifest) -> Optional[str]:
    """What in a parsed manifest contradicts the rest of it (None when it is self-consistent)."""
    for name, sp in m.splits.items():
        if sum(s.rows for s in sp.shards) != sp.rows:
            return f"splits.{name}.rows={sp.rows} but its shards hold {sum(s.rows for s in sp.shards)}"
        for s in sp.shards:
            if s.bytes != m.row_format.shard_bytes(s.rows):
                return (f"shard {s.url}: bytes={s.bytes} but {s.rows} rows of this format take "
                        f"{m.row_format.shard_bytes(s.rows)}")
    if m.dtype != m.row_format.dtype:
        return f"dtype={m.dtype!r} but row.dtype={m.row_format.dtype!r}"
    if m.row_format.row_tokens != m.seq_len + 1:
        return f"seq_len={m.seq_len} but rows hold {m.row_format.row_tokens} tokens"
    expected = compute_dataset_id(m.tokenizer_sha256, m.seq_len, m.dtype, [s.sha256 for s in m.shards])
    if expected != m.dataset_id:
        return "its dataset_id does not match the tokenizer and shard checksums it lists"
    return None


def check_compatible(manifest: Union[Manifest, str, os.PathLike], vocab_size: int, seq_len: int,
                     tokenizer_sha256: Optional[str] = None) -> Manifest:
    """Raise DataError unless the dataset fits a model with ``vocab_size`` and ``seq_len`` and its
    tokenizer file matches the manifest."""
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if m.vocab_size != vocab_size:
        raise DataError(f"dataset {m.location} was tokenized with vocab_size={m.vocab_size} but "
                        f"model.vocab_size={vocab_size}: set model.vocab_size={m.vocab_size} or re-run "
                        "prepare into another data.dataset_dir")
    if m.seq_len != seq_len:
        raise DataError(f"dataset {m.location} was packed for seq_len={m.seq_len} but data.seq_len={seq_len}: "
                        f"set data.seq_len={m.seq_len} or re-run prepare into another data.dataset_dir")
    if tokenizer_sha256 is not None and tokenizer_sha256 != m.tokenizer_sha256:
        raise DataError(f"dataset {m.location} uses tokenizer sha256 {m.tokenizer_sha256[:12]}... but the "
                        f"checkpoint was trained with {tokenizer_sha256[:12]}...: point data.dataset_dir at "
                        "the dataset the run started with")
    m.verify_tokenizer()
    return m


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    """Publish atomically (storage.atomic_write)."""
    storage.atomic_write(path, json.dumps(data, indent=1) + "\n")
