"""The `data` section of the run config (owned here so data_pipeline stays below slam_pretrain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class DataConfigError(ValueError):
    """An invalid data setting; the message names the dotted key, the value and what is valid."""


@dataclass
class DataConfig:
    # Each entry: "stdlib", or a mapping {path: ..., weight: 1.0, text_field: "text"}.
    sources: list[Any] = field(default_factory=lambda: ["stdlib"])
    dataset_dir: str = "data/stdlib"  # tokenizer, shards and manifest.json go here
    seq_len: int = 256
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    tokenizer_sample_mb: float = 8.0  # bounded, seeded sample of the corpus for tokenizer training
    shard_size_mb: float = 8.0
    val_fraction: float = 0.01
    num_workers: int = 1  # loader worker processes per rank (0 = in the main process)
    prefetch: int = 4
    seed: int = 1234
    skip_corrupt_shards: bool = False
    max_corpus_mb: Optional[float] = None  # cap on text read from the sources (None = all)

    def validate(self, prefix: str = "data") -> None:
        def bad(key: str, value: object, valid: str) -> DataConfigError:
            return DataConfigError(f"{prefix}.{key}={value!r} is invalid: {valid}")

        if not isinstance(self.sources, list) or not self.sources:
            raise bad("sources", self.sources, "must be a non-empty list of 'stdlib' or {path: ...}")
        for i, src in enumerate(self.sources):
            if src == "stdlib":
                continue
            if not isinstance(src, dict) or "path" not in src:
                raise bad(f"sources[{i}]", src, "must be 'stdlib' or a mapping with a 'path' key")
            unknown = set(src) - {"path", "weight", "text_field"}
            if unknown:
                raise bad(f"sources[{i}]", src, f"unknown keys {sorted(unknown)}; valid: path, weight, text_field")
            if float(src.get("weight", 1.0)) <= 0:
                raise bad(f"sources[{i}].weight", src.get("weight"), "must be positive")
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
