"""Issue 12.4, the loader at scale: bounded open files (2,000 shards under ``ulimit -n 256``),
start-up shard checks done once and shared by every rank (one skip decision for the whole job),
and ``pin_memory`` only where there is CUDA.

The datasets here are written directly in the shard format (``shards.build_records``) with a
stand-in tokenizer file: the loader only checks the tokenizer's sha256, and writing 2,000 shards
this way takes about a second, where ``prepare`` would tokenize a corpus first. Row ``g`` of a
dataset holds the tokens ``g, g+1, ...`` (uint16), so the first input id of a sample is its row id.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from data_assets import serve_directory
from data_pipeline import DataError, build_loader, load_manifest, loader_kwargs
from data_pipeline import storage
from data_pipeline.manifest import FORMAT, VERSION, compute_dataset_id
from data_pipeline.shards import RowFormat, build_records, shard_name
from dist_utils import run_distributed

SEQ_LEN = 7  # rows of 8 uint16 tokens: one 1 KiB tar record each, 10 KiB shards
SEED = 11


def write_dataset(folder: Path, n_shards: int, rows_per_shard: int) -> Path:
    """A train split of ``n_shards`` shards of ``rows_per_shard`` rows; returns manifest.json.

    Written as ``prepare`` would lay it out (same records, sizes, sha256s and dataset id) but
    without fsyncs or a tokenizer run: a test fixture, rebuilt per test session.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fmt = RowFormat(SEQ_LEN + 1, "uint16")
    tok = b"stand-in tokenizer model: the loader only checks its sha256\n"
    (folder / "tokenizer.model").write_bytes(tok)
    tok_sha = hashlib.sha256(tok).hexdigest()
    shards = []
    for k in range(n_shards):
        first = k * rows_per_shard
        ids = np.arange(first, first + rows_per_shard, dtype=np.int64)[:, None] + np.arange(SEQ_LEN + 1)
        rec = build_records(ids % 2**16, "train", k, 0, fmt)
        body = rec.tobytes() + bytes(fmt.shard_bytes(rows_per_shard) - rec.nbytes)
        (folder / shard_name("train", k)).write_bytes(body)
        shards.append({"url": shard_name("train", k), "rows": rows_per_shard, "bytes": len(body),
                       "sha256": hashlib.sha256(body).hexdigest()})
    rows = n_shards * rows_per_shard
    manifest = {
        "format": FORMAT, "version": VERSION,
        "dataset_id": compute_dataset_id(tok_sha, SEQ_LEN, fmt.dtype, [s["sha256"] for s in shards]),
        "tokenizer": {"file": "tokenizer.model", "sha256": tok_sha, "vocab_size": 2**16, "model_type": "bpe",
                      "pad_id": None, "unk_id": 0, "bos_id": None, "eos_id": 1},
        "seq_len": SEQ_LEN, "dtype": fmt.dtype, "row": fmt.to_dict(),
        "splits": {"train": {"rows": rows, "tokens": rows * SEQ_LEN, "documents": rows, "shards": shards}},
        "totals": {"rows": rows, "shards": n_shards}, "sources": [],
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def row_ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    """The row id of every sample, in the order handed out (row g starts with token g)."""
    return [int(i) for b in batches for i in b["input_ids"][:, 0]]


# -- 1. bounded open files ---------------------------------------------------------------------

N_SHARDS, ROWS_PER_SHARD, MICRO_BATCH = 2000, 3, 8  # 6,000 rows: 750 batches, an exact epoch

_EPOCH_UNDER_LIMIT = textwrap.dedent("""
    import json, os, sys
    from collections import Counter
    from data_pipeline import DataError, build_loader

    manifest, workers, max_open = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = {"workers": workers}
    try:
        ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=%d, seed=%d, num_workers=workers,
                          max_open_shards=max_open)
        seen, most_fds = Counter(), 0
        for batch in ld:
            seen.update(batch["input_ids"][:, 0].tolist())
            most_fds = max(most_fds, len(os.listdir("/proc/self/fd")))
        out.update(rows=ld.num_rows, seen=len(seen), total=sum(seen.values()),
                   repeated=sum(1 for c in seen.values() if c > 1), most_fds=most_fds, epoch=ld.epoch,
                   mapped=len(ld._source.open_shards))
    except DataError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""" % (MICRO_BATCH, SEED))


def _limit_open_files() -> None:  # runs in the child before exec: `ulimit -n 256`
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def epoch_under_ulimit(manifest: Path, workers: int, max_open: int) -> dict[str, Any]:
    """One epoch in a fresh process limited to 256 open files; its summary (or its error)."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _EPOCH_UNDER_LIMIT, str(manifest), str(workers), str(max_open)],
                          capture_output=True, text=True, env=env, preexec_fn=_limit_open_files, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("many_shards"), N_SHARDS, ROWS_PER_SHARD)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_over_2000_shards_under_ulimit_256(many_shards: Path, workers: int) -> None:
    """Every row of the 2,000 shards exactly once, in a process allowed 256 open files."""
    r = epoch_under_ulimit(many_shards, workers, max_open=storage.DEFAULT_MAX_OPEN_SHARDS)
    n = N_SHARDS * ROWS_PER_SHARD
    assert "error" not in r, r["error"]
    assert r["rows"] == n and r["seen"] == n and r["total"] == n and r["repeated"] == 0, r
    assert r["epoch"] == 1  # the whole epoch was handed out
    assert r["most_fds"] < 256
    if workers == 0:  # the consumer itself read: at most 64 shards mapped, whatever it touched
        assert 0 < r["mapped"] <= storage.DEFAULT_MAX_OPEN_SHARDS


def test_the_limit_is_real_without_the_bound(many_shards: Path) -> None:
    """The same epoch with (practically) no bound runs out of descriptors: a one-line DataError
    saying so, not a shard reported as corrupt."""
    r = epoch_under_ulimit(many_shards, 0, max_open=10 * N_SHARDS)
    assert "error" in r, r
    assert "out of file descriptors" in r["error"] and "\n" not in r["error"], r["error"]


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("few_shards"), 12, 5)


def test_lru_keeps_at_most_max_open_shards_mapped_and_reads_the_same(few_shards: Path) -> None:
    kw = dict(rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0)
    expected = row_ids(list(build_loader(few_shards, **kw)))
    ld = build_loader(few_shards, max_open_shards=3, **kw)
    mapped = ld._source.open_shards
    got, most = [], 0
    for batch in ld:
        got += row_ids([batch])
        most = max(most, len(mapped), sum(f._map is not None for f in ld._source.files))
    assert got == expected and sorted(got) == list(range(60))
    assert most == 3  # bounded, and the bound was reached (12 shards were read)
    with pytest.raises(DataError, match=r"max_open_shards=0 is invalid: must be >= 1"):
        build_loader(few_shards, max_open_shards=0, **kw)


def test_remote_shards_cached_locally_follow_the_same_bound(few_shards: Path, tmp_path: Path) -> None:
    """A server that ignores Range: the shards are read from local copies, at most 2 mapped."""
    kw = dict(rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0)
    expected = row_ids(list(build_loader(few_shards, **kw)))
    with serve_directory(few_shards.parent, ranges=False) as server:
        ld = build_loader(server.url + "manifest.json", cache_dir=tmp_path / "cache", max_open_shards=2, **kw)
        got, most = [], 0
        for batch in ld:
            got += row_ids([batch])
            most = max(most, sum(f._map is not None for f in ld._source.files))
    assert got == expected
    assert most == 2
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 12


# -- 2. shard checks done once, shared by every rank -------------------------------------------

VICTIM = 1  # the shard rank 1 alone finds damaged (rank 1 checks the odd shards of 2 ranks)


def _rank_sees_a_damaged_shard(info: Any, manifest: str) -> dict[str, Any]:
    """On rank 1 only, shard VICTIM looks truncated (as if that rank's view of the file differed);
    every rank records which shards it stat'ed, then reads one epoch with skip_corrupt."""
    from data_pipeline import loader as loader_mod

    assert loader_mod._checking_rank(VICTIM, 2) == 1
    checked: list[str] = []
    real_size_of = storage.size_of

    def size_of(location: str):
        checked.append(os.path.basename(location))
        size = real_size_of(location)
        if info.rank == 1 and location.endswith(shard_name("train", VICTIM)):
            return size - 1
        return size

    storage.size_of = size_of
    try:
        out: dict[str, Any] = {"rank": info.rank}
        try:
            build_loader(manifest, rank=info.rank, world_size=2, micro_batch_size=4, seed=SEED, num_workers=0)
        except DataError as e:  # without skip_corrupt: the same one line on both ranks
            out["error"] = str(e)
        checked.clear()
        ld = build_loader(manifest, rank=info.rank, world_size=2, micro_batch_size=4, seed=SEED, num_workers=1,
                          skip_corrupt=True)
        out.update(checked=sorted(checked), skipped=ld.skipped, num_rows=ld.num_rows, rows=row_ids(list(ld)))
        return out
    finally:
        storage.size_of = real_size_of


def test_a_damaged_shard_seen_by_one_rank_is_skipped_by_both(few_shards: Path, tmp_path: Path) -> None:
    res = run_distributed(_rank_sees_a_damaged_shard, 2, args=(str(few_shards),), timeout=240)
    victim = shard_name("train", VICTIM)
    names = [shard_name("train", k) for k in range(12)]
    # Each shard was checked once in the job: rank 0 the even ones, rank 1 the odd ones.
    assert res[0]["checked"] == names[0::2] and res[1]["checked"] == names[1::2]
    # One decision for the job: both ranks refuse, with the same line ...
    assert res[0]["error"] == res[1]["error"]
    assert res[0]["error"].startswith(f"shard {few_shards.parent / victim} is truncated or damaged")
    # ... or both leave the shard out, and read the rows of a dataset without it.
    assert res[0]["skipped"] == res[1]["skipped"] == [victim]
    assert res[0]["num_rows"] == res[1]["num_rows"] == 55
    # The same order as two ranks over a copy where the shard really is truncated (no process group).
    copy = tmp_path / "ds"
    shutil.copytree(few_shards.parent, copy)
    (copy / victim).write_bytes((copy / victim).read_bytes()[:-1])
    for r in range(2):
        ref = build_loader(copy / "manifest.json", rank=r, world_size=2, micro_batch_size=4, seed=SEED,
                           num_workers=0, skip_corrupt=True)
        assert ref.skipped == [victim]
        assert res[r]["rows"] == row_ids(list(ref))
    together = Counter(res[0]["rows"] + res[1]["rows"])
    assert set(together) == set(range(60)) - set(range(VICTIM * 5, VICTIM * 5 + 5))


def test_without_a_process_group_each_loader_checks_every_shard(few_shards: Path, monkeypatch) -> None:
    checked: list[str] = []
    real_size_of = storage.size_of
    monkeypatch.setattr(storage, "size_of", lambda loc: checked.append(loc) or real_size_of(loc))
    build_loader(few_shards, rank=1, world_size=2, micro_batch_size=4, seed=SEED, num_workers=0)
    assert len(checked) == 12


# -- 3. pin_memory -----------------------------------------------------------------------------

def test_pin_memory_is_not_attempted_without_cuda(few_shards: Path, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pin_memory attempted on a machine without CUDA")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: refuse() if kw.get("pin_memory") else real_empty(*a, **kw))
    kw = dict(rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0)
    pinned = build_loader(few_shards, pin_memory=True, **kw)
    assert pinned.pin_memory is False
    got = list(pinned)
    plain = list(build_loader(few_shards, **kw))
    assert len(got) == len(plain) and all(torch.equal(a["input_ids"], b["input_ids"])
                                          and torch.equal(a["labels"], b["labels"]) for a, b in zip(got, plain))


def test_loader_kwargs_pin_for_a_cuda_consumer_only() -> None:
    data = SimpleNamespace(num_workers=1, prefetch=2, verify_shards="size", skip_corrupt_shards=False, cache_dir=None)
    assert loader_kwargs(data)["pin_memory"] is False
    assert loader_kwargs(data, device="cpu")["pin_memory"] is False
    assert loader_kwargs(data, device=torch.device("cuda", 3))["pin_memory"] is True
    assert loader_kwargs(data, device="cuda:0")["pin_memory"] is True


def test_a_pickled_reader_starts_with_nothing_mapped(few_shards: Path) -> None:
    """Workers get the reader pickled (spawn) or inherited (fork): their maps are their own."""
    import pickle

    ld = build_loader(few_shards, rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0,
                      max_open_shards=4)
    next(iter(ld))
    assert len(ld._source.open_shards) > 0
    copy = pickle.loads(pickle.dumps(ld._source))
    assert len(copy.open_shards) == 0 and copy.open_shards.capacity == 4
    assert all(f._map is None and f.open_shards is copy.open_shards for f in copy.files)
    assert load_manifest(few_shards).splits["train"].rows == copy.num_rows
