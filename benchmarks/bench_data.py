"""Data pipeline benchmark: prepare throughput and loader throughput, each against its raw bound.

1. ``prepare`` (encode + pack + write shards) in MB of text per second, against raw
   ``SentencePieceProcessor.encode`` of the same documents with the same number of cores
   (``num_threads`` = every core), measured in the same run with the same tokenizer.
2. Loader tokens per second per process from local shards (one rank, ``num_workers=0``: the
   work one process does), against a raw sequential read of the same shard bytes.

Usage: ``python benchmarks/bench_data.py [--corpus-mb 8] [--seq-len 2048] [--variants]``.
Runs in well under 3 minutes on 2 cores; prints the figures and the two ratios.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.prepare import auto_parallelism, prepare_from_config  # noqa: E402
from data_pipeline.sources import resolve_sources  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402


def bench_prepare(root: Path, corpus_mb: float, seq_len: int, procs=None, threads=None) -> tuple[Path, float, float, dict]:
    """(manifest, MB/s wall, MB per CPU-second, stage timings) of the encode + pack + write stage."""
    cfg = DataConfig(sources=["stdlib"], dataset_dir=str(root), seq_len=seq_len, tokenizer_sample_mb=1.0,
                     shard_size_mb=16, max_corpus_mb=corpus_mb, encode_procs=procs, encode_threads=threads)
    manifest = prepare_from_config(cfg, vocab_size=8192, quiet=True)
    m = load_manifest(manifest)
    timings = m.raw["build"]["timings"]
    text_mb = m.totals["text_bytes"] / 1e6
    return manifest, text_mb / timings["encode_write_s"], text_mb / timings["encode_write_cpu_s"], timings


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_raw_encode(manifest: Path, cores: int) -> tuple[float, float]:
    """(MB/s wall, MB per CPU-second) of one SentencePiece batch encode with ``cores`` threads."""
    m = load_manifest(manifest)
    n_docs = m.sources[0]["documents"]  # a single source at rate 1: exactly these documents
    docs = list(islice(resolve_sources(["stdlib"])[0].documents(), n_docs))
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    tok = Tokenizer(Path(manifest).parent / "tokenizer.model")
    tok.encode_batch(docs[:20], num_threads=cores)  # warm up
    t, c = time.perf_counter(), _cpu()
    tok.encode_batch(docs, num_threads=cores)
    return text_mb / (time.perf_counter() - t), text_mb / (_cpu() - c)


def bench_loader(manifest: Path, micro_batch: int, seconds: float, num_workers: int) -> float:
    """Tokens/s handed to the consumer, over whole epochs (each in a new order). With workers, the
    clock runs from each epoch's first batch (worker start-up, once per epoch, is left out)."""
    ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=micro_batch, seed=0, num_workers=num_workers)
    tokens, busy = 0, 0.0
    while busy < seconds:
        it = iter(ld)
        t0 = time.perf_counter()
        if num_workers:
            next(it)
            t0 = time.perf_counter()
        for batch in it:
            tokens += batch["input_ids"].numel()
        busy += time.perf_counter() - t0
    return tokens / busy


def bench_raw_read(manifest: Path, seconds: float) -> float:
    m = load_manifest(manifest)
    shards = m.splits["train"].shards
    tokens_per_pass = sum(s.rows for s in shards) * m.seq_len
    passes, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in shards:
            with open(s.location, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass
        passes += 1
    return passes * tokens_per_pass / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0, help="per loader measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved prepare/raw pairs (best of each)")
    ap.add_argument("--variants", action="store_true", help="also time other (processes x threads) splits")
    args = ap.parse_args()
    procs, threads = auto_parallelism(None, None)
    cores = procs * threads
    print(f"cores: {cores} (prepare default: {procs} process(es) x {threads} sentencepiece threads)")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        # Interleaved and repeated, best of each: on a busy shared machine the wall-clock figures
        # swing with other load; MB per CPU-second (all threads) compares the work done instead.
        prep, raw, prep_cpu, raw_cpu = [], [], [], []
        for i in range(args.repeats):
            manifest, mbps, cpu_mbps, timings = bench_prepare(root / f"ds{i}", args.corpus_mb, args.seq_len)
            prep.append(mbps)
            prep_cpu.append(cpu_mbps)
            r_mbps, r_cpu = bench_raw_encode(manifest, cores)
            raw.append(r_mbps)
            raw_cpu.append(r_cpu)
        prep_mbps, raw_mbps = max(prep), max(raw)
        m = load_manifest(manifest)
        print(f"prepare: {m.totals['text_bytes'] / 1e6:.1f} MB stdlib text -> {m.totals['tokens']:,} tokens in "
              f"{m.totals['shards']} shards; stages (s): {timings}")
        print(f"prepare encode+pack+write: {prep_mbps:.2f} MB/s | raw SentencePiece encode, {cores} threads: "
              f"{raw_mbps:.2f} MB/s | ratio {prep_mbps / raw_mbps:.2f} (aim >= 0.7; best of {args.repeats}: "
              f"{', '.join(f'{p:.2f}' for p in prep)} vs {', '.join(f'{r:.2f}' for r in raw)})")
        print(f"  per CPU-second: prepare {max(prep_cpu):.2f} MB | raw encode {max(raw_cpu):.2f} MB | "
              f"ratio {max(prep_cpu) / max(raw_cpu):.2f}")
        if args.variants:
            for p, t in sorted({(1, cores), (cores, 1)} - {(procs, threads)}):
                _, mbps, _, _ = bench_prepare(root / f"ds_{p}x{t}", args.corpus_mb, args.seq_len, p, t)
                print(f"  variant {p} process(es) x {t} threads: {mbps:.2f} MB/s (ratio {mbps / raw_mbps:.2f})")
        bench_raw_read(manifest, 0.5)  # page cache warm for both measurements
        raw_tps = bench_raw_read(manifest, args.seconds)
        load_tps = bench_loader(manifest, args.micro_batch, args.seconds, num_workers=0)
        print(f"loader ({m.splits['train'].rows:,} rows of {args.seq_len + 1}, micro-batch {args.micro_batch}, "
              f"1 process): {load_tps / 1e6:.1f}M tokens/s | raw sequential read of the same bytes: "
              f"{raw_tps / 1e6:.1f}M tokens/s | ratio {load_tps / raw_tps:.2f} (aim: >= 50M tokens/s)")
        for nw in (1, 2):
            tps = bench_loader(manifest, args.micro_batch, args.seconds / 2, num_workers=nw)
            print(f"loader with {nw} worker process(es), consumer side (rows cross a process boundary): "
                  f"{tps / 1e6:.1f}M tokens/s")


if __name__ == "__main__":
    main()
