"""``slam-pretrain prepare``: corpus -> SentencePiece -> packed WebDataset shards + manifest.

Steps (each with a progress bar on a terminal, periodic lines otherwise):
1. scan: read every source once (sizes, document counts, undecodable bytes; ``max_corpus_mb``).
2. plan: seeded per-document decisions (mixing copies, validation hold-out) and the tokenizer
   training sample (a seeded ~``tokenizer_sample_mb`` of training documents, large documents
   sampled chunk by chunk, cut into lines).
3. tokenizer: SentencePiece (BPE or unigram, byte fallback, lossless), ``tokenizer.model``.
4. encode + write: documents are encoded in parallel (``encode_procs`` processes x
   ``encode_threads`` sentencepiece threads), EOS appended per document, packed into rows of
   ``seq_len + 1`` tokens with a stride of ``seq_len`` (row k = tokens[k*L : k*L + L + 1]: every
   token is a target exactly once; the last row of a split is padded with pad_id, whose labels
   the loader masks), and written as shards of ``shard_size_mb``.
5. manifest.json, last.

Atomic and idempotent: shards, tokenizer and manifest are written to ``*.tmp`` names and renamed,
the manifest last, so a crash leaves no manifest and no half-written shard under a final name. A
folder lock serializes concurrent runs. Re-running with the same inputs (settings + source file
names, sizes and mtimes) does nothing and says so; different inputs into the same folder are an
error naming what differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import resource
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline.config import DataConfig, DataConfigError
from data_pipeline.errors import DataError
from data_pipeline.lifecycle import die_with_parent
from data_pipeline.progress import Reporter
from data_pipeline.shards import RowFormat, ShardWriter, dtype_for_vocab
from data_pipeline.sources import DecodeStats, copies_for, mixing_rates, resolve_sources, unit_hash
from data_pipeline.storage import is_url
from data_pipeline.tokenizer import (BOS_ID, EOS_ID, MAX_TRAIN_CHARS, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece,
                                     training_lines)

MB = 1e6  # sizes in the config and the summary are decimal megabytes
TOKENIZER_NAME = "tokenizer.model"
_OWN_FILE = re.compile(r"^((train|val)-\d{6}\.tar|tokenizer\.model|manifest\.json)(\.tmp.*)?$")


def prepare_from_config(data_cfg: DataConfig, vocab_size: int, *, quiet: bool = False) -> Path:
    """Build (or confirm) the dataset described by ``data_cfg``; returns the manifest path."""
    try:
        data_cfg.validate("data")
    except DataConfigError as e:
        raise DataError(str(e)) from None
    if is_url(data_cfg.dataset_dir):
        raise DataError(f"data.dataset_dir={data_cfg.dataset_dir!r} is a URL: prepare writes a local folder "
                        "(serve that folder over HTTP afterwards)")
    if not 256 + 4 < vocab_size <= 2**32:
        raise DataError(f"model.vocab_size={vocab_size} is invalid: byte fallback needs > 260 ids")
    out = Path(data_cfg.dataset_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.dataset_dir={str(out)!r} cannot be created ({e.strerror or e})") from None
    with _folder_lock(out):
        return _Build(data_cfg, vocab_size, out, Reporter(quiet=quiet)).run()


@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    with open(out / ".prepare.lock", "a") as f:  # "a": taking the lock changes nothing on disk
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # a second prepare waits, then finds the dataset up to date
        except OSError:  # a filesystem without locks: run unserialized
            pass
        yield


def auto_parallelism(procs: Optional[int], threads: Optional[int]) -> tuple[int, int]:
    """(processes, sentencepiece threads per process) filling the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t = threads or min(4, cores)
    return (procs or max(1, cores // t)), t


# ---------------------------------------------------------------------------------------------
# Encoding tasks (module level so that spawned worker processes can run them).

_worker_tok: Optional[Tokenizer] = None


def _init_worker(model_bytes: bytes, parent_pid: Optional[int] = None) -> None:
    global _worker_tok
    if parent_pid is not None:
        die_with_parent(parent_pid)  # a killed `prepare` leaves no encoder behind
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

    def __init__(self, seq_len: int, writer: ShardWriter, dtype: str):
        self.L, self.writer = seq_len, writer
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
        if self.buf.size >= 2:  # targets left: one last row, padded (the loader masks pad labels)
            row = np.full(self.L + 1, PAD_ID, dtype=self.buf.dtype)
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

    # -- inputs and idempotency ------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"format_version": mf.VERSION, "sources": [s.describe() for s in self.sources],
                "vocab_size": self.vocab_size, "seq_len": c.seq_len, "tokenizer_type": c.tokenizer_type,
                "tokenizer_sample_mb": c.tokenizer_sample_mb, "shard_size_mb": c.shard_size_mb,
                "val_fraction": c.val_fraction, "seed": c.seed, "max_corpus_mb": c.max_corpus_mb}

    def _fingerprint(self, settings: dict[str, Any]) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for s in self.sources:
            h.update(s.fingerprint().encode())
        return h.hexdigest()

    def _existing(self, fingerprint: str, settings: dict[str, Any]) -> Optional[Path]:
        path = self.out / mf.MANIFEST_NAME
        if not path.exists():
            return None
        try:
            old = json.loads(path.read_text())
            old_build = old["build"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{path} exists but is not a slam-pretrain manifest: use an empty "
                            "data.dataset_dir or delete that file") from None
        if old_build.get("fingerprint") != fingerprint:
            old_set = old_build.get("settings", {})
            diffs = [f"{k}: {old_set.get(k)!r} -> {v!r}" for k, v in settings.items() if old_set.get(k) != v]
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

    def _clean(self) -> None:
        """Remove what a crashed or older build left (only files this module names)."""
        for p in self.out.iterdir():
            if p.is_file() and _OWN_FILE.match(p.name):
                p.unlink()

    # -- passes ------------------------------------------------------------------------------

    def _scan(self) -> list[_SourceStats]:
        """Sizes and document counts per source, honouring max_corpus_mb (each source's share)."""
        cap = self.cfg.max_corpus_mb
        wsum = sum(s.weight for s in self.sources)
        stats = []
        total_disk = sum(s.disk_bytes() for s in self.sources)
        DecodeStats.bad_bytes = DecodeStats.bad_docs = 0
        DecodeStats.first_culprit = None
        with self.rep.bar("scan", total=total_disk if not cap else min(total_disk, cap * MB)) as bar:
            for s in self.sources:
                st = _SourceStats()
                limit = cap * MB * s.weight / wsum if cap else float("inf")
                for text in s.documents():
                    nb = len(text.encode("utf-8"))
                    if st.documents and st.text_bytes + nb > limit:
                        break
                    st.documents += 1
                    st.text_bytes += nb
                    bar.update(nb)
                if not st.documents:
                    raise DataError(f"{s.key} ({s.path!r}) holds no text: every document is empty")
                stats.append(st)
        self.decode_errors = (DecodeStats.bad_bytes, DecodeStats.bad_docs, DecodeStats.first_culprit)
        return stats

    def _decisions(self) -> Iterator[tuple[str, int, str, int, int]]:
        """(split, copies, text, source index, document index) for every written document, in order."""
        seed, vf = self.cfg.seed, self.cfg.val_fraction
        for s, st, rate in zip(self.sources, self.source_stats, self.rates):
            for j, text in enumerate(islice(s.documents(), st.documents)):
                copies = copies_for(rate, unit_hash(seed, "mix", s.index, j))
                if copies == 0:
                    continue
                if unit_hash(seed, "val", s.index, j) < vf:
                    yield "val", 1, text, s.index, j
                else:
                    yield "train", copies, text, s.index, j

    def _plan(self) -> list[str]:
        """Count what each split will get and collect the tokenizer sample (lines).

        Each training document is in the sample with probability q x its source's rate (q =
        sample size / corpus size). A document longer than ``chunk`` (1/16 of the sample) is
        sampled chunk by chunk instead, each chunk with that probability: one huge document (a
        60 MB single line) then gives about its share, not all or nothing, so a sample is never
        empty for a corpus that has text.
        """
        self.split_stats = {"train": _SplitStats(), "val": _SplitStats()}
        total = sum(st.text_bytes for st in self.source_stats)
        q = self.cfg.tokenizer_sample_mb * MB / max(1, total)
        chunk = int(max(MAX_TRAIN_CHARS, self.cfg.tokenizer_sample_mb * MB / 16))
        sample: list[str] = []
        sampled = 0
        first = ""  # the first training text: the sample if the draw leaves it empty
        with self.rep.bar("plan + tokenizer sample", total=total) as bar:
            for split, copies, text, src, j in self._decisions():
                nb = len(text.encode("utf-8"))
                sp = self.split_stats[split]
                sp.documents += copies
                sp.text_bytes += nb * copies
                ss = self.source_stats[src]
                ss.written_documents += copies
                ss.written_bytes += nb * copies
                bar.update(nb)
                if split != "train":
                    continue
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
        if not self.split_stats["train"].documents:
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(result["model"])
        os.replace(tmp, path)
        return Tokenizer(path)

    def _encode_and_write(self, tok: Tokenizer) -> dict[str, ShardWriter]:
        fmt, L = self.fmt, self.cfg.seq_len
        rows_per_shard = max(1, int(self.cfg.shard_size_mb * MB // fmt.record_bytes))
        total_text = sum(s.text_bytes for s in self.split_stats.values())
        # The encode bar carries the percentage and ETA; the writing bar shows amount and rate only
        # (an output-size estimate from the tokenizer sample ran past 100% on real corpora).
        enc_bar = self.rep.bar(f"encode ({self.procs} proc x {self.threads} threads)", total=total_text)
        wr_bar = self.rep.bar("write shards", total=None, position=1)
        writers = {split: ShardWriter(self.out, split, fmt, rows_per_shard, on_write=wr_bar.update)
                   for split in ("train", "val")}
        packers = {split: _Packer(L, w, self.dtype) for split, w in writers.items()}
        task_bytes = int(min(8 * MB, max(256_000, total_text // (8 * self.procs))))
        executor: Executor
        if self.procs == 1:
            _init_worker(tok.model_bytes)  # one background thread; sentencepiece threads inside
            executor = ThreadPoolExecutor(1)
        else:
            import multiprocessing as mp

            # fork: instant start, and no re-import of the caller's __main__ (spawn would re-run a
            # script without an `if __name__ == "__main__"` guard). The children only run
            # sentencepiece and numpy.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            executor = ProcessPoolExecutor(self.procs, mp_context=mp.get_context(method),
                                           initializer=_init_worker, initargs=(tok.model_bytes, os.getpid()))
        depth = 2 * self.procs
        inflight: deque = deque()

        def collect(limit: int) -> None:
            while len(inflight) > limit:
                split, nbytes, fut = inflight.popleft()
                tokens = fut.result()
                self.split_stats[split].tokens_in += tokens.size
                packers[split].add(tokens)
                enc_bar.update(nbytes)

        try:
            with wr_bar, enc_bar:  # closes the encode bar first
                batch: dict[str, tuple[list[str], list[int], list[int]]] = {"train": ([], [], [0]), "val": ([], [], [0])}
                for split, copies, text, _, _ in self._decisions():
                    texts, cps, nb = batch[split]
                    texts.append(text)
                    cps.append(copies)
                    nb[0] += len(text) * copies
                    if nb[0] >= task_bytes:
                        inflight.append((split, nb[0], executor.submit(_encode_task, texts, cps, self.threads, self.dtype)))
                        batch[split] = ([], [], [0])
                        collect(depth)
                for split, (texts, cps, nb) in batch.items():
                    if texts:
                        inflight.append((split, nb[0], executor.submit(_encode_task, texts, cps, self.threads, self.dtype)))
                collect(0)
                for p in packers.values():
                    p.finish()
                self._ensure_val(writers, packers)
                for w in writers.values():
                    w.close()
                self.pads = {split: p.pads for split, p in packers.items()}
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        return writers

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
        pads = int((moved[:, 1:] == PAD_ID).sum())
        packers["val"].pads, packers["train"].pads = pads, packers["train"].pads - pads
        val.add(moved)
        self.rep.log(f"no document fell into the validation split: moved the last {k} training row(s) there")

    # -- the whole build ----------------------------------------------------------------------

    def run(self) -> Path:
        t0 = time.perf_counter()
        self.sources = resolve_sources(self.cfg.sources)
        settings = self._settings()
        fingerprint = self._fingerprint(settings)
        done = self._existing(fingerprint, settings)
        if done is not None:
            return done
        self._clean()
        try:
            with self.t.stage("scan_s"):
                self.source_stats = self._scan()
            sizes = [st.text_bytes for st in self.source_stats]
            self.rates = mixing_rates(sizes, [s.weight for s in self.sources])
            with self.t.stage("plan_s"):
                lines = self._plan()
            with self.t.stage("tokenizer_s"):
                tok = self._train_tokenizer(lines)
            del lines
            with self.t.stage("encode_write_s"):
                writers = self._encode_and_write(tok)
            path = self._write_manifest(tok, writers, fingerprint, settings, time.perf_counter() - t0)
        except BaseException as e:
            for p in self.out.glob("*.tmp*"):
                p.unlink(missing_ok=True)
            if isinstance(e, OSError):  # disk full, permissions: the user's to fix, in one line
                raise DataError(f"prepare into {self.out} failed: {e.strerror or e} "
                                f"({getattr(e, 'filename', None) or 'no file name'})") from None
            raise
        return path

    def _write_manifest(self, tok: Tokenizer, writers: dict[str, ShardWriter], fingerprint: str,
                        settings: dict[str, Any], seconds: float) -> Path:
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
        for s, st, rate in zip(self.sources, self.source_stats, self.rates):
            sources.append({**s.describe(), "documents": st.documents, "text_bytes": st.text_bytes,
                            "rate": round(rate, 6), "written_documents": st.written_documents,
                            "written_text_bytes": st.written_bytes})
        data = {
            "format": mf.FORMAT, "version": mf.VERSION, "dataset_id": dataset_id,
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                          "model_type": self.cfg.tokenizer_type, "pad_id": PAD_ID, "unk_id": UNK_ID,
                          "bos_id": BOS_ID, "eos_id": EOS_ID},
            "seq_len": L, "dtype": self.dtype, "row": self.fmt.to_dict(),
            "packing": {"row_tokens": L + 1, "stride": L, "eos_after_each_document": True,
                        "last_row": "padded with pad_id (labels masked by the loader)"},
            "splits": splits, "totals": totals, "sources": sources,
            "build": {"fingerprint": fingerprint, "settings": settings,
                      "timings": {**self.t.marks, "total_s": round(seconds, 3)},
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
        t, sp = d["totals"], d["splits"]
        enc = d["build"]["timings"].get("encode_write_s", 0) or 1e-9
        print(f"[prepare] done in {d['build']['timings']['total_s']:.1f}s: {t['documents']:,} documents "
              f"({sp['val']['documents']:,} val), {t['text_bytes'] / MB:.1f} MB text -> {t['tokens']:,} tokens, "
              f"{t['rows']:,} rows of {d['seq_len'] + 1} in {t['shards']} shards ({t['bytes'] / MB:.1f} MB, "
              f"{d['dtype']}); encode+write {t['text_bytes'] / MB / enc:.2f} MB/s", flush=True)
        if t["undecodable_bytes"]:
            print(f"[prepare] {t['undecodable_bytes']:,} undecodable bytes in {t['undecodable_documents']:,} "
                  f"documents were replaced with U+FFFD (first: {culprit})", flush=True)
        print(f"[prepare] tokenizer {self.out / TOKENIZER_NAME} ({d['tokenizer']['model_type']}, vocab "
              f"{d['tokenizer']['vocab_size']}); manifest {path}", flush=True)
