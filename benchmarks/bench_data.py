"""Data pipeline benchmark: prepare throughput and loader throughput, each against its raw bound.

1. ``prepare`` (encode + pack + write shards) in MB of text per second, against raw
   ``SentencePieceProcessor.encode`` of the same documents with the same number of cores
   (``num_threads`` = every core), measured in the same run with the same tokenizer.
2. ``prepare`` from **Parquet** (the same text written as Parquet row groups, read by the Parquet
   source, the tokenizer given with ``data.tokenizer``): MB per CPU-second (= MB/s per core) of the
   whole scan + encode + pack + write, against raw encode of the same text (aim >= 0.8).
3. Loader tokens per second per process from local shards (one rank, ``num_workers=0``: the
   work one process does), against a raw sequential read of the same shard bytes.
4. ``--cluster 1,2``: ``launch/slurm/prepare.sbatch`` on the SLURM cluster that ``SLURM_CONF``
   names (the local test cluster: ``. launch/slurm/testcluster/env.sh``), the same Parquet corpus
   in N parts: wall time of the array job, of the merge, and the speed-up over 1 part.

Usage: ``python benchmarks/bench_data.py [--corpus-mb 8] [--seq-len 2048] [--variants] [--cluster 1,2]``.
Runs in well under 3 minutes on 2 cores (plus the cluster runs); prints the figures and ratios.
"""

from __future__ import annotations

import argparse
import os
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


def write_parquet(docs: list[str], folder: Path, files: int = 4, row_group_rows: int = 256) -> Path:
    """The documents as ``files`` Parquet files (zstd, ``row_group_rows`` rows per row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for f in range(files):
        pq.write_table(pa.table({"text": docs[f * per:(f + 1) * per]}), folder / f"docs-{f:02d}.parquet",
                       row_group_size=row_group_rows, compression="zstd")
    return folder


def bench_parquet(root: Path, pq_dir: Path, tokenizer: Path, seq_len: int) -> tuple[float, float, dict]:
    """(MB/s wall, MB per CPU-second) of a whole prepare (scan + encode + pack + write) from Parquet."""
    cfg = DataConfig(sources=[{"path": str(pq_dir)}], dataset_dir=str(root), seq_len=seq_len, shard_size_mb=16,
                     tokenizer=str(tokenizer))
    c0 = _cpu_all()
    t0 = time.perf_counter()
    m = load_manifest(prepare_from_config(cfg, vocab_size=8192, quiet=True))
    wall, cpu = time.perf_counter() - t0, _cpu_all() - c0
    text_mb = m.totals["text_bytes"] / 1e6
    return text_mb / wall, text_mb / cpu, m.raw["build"]["timings"]


def _cpu_all() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_cluster(pq_dir: Path, tokenizer: Path, seq_len: int, parts: list[int], out: Path) -> None:
    """launch/slurm/prepare.sbatch with N parts, then the merge, on the cluster SLURM_CONF names."""
    import re
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SLAM_PYTHON": sys.executable, "SLAM_HOME": str(repo), "PYTHONPATH": str(repo)}

    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60).stdout

    def wait(job: str) -> None:
        while True:
            out_ = sh("scontrol", "-o", "show", "job", job)
            states = re.findall(r"JobState=(\S+)", out_)
            if states and all(st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for st in states):
                if any(st != "COMPLETED" for st in states):
                    raise SystemExit(f"cluster job {job} failed: {states}")
                return
            time.sleep(0.2)

    base = None
    for n in parts:
        ds = out / f"cluster_{n}"
        args = ["--config", str(repo / "configs" / "tiny_cpu.yaml"), "--set", f"data.dataset_dir={ds}",
                "--set", f"data.sources=[{{path: {pq_dir}}}]", "--set", f"data.tokenizer={tokenizer}",
                "--set", "model.vocab_size=8192", "--set", f"model.max_seq_len={seq_len}",
                "--set", f"data.seq_len={seq_len}", "--set", "data.shard_size_mb=16",
                "--set", "data.max_corpus_mb=null", "--set", "data.encode_procs=1", "--set", "data.encode_threads=1"]
        log = f"--output={out}/slurm-%x-%A_%a.out"
        t0 = time.perf_counter()
        jid = sh("sbatch", "--parsable", log, f"--array=0-{n - 1}", str(repo / "launch/slurm/prepare.sbatch"), *args).strip()
        wait(jid)
        t1 = time.perf_counter()
        mid = sh("sbatch", "--parsable", log, str(repo / "launch/slurm/prepare.sbatch"), "--merge", *args).strip()
        wait(mid)
        t2 = time.perf_counter()
        m = load_manifest(ds)
        text_mb = m.totals["text_bytes"] / 1e6
        base = base or (t1 - t0)
        print(f"cluster, {n} part(s) (1 core each): array job {t1 - t0:.1f}s ({text_mb / (t1 - t0):.2f} MB/s, "
              f"speed-up {base / (t1 - t0):.2f}x over 1 part; encode in the parts "
              f"{m.raw['build']['timings'].get('encode_s', 0):.1f} s summed), merge job {t2 - t1:.1f}s "
              f"(pack + write; {m.raw['build']['timings'].get('merge_s', 0):.2f}s inside), dataset {m.dataset_id[:12]}")


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
    ap.add_argument("--cluster", default="", help="e.g. 1,2: prepare.sbatch with these part counts on SLURM_CONF's cluster")
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
        # Parquet input, the tokenizer given: the whole prepare against raw encode of the same text.
        n_docs = m.sources[0]["documents"]
        docs = list(islice(resolve_sources(["stdlib"])[0].documents(), n_docs))
        pq_dir = write_parquet(docs, root / "parquet")
        tok_path = Path(manifest).parent / "tokenizer.model"
        pq_runs = [bench_parquet(root / f"pq{i}", pq_dir, tok_path, args.seq_len) for i in range(args.repeats)]
        pq_wall, pq_cpu = max(r[0] for r in pq_runs), max(r[1] for r in pq_runs)
        print(f"prepare from Parquet ({len(list(pq_dir.iterdir()))} files, row groups of 256 documents, tokenizer given), "
              f"scan + encode + pack + write: {pq_wall:.2f} MB/s wall, {pq_cpu:.2f} MB/s per core | raw encode "
              f"{max(raw_cpu):.2f} MB/s per core | ratio {pq_cpu / max(raw_cpu):.2f} (aim >= 0.8); stages (s): "
              f"{pq_runs[-1][2]}")
        if args.cluster:
            bench_cluster(pq_dir, tok_path, args.seq_len, [int(x) for x in args.cluster.split(",")],
                          Path(tempfile.mkdtemp(prefix="bench_cluster_", dir=os.environ.get("BENCH_SHARED_DIR"))))
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
