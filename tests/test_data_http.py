"""Requirement 7 (streaming over HTTP) and 8 (loading overlaps compute), against loopback servers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from data_assets import serve_directory, shared_tiny_dataset
from data_pipeline import DataError, Tokenizer, build_loader, load_manifest

SEED = 3


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return shared_tiny_dataset(tmp_path_factory)


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x["input_ids"] == y["input_ids"]).all() and (x["labels"] == y["labels"]).all()
                                    for x, y in zip(a, b))


def test_streams_from_an_http_manifest_reading_only_its_rows(tiny, tmp_path):
    local = [build_loader(tiny, rank=r, world_size=3, micro_batch_size=8, seed=SEED, num_workers=0) for r in range(3)]
    expected = [list(ld) for ld in local]
    m = load_manifest(tiny)
    total = sum(s.bytes for s in m.splits["train"].shards)
    largest = max(s.bytes for s in m.splits["train"].shards)
    with serve_directory(tiny.parent, ranges=True) as server:
        url = server.url + "manifest.json"
        remote = load_manifest(url)
        assert remote.is_remote and remote.dataset_id == m.dataset_id
        tok = Tokenizer(remote.tokenizer_path(cache_dir=tmp_path / "cache"))  # tokenizer fetched over HTTP
        assert tok.sha256 == m.tokenizer_sha256
        for r in range(3):
            before = server.bytes_sent
            ld = build_loader(remote, rank=r, world_size=3, micro_batch_size=8, seed=SEED, num_workers=2,
                              cache_dir=tmp_path / "cache")
            assert same(list(ld), expected[r])
            served = server.bytes_sent - before  # measured on the server, one rank at a time
            assert served == ld.bytes_read
            assert served <= 1.25 * total / 3 + largest


def test_server_without_range_support_falls_back_to_a_local_copy(tiny, tmp_path, capsys):
    expected = take(build_loader(tiny, rank=1, world_size=2, micro_batch_size=4, seed=SEED, num_workers=0), 30)
    with serve_directory(tiny.parent, ranges=False) as server:  # the plain http.server
        ld = build_loader(server.url + "manifest.json", rank=1, world_size=2, micro_batch_size=4, seed=SEED,
                          num_workers=0, cache_dir=tmp_path / "cache")
        assert same(take(ld, 30), expected)
    assert "ignores HTTP Range" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tar")


def test_truncated_remote_shard_is_named(tiny, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(tiny.parent, folder)
    victim = folder / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:1000])
    with serve_directory(folder) as server:
        with pytest.raises(DataError, match=r"train-000003\.tar is truncated"):
            build_loader(server.url + "manifest.json", rank=0, world_size=1, micro_batch_size=4, seed=SEED)
        (folder / "train-000003.tar").unlink()
        with pytest.raises(DataError, match=r"train-000003\.tar is missing"):
            build_loader(server.url + "manifest.json", rank=0, world_size=1, micro_batch_size=4, seed=SEED)


def test_loading_overlaps_compute(tiny):
    """Requirement 8: while the consumer computes, workers prepare the next batches, so the wait
    after a compute pause is a fraction of the wait without workers (measured by the loader)."""
    per_chunk = 8  # micro-batch 32: the loader reads 256 rows (8 batches) at a time
    with serve_directory(tiny.parent) as server:
        url = server.url + "manifest.json"
        kw = dict(rank=0, world_size=1, micro_batch_size=32, seed=SEED)  # one range request per row
        plain = build_loader(url, num_workers=0, **kw)
        it = iter(plain)
        take_n(it, per_chunk)
        plain.pop_wait_time()
        take_n(it, per_chunk)  # reads the next chunk while the consumer waits
        no_workers = plain.pop_wait_time() / per_chunk
        del it
        overlapped = build_loader(url, num_workers=2, prefetch=1, **kw)
        it = iter(overlapped)
        take_n(it, per_chunk)  # includes starting the workers
        time.sleep(1.5)  # "compute": the workers read the next chunks meanwhile
        overlapped.pop_wait_time()
        take_n(it, per_chunk)
        with_workers = overlapped.pop_wait_time() / per_chunk
        del it
    print(f"wait per batch: {no_workers * 1e3:.2f} ms without workers, {with_workers * 1e3:.3f} ms with")
    assert no_workers > 0.002  # the loopback range requests take real time
    assert with_workers < 0.5 * no_workers, (with_workers, no_workers)


def take_n(it, n: int) -> None:
    for _ in range(n):
        next(it)
