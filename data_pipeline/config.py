"""The `data` section of the run config (owned here so data_pipeline stays below slam_pretrain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class DataConfigError(ValueError):
    """An invalid data setting; the message names the dotted key, the value and what is valid."""


@dataclass
class DataConfig:
    # Each entry: "stdlib", a mapping {path: ..., weight: 1.0, text_field: "text", filters: [...]}
    # (txt, jsonl, jsonl.gz, parquet files, folders, globs), or a Hugging Face dataset
    # {hf: NAME_OR_LOCAL_PATH, split: train, subset: ..., revision: ..., data_files: ...,
    # streaming: true, text_field, filters, weight}. A mapping whose path is "stdlib" is the embedded
    # stdlib source with a weight (use ./stdlib for a folder). Weights are shares of the written
    # text; filters are [column, op, value] rows (see data_pipeline/sources.py).
    sources: list[Any] = field(default_factory=lambda: ["stdlib"])
    dataset_dir: str = "data/stdlib"  # tokenizer, shards and manifest.json go here
    seq_len: int = 256
    # An existing tokenizer instead of training one: a SentencePiece .model file or a Hugging Face
    # tokenizer.json. Its vocabulary size must equal model.vocab_size; special ids come from it.
    tokenizer: Optional[str] = None
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    tokenizer_sample_mb: float = 8.0  # bounded, seeded sample of the corpus for tokenizer training
    shard_size_mb: float = 8.0
    val_fraction: float = 0.01
    num_workers: int = 1  # loader worker processes per rank (0 = in the main process)
    prefetch: int = 4  # chunks (~256 rows each) each loader worker keeps ready
    seed: int = 1234
    skip_corrupt_shards: bool = False
    max_corpus_mb: Optional[float] = None  # cap on text read from the sources (None = all)
    encode_procs: Optional[int] = None  # prepare: encoder processes (None = cores // encode_threads)
    encode_threads: Optional[int] = None  # prepare: sentencepiece threads per process (None = min(4, cores))
    # Shard checks when a loader starts: "size" (every shard's size; each row's CRC-32 as it is
    # read), "full" (also every shard's sha256: reads all shards once), "none".
    verify_shards: Literal["size", "full", "none"] = "size"
    cache_dir: Optional[str] = None  # local copies of remote shards when a server ignores Range

    def validate(self, prefix: str = "data") -> None:
        def bad(key: str, value: object, valid: str) -> DataConfigError:
            return DataConfigError(f"{prefix}.{key}={value!r} is invalid: {valid}")

        if not isinstance(self.sources, list) or not self.sources:
            raise bad("sources", self.sources, "must be a non-empty list of 'stdlib' or {path: ...}")
        for i, src in enumerate(self.sources):
            if src == "stdlib":
                continue
            _check_source(src, f"sources[{i}]", bad)
        if self.seq_len <= 0:
            raise bad("seq_len", self.seq_len, "must be a positive integer")
        if self.tokenizer_sample_mb <= 0:
            raise bad("tokenizer_sample_mb", self.tokenizer_sample_mb, "must be positive")
        if self.shard_size_mb <= 0:
            raise bad("shard_size_mb", self.shard_size_mb, "must be positive")
        if not 0.0 < self.val_fraction < 0.5:
            raise bad("val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if self.num_workers < 0:
            raise bad("num_workers", self.num_workers, "must be >= 0")
        if self.prefetch < 1:
            raise bad("prefetch", self.prefetch, "must be >= 1")
        if self.max_corpus_mb is not None and self.max_corpus_mb <= 0:
            raise bad("max_corpus_mb", self.max_corpus_mb, "must be positive or null")
        for key in ("encode_procs", "encode_threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise bad(key, value, "must be >= 1 or null (automatic)")
        if self.verify_shards not in ("size", "full", "none"):
            raise bad("verify_shards", self.verify_shards, "must be one of 'size', 'full', 'none'")
        if not self.dataset_dir:
            raise bad("dataset_dir", self.dataset_dir, "must be a non-empty path or http(s) URL")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise bad("tokenizer", self.tokenizer, "must be null (train one) or the path of a SentencePiece "
                      ".model or a Hugging Face tokenizer.json")


FILE_SOURCE_KEYS = ("path", "weight", "text_field", "filters")
HF_SOURCE_KEYS = ("hf", "weight", "text_field", "filters", "split", "subset", "revision", "data_files", "streaming")
FILTER_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")


def _check_source(src: Any, key: str, bad: Any) -> None:
    """Validate one mapping entry of data.sources (a file source or a Hugging Face dataset)."""
    if not isinstance(src, dict) or ("path" not in src) == ("hf" not in src):
        raise bad(key, src, "must be 'stdlib' or a mapping with a 'path' key (files) or an 'hf' key "
                  "(a Hugging Face dataset name or local path)")
    valid = FILE_SOURCE_KEYS if "path" in src else HF_SOURCE_KEYS
    unknown = set(src) - set(valid)
    if unknown:
        raise bad(key, src, f"unknown keys {sorted(unknown)}; valid: {', '.join(valid)}")
    weight = src.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise bad(f"{key}.weight", weight, "must be a positive number")
    where = "path" if "path" in src else "hf"
    if not isinstance(src[where], str) or not src[where]:
        raise bad(f"{key}.{where}", src[where], "must be a non-empty path, directory or glob" if where == "path"
                  else "must be a dataset name (org/name) or a local folder")
    if not isinstance(src.get("text_field", "text"), str) or not src.get("text_field", "text"):
        raise bad(f"{key}.text_field", src.get("text_field"), "must be a string (a JSON key or a column name)")
    for k in ("split", "subset", "revision"):
        if k in src and (not isinstance(src[k], str) or not src[k]):
            raise bad(f"{key}.{k}", src[k], "must be a non-empty string")
    if "streaming" in src and not isinstance(src["streaming"], bool):
        raise bad(f"{key}.streaming", src["streaming"], "must be true or false")
    files = src.get("data_files")
    if files is not None and not (isinstance(files, str) or (isinstance(files, list) and files
                                                             and all(isinstance(f, str) for f in files))):
        raise bad(f"{key}.data_files", files, "must be a path/glob or a list of them")
    filters = src.get("filters", [])
    if not isinstance(filters, list):
        raise bad(f"{key}.filters", filters, "must be a list of [column, op, value] rows")
    for j, f in enumerate(filters):
        ok = isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and f[1] in FILTER_OPS
        if ok and f[1] in ("in", "not in"):
            ok = isinstance(f[2], list) and bool(f[2])
        if not ok:
            raise bad(f"{key}.filters[{j}]", f, f"must be [column, op, value] with op one of {', '.join(FILTER_OPS)} "
                      "(a non-empty list value for in / not in; quote '>=' and the like in YAML)")
