"""``slam-pretrain prepare``: corpus -> tokenizer -> packed WebDataset shards + manifest.

Steps (each with a progress bar on a terminal, periodic lines otherwise):
1. scan: read every source once, unit by unit (sizes, document counts, undecodable bytes;
   ``max_corpus_mb``). Units are files, Parquet row groups, row ranges or shards of a Hugging
   Face dataset (``data_pipeline/sources.py``); Arrow-backed units are measured vectorized.
2. tokenizer: an existing one (``data.tokenizer``: a SentencePiece .model or a Hugging Face
   tokenizer.json, copied into the dataset), or SentencePiece (BPE or unigram, byte fallback,
   lossless) trained on a seeded ~``tokenizer_sample_mb`` of training documents (large documents
   sampled chunk by chunk, cut into lines).
3. encode + write: seeded per-document decisions (mixing copies, validation hold-out), documents
   encoded in parallel (``encode_procs`` processes x ``encode_threads`` threads), EOS appended per
   document, packed into rows of ``seq_len + 1`` tokens with a stride of ``seq_len`` (row k =
   tokens[k*L : k*L + L + 1]: every token is a target exactly once; the last row of a split is
   padded with pad_id, whose labels the loader masks, or dropped when the tokenizer has no pad
   token), and written as shards of ``shard_size_mb``.
4. manifest.json, last.

Distributed (``prepare --part I/N`` on N machines, then ``prepare --merge``): the first part to
start runs steps 1-2 under the folder lock and leaves them in ``parts/plan.json`` (the others wait
and reuse it); part I encodes a contiguous run of units (cut by text bytes) into raw token files
``parts/part-IIIII-of-NNNNN.{train,val}.tokens`` and finishes with a ``.json`` marker; ``--merge``
checks every part is complete (naming the missing ones), packs the token streams in part order and
writes the shards and the manifest, then removes ``parts/``. The token stream is the same
concatenation of documents whatever N is, so the shards are byte-identical to a one-process build.

Atomic and idempotent: shards, tokenizer, plan, part files and manifest are written to ``*.tmp``
names and renamed, the manifest last, so a crash leaves no manifest and no half-written shard under
a final name; a killed part leaves no marker and is simply run again. A folder lock serializes
concurrent builds. Re-running with the same inputs (settings + source file names, sizes and mtimes)
does nothing and says so; different inputs into the same folder are an error naming what differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import resource
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline.config import DataConfig, DataConfigError
from data_pipeline.errors import DataError
from data_pipeline.lifecycle import die_with_parent
from data_pipeline.progress import Reporter
from data_pipeline.shards import RowFormat, ShardWriter, dtype_for_vocab
from data_pipeline.sources import DecodeStats, copies_for, mixing_rates, resolve_sources, unit_hash
from data_pipeline.storage import atomic_write, is_url
from data_pipeline.tokenizer import (BOS_ID, EOS_ID, HF_SPECIAL_NAMES, MAX_TRAIN_CHARS, PAD_ID, UNK_ID, Tokenizer,
                                     train_sentencepiece, training_lines)

MB = 1e6  # sizes in the config and the summary are decimal megabytes
TOKENIZER_NAME = "tokenizer.model"
HF_TOKENIZER_NAME = "tokenizer.json"
PARTS_DIR = "parts"
PLAN_NAME = "plan.json"
PLAN_VERSION = 1
MERGE_CHUNK_TOKENS = 1 << 23  # tokens read from a part file at a time by --merge
_OWN_FILE = re.compile(r"^((train|val)-\d{6}\.tar|tokenizer\.model|tokenizer\.json|manifest\.json)(\.tmp.*)?$")
_PART_FILE = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; DataError (one line) otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)) <= 99999:
        raise DataError(f"--part {text!r} is invalid: use I/N with 0 <= I < N <= 99999 (part I of N, counted from 0)")
    return int(m.group(1)), int(m.group(2))


def prepare_from_config(data_cfg: DataConfig, vocab_size: int, *, quiet: bool = False,
                        part: Optional[tuple[int, int]] = None, merge: bool = False) -> Path:
    """Build (or confirm) the dataset described by ``data_cfg``; returns the manifest path.

    ``part=(I, N)``: encode only part I of N (returns its marker, or the manifest when the dataset
    is already complete); ``merge=True``: assemble the parts into shards and the manifest.
    """
    try:
        data_cfg.validate("data")
    except DataConfigError as e:
        raise DataError(str(e)) from None
    if is_url(data_cfg.dataset_dir):
        raise DataError(f"data.dataset_dir={data_cfg.dataset_dir!r} is a URL: prepare writes a local folder "
                        "(serve that folder over HTTP afterwards)")
    if data_cfg.tokenizer is None and not 256 + 4 < vocab_size <= 2**32:
        raise DataError(f"model.vocab_size={vocab_size} is invalid: byte fallback needs > 260 ids")
    if part is not None and merge:
        raise DataError("--part and --merge are two steps: run every --part I/N first, then --merge once")
    out = Path(data_cfg.dataset_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.dataset_dir={str(out)!r} cannot be created ({e.strerror or e})") from None
    build = _Build(data_cfg, vocab_size, out, Reporter(quiet=quiet))
    if part is not None:
        return build.run_part(*part)
    with _folder_lock(out):
        return build.run_merge() if merge else build.run()


@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    with open(out / ".prepare.lock", "a") as f:  # "a": taking the lock changes nothing on disk
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # a second prepare waits, then finds the dataset up to date
        except OSError:  # a filesystem without locks: run unserialized
            pass
        yield


def auto_parallelism(procs: Optional[int], threads: Optional[int]) -> tuple[int, int]:
    """(processes, tokenizer threads per process) filling the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t = threads or min(4, cores)
    return (procs or max(1, cores // t)), t


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Encoding tasks (module level so that spawned worker processes can run them).

_worker_tok: Optional[Tokenizer] = None


def _init_worker(model_bytes: bytes, parent_pid: Optional[int] = None, threads: int = 1) -> None:
    global _worker_tok
    if parent_pid is not None:
        die_with_parent(parent_pid)  # a killed `prepare` leaves no encoder behind
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # a Hugging Face tokenizer's thread pool
    _worker_tok = Tokenizer(model_bytes=model_bytes)


def _encode_task(texts: list[str], copies: list[int], threads: int, dtype: str) -> np.ndarray:
    """Tokens of ``texts`` with EOS after each document, each repeated ``copies`` times -> [n]."""
    assert _worker_tok is not None
    ids = _worker_tok.encode_batch(texts, num_threads=threads, add_eos=True)
    if any(c != 1 for c in copies):
        ids = [x for x, c in zip(ids, copies) for _ in range(c)]
    count = sum(len(x) for x in ids)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=count)


class _Packer:
    """Cuts a split's token stream into rows [n, L+1] with stride L (one token overlap)."""

    def __init__(self, seq_len: int, writer: ShardWriter, dtype: str, pad_id: Optional[int]):
        self.L, self.writer, self.pad_id = seq_len, writer, pad_id
        self.buf = np.zeros(0, dtype=dtype)
        self.pads = 0

    def add(self, tokens: np.ndarray) -> None:
        buf = np.concatenate((self.buf, tokens)) if self.buf.size else tokens
        n = (buf.size - 1) // self.L
        if n > 0:
            idx = np.arange(n)[:, None] * self.L + np.arange(self.L + 1)
            self.writer.add(buf[idx])
            buf = buf[n * self.L:]
        self.buf = buf

    def finish(self) -> None:
        # Targets left: one last row, padded (the loader masks pad labels); without a pad token
        # (an existing tokenizer may have none) the partial row is dropped instead.
        if self.buf.size >= 2 and self.pad_id is not None:
            row = np.full(self.L + 1, self.pad_id, dtype=self.buf.dtype)
            row[:self.buf.size] = self.buf
            self.pads = self.L + 1 - self.buf.size
            self.writer.add(row[None])
        self.buf = self.buf[:0]


@dataclass
class _SourceStats:
    documents: int = 0  # available (after the max_corpus_mb cap)
    text_bytes: int = 0
    written_documents: int = 0
    written_bytes: int = 0


@dataclass
class _SplitStats:
    documents: int = 0
    text_bytes: int = 0
    tokens_in: int = 0  # tokens encoded (with EOS), before packing


@dataclass
class _UnitPlan:
    """A unit of a source that contributes documents: its global first document index and count."""

    source: int
    index: int
    key: str
    first_doc: int
    docs: int
    text_bytes: int


@dataclass
class _Timings:
    marks: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Wall seconds as ``name``, CPU seconds (all threads and joined children) as ``name_cpu``."""
        t, c = time.perf_counter(), _cpu_seconds()
        yield
        self.marks[name] = round(time.perf_counter() - t, 3)
        self.marks[name.replace("_s", "_cpu_s")] = round(_cpu_seconds() - c, 3)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Build:
    def __init__(self, cfg: DataConfig, vocab_size: int, out: Path, rep: Reporter):
        self.cfg, self.vocab_size, self.out, self.rep = cfg, vocab_size, out, rep
        self.dtype = dtype_for_vocab(vocab_size)
        self.fmt = RowFormat(cfg.seq_len + 1, self.dtype)
        self.procs, self.threads = auto_parallelism(cfg.encode_procs, cfg.encode_threads)
        self.t = _Timings()
        self.parts = 1
        self.sources = resolve_sources(self.cfg.sources)
        self.given = self._read_given_tokenizer() if cfg.tokenizer else None
        self.settings = self._settings()
        self.fingerprint = self._fingerprint(self.settings)

    # -- inputs and idempotency ------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        c = self.cfg
        out = {"format_version": mf.VERSION, "sources": [s.describe() for s in self.sources],
               "vocab_size": self.vocab_size, "seq_len": c.seq_len, "tokenizer_type": c.tokenizer_type,
               "tokenizer_sample_mb": c.tokenizer_sample_mb, "shard_size_mb": c.shard_size_mb,
               "val_fraction": c.val_fraction, "seed": c.seed, "max_corpus_mb": c.max_corpus_mb}
        if self.given is not None:  # only then: fingerprints of trained-tokenizer builds stay as they were
            del out["tokenizer_type"], out["tokenizer_sample_mb"]
            out["tokenizer"] = {"path": c.tokenizer, "sha256": self.given.sha256}
        return out

    def _fingerprint(self, settings: dict[str, Any]) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for s in self.sources:
            h.update(s.fingerprint().encode())
        return h.hexdigest()

    def _existing(self) -> Optional[Path]:
        path = self.out / mf.MANIFEST_NAME
        if not path.exists():
            return None
        try:
            old = json.loads(path.read_text())
            old_build = old["build"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{path} exists but is not a slam-pretrain manifest: use an empty "
                            "data.dataset_dir or delete that file") from None
        if old_build.get("fingerprint") != self.fingerprint:
            old_set = old_build.get("settings", {})
            diffs = [f"{k}: {old_set.get(k)!r} -> {v!r}" for k, v in self.settings.items() if old_set.get(k) != v]
            what = "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diffs) or "the source files changed"
            raise DataError(f"data.dataset_dir={str(self.out)!r} already holds a dataset built from other "
                            f"inputs ({what}): choose another data.dataset_dir or delete {self.out}")
        problem = self._check_files(old)
        if problem is None:
            m = old.get("totals", {})
            print(f"[prepare] {path} is up to date (same settings and source files): nothing to do "
                  f"({m.get('shards')} shards, {m.get('tokens', 0):,} tokens)", flush=True)
            return path
        self.rep.log(f"dataset in {self.out} is incomplete ({problem}): rebuilding")
        path.unlink()
        return None

    def _check_files(self, old: dict[str, Any]) -> Optional[str]:
        tok = self.out / old["tokenizer"]["file"]
        if not tok.exists() or hashlib.sha256(tok.read_bytes()).hexdigest() != old["tokenizer"]["sha256"]:
            return f"{tok.name} missing or changed"
        for split in old["splits"].values():
            for s in split["shards"]:
                p = self.out / s["url"]
                if not p.exists() or p.stat().st_size != s["bytes"]:
                    return f"{s['url']} missing or truncated"
        return None

    def _clean(self, keep_tokenizer: bool = False) -> None:
        """Remove what a crashed or older build left (only files this module names)."""
        for p in self.out.iterdir():
            if p.is_file() and _OWN_FILE.match(p.name):
                if keep_tokenizer and p.name in (TOKENIZER_NAME, HF_TOKENIZER_NAME):
                    continue
                p.unlink()

    # -- the tokenizer ------------------------------------------------------------------------

    def _read_given_tokenizer(self) -> Tokenizer:
        """``data.tokenizer``, checked: readable, an EOS token, the vocabulary size of the model."""
        path = Path(self.cfg.tokenizer).expanduser()
        key = f"data.tokenizer={self.cfg.tokenizer!r}"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{key} cannot be read ({e.strerror or e}): give a SentencePiece .model or a "
                            "Hugging Face tokenizer.json") from None
        tok = Tokenizer(path, model_bytes=data)
        if tok.eos_id < 0:
            looked = ", ".join(HF_SPECIAL_NAMES["eos"]) if tok.kind == "hf" else "its eos_id"
            raise DataError(f"{key} has no end-of-text token (looked for {looked}): prepare separates "
                            "documents with EOS")
        if tok.vocab_size != self.vocab_size:
            raise DataError(f"{key} has {tok.vocab_size:,} tokens but model.vocab_size={self.vocab_size}: set "
                            f"model.vocab_size={tok.vocab_size}")
        return tok

    def _install_given_tokenizer(self) -> Tokenizer:
        tok = self.given
        assert tok is not None
        path = self.out / (HF_TOKENIZER_NAME if tok.kind == "hf" else TOKENIZER_NAME)
        atomic_write(path, tok.model_bytes)
        self.rep.log(f"tokenizer: {self.cfg.tokenizer} ({tok.kind}, {tok.model_type}, vocab {tok.vocab_size:,}, "
                     f"eos {tok.eos_id}, pad {tok.pad_id if tok.pad_id >= 0 else 'none: the last partial row is dropped'})")
        return Tokenizer(path)

    @property
    def pad_id(self) -> Optional[int]:
        if self.given is None:
            return PAD_ID
        return self.given.pad_id if self.given.pad_id >= 0 else None

    # -- passes ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Document counts and text bytes per unit and source, honouring max_corpus_mb (each source's
        share: a source stops at the first document that would pass its share)."""
        cap = self.cfg.max_corpus_mb
        wsum = sum(s.weight for s in self.sources)
        self.source_stats, self.units = [], []
        total_disk = sum(s.disk_bytes() for s in self.sources)
        DecodeStats.bad_bytes = DecodeStats.bad_docs = 0
        DecodeStats.first_culprit = None
        with self.rep.bar("scan", total=total_disk if not cap else min(total_disk, cap * MB)) as bar:
            for s in self.sources:
                st = _SourceStats()
                limit = cap * MB * s.weight / wsum if cap else float("inf")
                for u in s.units():
                    lengths = s.unit_lengths(u)
                    take, nb = len(lengths), sum(lengths)
                    full = bool(cap) and st.text_bytes + nb > limit
                    if full:
                        take, nb = 0, 0
                        for n in lengths:
                            if (st.documents + take) and st.text_bytes + nb + n > limit:
                                break
                            take, nb = take + 1, nb + n
                    if take:
                        self.units.append(_UnitPlan(s.index, u.index, u.key, st.documents, take, nb))
                    st.documents += take
                    st.text_bytes += nb
                    bar.update(nb)
                    if full:
                        break
                if not st.documents:
                    raise DataError(f"{s.key} ({s.path!r}) holds no text: every document is empty")
                self.source_stats.append(st)
        self.decode_errors = (DecodeStats.bad_bytes, DecodeStats.bad_docs, DecodeStats.first_culprit)
        self.rates = mixing_rates([st.text_bytes for st in self.source_stats], [s.weight for s in self.sources])

    def _decisions(self, units: list[_UnitPlan]) -> Iterator[tuple[str, int, str, int, int]]:
        """(split, copies, text, source index, document index) for every written document, in order."""
        seed, vf = self.cfg.seed, self.cfg.val_fraction
        for up in units:
            s, rate = self.sources[up.source], self.rates[up.source]
            docs = islice(s.unit_documents(s.units()[up.index]), up.docs)
            for j, text in enumerate(docs, up.first_doc):
                copies = copies_for(rate, unit_hash(seed, "mix", s.index, j))
                if copies == 0:
                    continue
                if unit_hash(seed, "val", s.index, j) < vf:
                    yield "val", 1, text, s.index, j
                else:
                    yield "train", copies, text, s.index, j

    def _sample(self) -> list[str]:
        """The tokenizer sample (lines).

        Each training document is in the sample with probability q x its source's rate (q =
        sample size / corpus size). A document longer than ``chunk`` (1/16 of the sample) is
        sampled chunk by chunk instead, each chunk with that probability: one huge document (a
        60 MB single line) then gives about its share, not all or nothing, so a sample is never
        empty for a corpus that has text.
        """
        total = sum(st.text_bytes for st in self.source_stats)
        q = self.cfg.tokenizer_sample_mb * MB / max(1, total)
        chunk = int(max(MAX_TRAIN_CHARS, self.cfg.tokenizer_sample_mb * MB / 16))
        sample: list[str] = []
        sampled = train_docs = 0
        first = ""  # the first training text: the sample if the draw leaves it empty
        with self.rep.bar("plan + tokenizer sample", total=total) as bar:
            for split, copies, text, src, j in self._decisions(self.units):
                nb = len(text.encode("utf-8"))
                bar.update(nb)
                if split != "train":
                    continue
                train_docs += 1
                first = first or text[:chunk]
                # Sample rate follows the mix (a 2x source is twice as likely), each document once.
                p = q * self.rates[src]
                if len(text) <= chunk:
                    if unit_hash(self.cfg.seed, "tok", src, j) < p:
                        sample.append(text)
                        sampled += nb
                    continue
                for k in range(0, len(text), chunk):
                    if unit_hash(self.cfg.seed, f"tok-chunk-{k // chunk}", src, j) < p:
                        piece = text[k:k + chunk]
                        sample.append(piece)
                        sampled += len(piece.encode("utf-8"))
        if not train_docs:
            raise DataError("data.sources hold no training text after mixing and the validation hold-out")
        if not sample:
            sample, sampled = [first], len(first.encode("utf-8"))
        self.rep.log(f"tokenizer sample: {sampled / MB:.2f} MB from {len(sample)} documents")
        return list(training_lines(sample))

    def _train_tokenizer(self, lines: list[str]) -> Tokenizer:
        kind = self.cfg.tokenizer_type
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["model"] = train_sentencepiece(lines, self.vocab_size, kind, self.procs * self.threads)
            except BaseException as e:  # re-raised in the main thread
                result["error"] = e

        # SentencePiece releases the GIL while training, so the bar can tick meanwhile.
        th = threading.Thread(target=work, daemon=True)
        with self.rep.bar(f"tokenizer ({kind}, vocab {self.vocab_size}, {len(lines):,} lines)", unit="s",
                          scale=1.0) as bar:
            th.start()
            while th.is_alive():
                th.join(0.5)
                bar.update(0.0)
                bar.tick()
        if "error" in result:
            raise result["error"]
        path = self.out / TOKENIZER_NAME
        atomic_write(path, result["model"])
        return Tokenizer(path)

    def _make_plan(self) -> Tokenizer:
        """Steps 1-2: scan, rates, the tokenizer (trained or the given one)."""
        with self.t.stage("scan_s"):
            self._scan()
        if self.given is not None:
            return self._install_given_tokenizer()
        with self.t.stage("plan_s"):
            lines = self._sample()
        with self.t.stage("tokenizer_s"):
            return self._train_tokenizer(lines)

    # -- encoding -------------------------------------------------------------------------------

    def _encode(self, tok: Tokenizer, units: list[_UnitPlan], sink: Callable[[str, np.ndarray], None]) -> None:
        """Encode the documents of ``units`` in order; ``sink(split, tokens)`` gets each split's
        token stream in order. Fills split_stats and the per-source written counts."""
        self.split_stats = {"train": _SplitStats(), "val": _SplitStats()}
        self.written = [[0, 0] for _ in self.sources]  # documents, text bytes per source
        total_text = sum(up.text_bytes for up in units)
        task_bytes = int(min(8 * MB, max(256_000, total_text // (8 * self.procs))))
        enc_bar = self.rep.bar(f"encode ({self.procs} proc x {self.threads} threads)", total=total_text)
        executor: Executor
        if self.procs == 1:
            os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))
            _init_worker(tok.model_bytes)  # one background thread; tokenizer threads inside
            executor = ThreadPoolExecutor(1)
        else:
            import multiprocessing as mp

            # fork: instant start, and no re-import of the caller's __main__ (spawn would re-run a
            # script without an `if __name__ == "__main__"` guard). The children only run the
            # tokenizer and numpy.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            executor = ProcessPoolExecutor(self.procs, mp_context=mp.get_context(method), initializer=_init_worker,
                                           initargs=(tok.model_bytes, os.getpid(), self.threads))
        depth = 2 * self.procs
        inflight: deque = deque()

        def collect(limit: int) -> None:
            while len(inflight) > limit:
                split, nbytes, fut = inflight.popleft()
                tokens = fut.result()
                self.split_stats[split].tokens_in += tokens.size
                sink(split, tokens)
                enc_bar.update(nbytes)

        try:
            with enc_bar:
                batch: dict[str, tuple[list[str], list[int], list[int]]] = {"train": ([], [], [0]), "val": ([], [], [0])}
                for split, copies, text, src, _ in self._decisions(units):
                    nb = len(text.encode("utf-8"))
                    sp = self.split_stats[split]
                    sp.documents += copies
                    sp.text_bytes += nb * copies
                    self.written[src][0] += copies
                    self.written[src][1] += nb * copies
                    texts, cps, acc = batch[split]
                    texts.append(text)
                    cps.append(copies)
                    acc[0] += nb * copies
                    if acc[0] >= task_bytes:
                        inflight.append((split, acc[0], executor.submit(_encode_task, texts, cps, self.threads, self.dtype)))
                        batch[split] = ([], [], [0])
                        collect(depth)
                for split, (texts, cps, acc) in batch.items():
                    if texts:
                        inflight.append((split, acc[0], executor.submit(_encode_task, texts, cps, self.threads, self.dtype)))
                collect(0)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def _writers(self) -> tuple[dict[str, ShardWriter], dict[str, "_Packer"], Any]:
        rows_per_shard = max(1, int(self.cfg.shard_size_mb * MB // self.fmt.record_bytes))
        # The writing bar shows amount and rate only (an output-size estimate from the tokenizer
        # sample ran past 100% on real corpora); the encode bar carries the percentage and ETA.
        wr_bar = self.rep.bar("write shards", total=None, position=1)
        writers = {split: ShardWriter(self.out, split, self.fmt, rows_per_shard, on_write=wr_bar.update)
                   for split in ("train", "val")}
        packers = {split: _Packer(self.cfg.seq_len, w, self.dtype, self.pad_id) for split, w in writers.items()}
        return writers, packers, wr_bar

    def _finish_shards(self, writers: dict[str, ShardWriter], packers: dict[str, "_Packer"]) -> None:
        for p in packers.values():
            p.finish()
        self._ensure_val(writers, packers)
        for w in writers.values():
            w.close()
        self.pads = {split: p.pads for split, p in packers.items()}

    def _ensure_val(self, writers: dict[str, ShardWriter], packers: dict[str, _Packer]) -> None:
        """A tiny corpus can leave no validation document: move the last training rows there."""
        train, val = writers["train"], writers["val"]
        if val.pending_rows or val.rows_written:
            return
        total_train = train.rows_written + train.pending_rows
        if total_train < 2:
            raise DataError(f"the corpus is too small: {total_train} row(s) of seq_len+1={self.cfg.seq_len + 1} "
                            "tokens; add text or lower data.seq_len")
        k = min(train.pending_rows, max(1, round(self.cfg.val_fraction * total_train)), total_train - 1)
        moved = train.take_last(k)
        pads = int((moved[:, 1:] == self.pad_id).sum()) if self.pad_id is not None else 0
        packers["val"].pads, packers["train"].pads = pads, packers["train"].pads - pads
        val.add(moved)
        self.rep.log(f"no document fell into the validation split: moved the last {k} training row(s) there")

    def _check_has_train(self) -> None:
        if not self.split_stats["train"].documents:
            raise DataError("data.sources hold no training text after mixing and the validation hold-out")

    # -- the whole build in one process -----------------------------------------------------------

    def run(self) -> Path:
        t0 = time.perf_counter()
        done = self._up_to_date()
        if done is not None:
            return done
        self._clean()

        def build() -> tuple[Tokenizer, dict[str, ShardWriter]]:
            tok = self._make_plan()  # inside _publish's failure handling: a full disk here is one line too
            return tok, self._write_shards("encode_write_s", lambda packers: self._encode_into(tok, packers))
        return self._publish(build, t0)

    def _encode_into(self, tok: Tokenizer, packers: dict[str, _Packer]) -> None:
        self._encode(tok, self.units, lambda split, tokens: packers[split].add(tokens))
        self._check_has_train()

    # -- what the whole build and the merge share -------------------------------------------------

    def _up_to_date(self) -> Optional[Path]:
        """The manifest of an earlier build of the same inputs (its leftover parts dropped), else None."""
        done = self._existing()
        if done is not None:
            self._drop_parts()
        return done

    def _write_shards(self, stage: str, fill: Callable[[dict[str, _Packer]], None]) -> dict[str, ShardWriter]:
        """The packed, closed shard writers of both splits, after ``fill`` fed their packers (timed as ``stage``)."""
        with self.t.stage(stage):
            writers, packers, wr_bar = self._writers()
            with wr_bar:
                fill(packers)
                self._finish_shards(writers, packers)
        return writers

    def _publish(self, build: Callable[[], tuple[Tokenizer, dict[str, ShardWriter]]], t0: float) -> Path:
        """Run ``build`` (it writes the shards), then write the manifest, which publishes the dataset,
        and drop the parts. On any failure the temporaries go and an OSError becomes one DataError line."""
        try:
            tok, writers = build()
            path = self._write_manifest(tok, writers, time.perf_counter() - t0)
        except BaseException as e:
            self._on_failure(e)
            raise
        self._drop_parts()
        return path

    def _on_failure(self, e: BaseException) -> None:
        for p in self.out.glob("*.tmp*"):
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, permissions: the user's to fix, in one line
            raise DataError(f"prepare into {self.out} failed: {e.strerror or e} "
                            f"({getattr(e, 'filename', None) or 'no file name'})") from None

    def _drop_parts(self) -> None:
        shutil.rmtree(self.out / PARTS_DIR, ignore_errors=True)

    # -- distributed: plan, parts, merge -----------------------------------------------------------

    @property
    def parts_dir(self) -> Path:
        return self.out / PARTS_DIR

    def _part_name(self, i: int, n: int) -> str:
        return f"part-{i:05d}-of-{n:05d}"

    def _save_plan(self, tok: Tokenizer) -> None:
        plan = {"version": PLAN_VERSION, "fingerprint": self.fingerprint, "settings": self.settings,
                "tokenizer": {"file": tok.path.name, "sha256": tok.sha256},
                "sources": [asdict(st) for st in self.source_stats], "rates": self.rates,
                "decode_errors": list(self.decode_errors), "timings": self.t.marks,
                "units": [[u.source, u.index, u.key, u.first_doc, u.docs, u.text_bytes] for u in self.units]}
        self.parts_dir.mkdir(exist_ok=True)
        _write_json(self.parts_dir / PLAN_NAME, plan)

    def _load_plan(self) -> Optional[Tokenizer]:
        """The saved plan (None when there is none); DataError when it is from other inputs."""
        path = self.parts_dir / PLAN_NAME
        if not path.exists():
            return None
        try:
            plan = json.loads(path.read_text())
            version, fp = plan["version"], plan["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{path} is damaged: delete {self.parts_dir} and run every part again") from None
        if version != PLAN_VERSION or fp != self.fingerprint:
            raise DataError(f"{path} was made from other inputs (settings or source files changed since the "
                            f"parts started): delete {self.parts_dir} and run every part again")
        tok_path = self.out / plan["tokenizer"]["file"]
        tok = Tokenizer(tok_path)
        if tok.sha256 != plan["tokenizer"]["sha256"]:
            raise DataError(f"{tok_path} changed after {path} was written: delete {self.parts_dir} and run "
                            "every part again")
        self.source_stats = [_SourceStats(**d) for d in plan["sources"]]
        self.rates = [float(r) for r in plan["rates"]]
        self.decode_errors = tuple(plan["decode_errors"])
        self.units = [_UnitPlan(*u) for u in plan["units"]]
        self.t.marks.update(plan.get("timings", {}))
        return tok

    def _plan_for_parts(self) -> Tokenizer:
        """Load the plan, or make it (the first part to take the lock does; the others wait)."""
        with _folder_lock(self.out):
            tok = self._load_plan()
            if tok is None:
                self._clean()
                for p in self.parts_dir.glob("part-*"):  # parts of an older plan
                    p.unlink()
                self.rep.log(f"no plan in {self.parts_dir} yet: scanning the sources and making the tokenizer")
                try:
                    tok = self._make_plan()
                    self._save_plan(tok)
                except BaseException as e:
                    self._on_failure(e)
                    raise
        for u in self.units:  # the inputs still cut into the same units
            units = self.sources[u.source].units()
            if u.index >= len(units) or units[u.index].key != u.key:
                raise DataError(f"{self.sources[u.source].key}: unit {u.key!r} of {self.parts_dir / PLAN_NAME} is "
                                f"gone: delete {self.parts_dir} and run every part again")
        return tok

    def part_units(self, i: int, n: int) -> list[_UnitPlan]:
        """Part i of n: the units whose first byte lies in the i-th n-th of the text (contiguous)."""
        total = max(1, sum(u.text_bytes for u in self.units))
        out, before = [], 0
        for u in self.units:
            if min(n - 1, before * n // total) == i:
                out.append(u)
            before += u.text_bytes
        return out

    def run_part(self, i: int, n: int) -> Path:
        t0 = time.perf_counter()
        with _folder_lock(self.out):
            done = self._existing()
        if done is not None:
            return done
        tok = self._plan_for_parts()
        name = self._part_name(i, n)
        marker = self.parts_dir / f"{name}.json"
        if marker.exists():
            try:
                ok = json.loads(marker.read_text()).get("fingerprint") == self.fingerprint
            except (OSError, ValueError):
                ok = False
            if ok:
                print(f"[prepare] part {i}/{n} is already complete ({marker}): nothing to do", flush=True)
                return marker
            marker.unlink()
        for p in self.parts_dir.glob(f"{name}.*.tmp*"):  # what a killed run of this part left
            p.unlink(missing_ok=True)
        units = self.part_units(i, n)
        files = {split: self.parts_dir / f"{name}.{split}.tokens" for split in ("train", "val")}
        tmps = {split: p.with_name(p.name + f".tmp-{os.getpid()}") for split, p in files.items()}
        handles = {split: open(p, "wb") for split, p in tmps.items()}
        try:
            with self.t.stage("encode_s"):
                self._encode(tok, units, lambda split, tokens: tokens.tofile(handles[split]))
            for f in handles.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            for split in files:
                os.replace(tmps[split], files[split])
        except BaseException as e:
            for f in handles.values():
                f.close()
            for p in tmps.values():
                p.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise DataError(f"prepare --part {i}/{n} into {self.parts_dir} failed: {e.strerror or e} "
                                f"({getattr(e, 'filename', None) or 'no file name'})") from None
            raise
        info = {"fingerprint": self.fingerprint, "tokenizer_sha256": tok.sha256, "part": i, "parts": n,
                "units": [units[0].key, units[-1].key] if units else [], "unit_count": len(units),
                "tokens": {s: st.tokens_in for s, st in self.split_stats.items()},
                "split_stats": {s: asdict(st) for s, st in self.split_stats.items()}, "written": self.written,
                "seconds": round(time.perf_counter() - t0, 3), "encode_cpu_s": self.t.marks.get("encode_cpu_s"),
                "host": socket.gethostname(), "encode_procs": self.procs, "encode_threads": self.threads}
        _write_json(marker, info)
        text = sum(st.text_bytes for st in self.split_stats.values())
        print(f"[prepare] part {i}/{n} done in {info['seconds']:.1f}s: {len(units)} units, {text / MB:.1f} MB text -> "
              f"{sum(info['tokens'].values()):,} tokens ({marker})", flush=True)
        return marker

    def _completed_parts(self) -> tuple[int, list[dict[str, Any]]]:
        """(N, the markers of parts 0..N-1); DataError naming the parts that are missing."""
        groups: dict[int, dict[int, dict[str, Any]]] = {}
        stale = 0
        for p in sorted(self.parts_dir.glob("part-*-of-*.json")):
            m = _PART_FILE.match(p.name)
            if not m:
                continue
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if info.get("fingerprint") != self.fingerprint or info.get("tokenizer_sha256") != self.tok_sha256:
                stale += 1
                continue
            groups.setdefault(int(m.group(2)), {})[int(m.group(1))] = info
        if not groups:
            more = f" ({stale} from other inputs)" if stale else ""
            raise DataError(f"cannot merge: no finished part in {self.parts_dir}{more}: run `slam-pretrain prepare "
                            "--part I/N` for I = 0..N-1 first (launch/slurm/prepare.sbatch as an array job)")
        complete = [n for n, g in groups.items() if len(g) == n]
        if len(complete) > 1:
            raise DataError(f"cannot merge: {self.parts_dir} holds complete builds for N = {sorted(complete)}; delete "
                            "the part-*-of-* files of all but one")
        n = complete[0] if complete else max(groups, key=lambda k: len(groups[k]))
        missing = sorted(set(range(n)) - set(groups[n]))
        if missing:
            raise DataError(f"cannot merge: {len(missing)} of {n} parts are missing or unfinished: "
                            f"{_ranges(missing)}; run them again (`slam-pretrain prepare --part I/{n}`, or "
                            f"SLAM_PREPARE_PARTS={n} sbatch --array={_ranges(missing, ',')} launch/slurm/prepare.sbatch ...)")
        return n, [groups[n][k] for k in range(n)]

    def run_merge(self) -> Path:
        t0 = time.perf_counter()
        done = self._up_to_date()
        if done is not None:
            return done
        tok = self._load_plan()
        if tok is None:
            raise DataError(f"cannot merge: {self.parts_dir / PLAN_NAME} does not exist: run `slam-pretrain prepare "
                            "--part I/N` for every part first")
        self.tok_sha256 = tok.sha256
        n, infos = self._completed_parts()
        itemsize = np.dtype(self.dtype).itemsize
        files = []
        for k, info in enumerate(infos):
            for split in ("train", "val"):
                p = self.parts_dir / f"{self._part_name(k, n)}.{split}.tokens"
                want = int(info["tokens"][split]) * itemsize
                if not p.exists() or p.stat().st_size != want:
                    raise DataError(f"cannot merge: {p} is missing or has the wrong size (want {want:,} bytes): run "
                                    f"`slam-pretrain prepare --part {k}/{n}` again")
                files.append((split, p))
        self.parts = n
        self.split_stats = {s: _SplitStats() for s in ("train", "val")}
        self.written = [[0, 0] for _ in self.sources]
        for info in infos:
            for s, d in info["split_stats"].items():
                for key, v in d.items():
                    setattr(self.split_stats[s], key, getattr(self.split_stats[s], key) + int(v))
            for j, (docs, nbytes) in enumerate(info["written"]):
                self.written[j][0] += docs
                self.written[j][1] += nbytes
        self.t.marks["encode_s"] = round(sum(float(i["seconds"]) for i in infos), 3)
        self.t.marks["encode_cpu_s"] = round(sum(float(i.get("encode_cpu_s") or 0) for i in infos), 3)
        self._clean(keep_tokenizer=True)

        def build() -> tuple[Tokenizer, dict[str, ShardWriter]]:
            self._check_has_train()
            return tok, self._write_shards("merge_s", lambda packers: self._merge_into(files, packers))
        return self._publish(build, t0)

    def _merge_into(self, files: list[tuple[str, Path]], packers: dict[str, _Packer]) -> None:
        """Feed the parts' token files, in part order, to the split's packer (in bounded chunks)."""
        for split, p in files:
            if p.stat().st_size == 0:
                continue
            tokens = np.memmap(p, dtype=self.dtype, mode="r")
            for a in range(0, tokens.size, MERGE_CHUNK_TOKENS):
                packers[split].add(np.array(tokens[a:a + MERGE_CHUNK_TOKENS]))
            del tokens

    # -- the manifest -------------------------------------------------------------------------

    def _write_manifest(self, tok: Tokenizer, writers: dict[str, ShardWriter], seconds: float) -> Path:
        L = self.cfg.seq_len
        splits = {}
        for name, w in writers.items():
            rows, pads = w.rows_written, self.pads[name]
            splits[name] = {"rows": rows, "tokens": rows * L - pads, "documents": self.split_stats[name].documents,
                            "text_bytes": self.split_stats[name].text_bytes, "shards": w.shards}
        shard_bytes = sum(s["bytes"] for w in writers.values() for s in w.shards)
        dataset_id = mf.compute_dataset_id(tok.sha256, L, self.dtype,
                                           [s["sha256"] for name in ("train", "val") for s in writers[name].shards])
        bad_bytes, bad_docs, culprit = self.decode_errors
        totals = {"documents": sum(s["documents"] for s in splits.values()),
                  "text_bytes": sum(s["text_bytes"] for s in splits.values()),
                  "tokens": sum(s["tokens"] for s in splits.values()),
                  "rows": sum(s["rows"] for s in splits.values()),
                  "shards": sum(len(s["shards"]) for s in splits.values()), "bytes": shard_bytes,
                  "undecodable_bytes": bad_bytes, "undecodable_documents": bad_docs}
        sources = []
        for s, st, rate, (wd, wb) in zip(self.sources, self.source_stats, self.rates, self.written):
            sources.append({**s.describe(), "documents": st.documents, "text_bytes": st.text_bytes,
                            "rate": round(rate, 6), "written_documents": wd, "written_text_bytes": wb})
        given = self.given is not None
        tokenizer = {"file": tok.path.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                     "model_type": tok.model_type if given else self.cfg.tokenizer_type, "kind": tok.kind,
                     "pad_id": self.pad_id, "unk_id": tok.unk_id if given else UNK_ID,
                     "bos_id": tok.bos_id if given else BOS_ID, "eos_id": tok.eos_id if given else EOS_ID}
        if given:
            tokenizer["source"] = str(self.cfg.tokenizer)
        last_row = ("padded with pad_id (labels masked by the loader)" if self.pad_id is not None
                    else "dropped (the tokenizer has no pad token)")
        data = {
            "format": mf.FORMAT, "version": mf.VERSION, "dataset_id": dataset_id, "tokenizer": tokenizer,
            "seq_len": L, "dtype": self.dtype, "row": self.fmt.to_dict(),
            "packing": {"row_tokens": L + 1, "stride": L, "eos_after_each_document": True, "last_row": last_row},
            "splits": splits, "totals": totals, "sources": sources,
            "build": {"fingerprint": self.fingerprint, "settings": self.settings,
                      "timings": {**self.t.marks, "total_s": round(seconds, 3)}, "parts": self.parts,
                      "encode_procs": self.procs, "encode_threads": self.threads,
                      "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        path = self.out / mf.MANIFEST_NAME
        mf.write_manifest(path, data)
        self._summary(data, path, culprit)
        return path

    def _summary(self, d: dict[str, Any], path: Path, culprit: Optional[str]) -> None:
        if self.rep.quiet:
            return
        t, sp, tm = d["totals"], d["splits"], d["build"]["timings"]
        if "encode_write_s" in tm:
            rate = f"encode+write {t['text_bytes'] / MB / (tm['encode_write_s'] or 1e-9):.2f} MB/s"
        else:
            rate = f"merged {self.parts} parts in {tm.get('merge_s', 0):.1f}s"
        print(f"[prepare] done in {tm['total_s']:.1f}s: {t['documents']:,} documents "
              f"({sp['val']['documents']:,} val), {t['text_bytes'] / MB:.1f} MB text -> {t['tokens']:,} tokens, "
              f"{t['rows']:,} rows of {d['seq_len'] + 1} in {t['shards']} shards ({t['bytes'] / MB:.1f} MB, "
              f"{d['dtype']}); {rate}", flush=True)
        if t["undecodable_bytes"]:
            print(f"[prepare] {t['undecodable_bytes']:,} undecodable bytes in {t['undecodable_documents']:,} "
                  f"documents were replaced with U+FFFD (first: {culprit})", flush=True)
        print(f"[prepare] tokenizer {self.out / d['tokenizer']['file']} ({d['tokenizer']['model_type']}, vocab "
              f"{d['tokenizer']['vocab_size']}); manifest {path}", flush=True)


def _ranges(ids: list[int], sep: str = ", ") -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (for naming missing parts and as an sbatch --array list)."""
    out, start = [], None
    for k, v in enumerate(ids):
        if start is None:
            start = v
        if k + 1 == len(ids) or ids[k + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return sep.join(out)
