"""The loader's requirements, each proven on a real tiny dataset (ranks simulated in one process:
ranks share nothing but the manifest)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_assets import shared_tiny_dataset
from data_pipeline import DataError, build_loader, load_manifest

SEED = 7


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return shared_tiny_dataset(tmp_path_factory)


def row_keys(batch: dict) -> list[bytes]:
    """Each sample's full row (inputs + last target, pads restored) as bytes: its identity."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    full = torch.where(full == -100, 0, full)
    return [r.numpy().astype(np.int64).tobytes() for r in full]


def all_train_rows(manifest: Path) -> Counter:
    """Every training row, read with the plain webdataset pipeline."""
    m = load_manifest(manifest)
    urls = [s.location for s in m.splits["train"].shards]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return Counter(s["tokens.npy"].astype(np.int64).tobytes() for s in ds)


def global_sequence(loaders, rounds=None) -> list[bytes]:
    """Rows in stream-position order: round k = rank 0's batch k, then rank 1's, ..."""
    per_rank = []
    for ld in loaders:
        it = iter(ld)
        batches = list(it) if rounds is None else [next(it) for _ in range(rounds)]
        per_rank.append(batches)
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks yielded different batch counts: {counts}"
    seq: list[bytes] = []
    for k in range(counts.pop()):
        for r in range(len(loaders)):
            seq.extend(row_keys(per_rank[r][k]))
    return seq


def ranks(manifest, world, mbs, seed=SEED, num_workers=0, **kw):
    return [build_loader(manifest, rank=r, world_size=world, micro_batch_size=mbs, seed=seed,
                         num_workers=num_workers, **kw) for r in range(world)]


def test_batches_are_shaped_and_shifted(tiny):
    ld = build_loader(tiny, rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0)
    batch = next(iter(ld))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 128) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (4, 128) and batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels = next token


def test_deterministic_and_independent_of_workers(tiny):
    """Requirement 2: same seed -> same batches, with 0 or 2 workers; another seed -> another order."""
    a = global_sequence(ranks(tiny, 2, 8), rounds=40)
    b = global_sequence(ranks(tiny, 2, 8, num_workers=2, prefetch=2), rounds=40)
    assert a == b
    c = global_sequence(ranks(tiny, 2, 8, seed=SEED + 1), rounds=40)
    assert a != c and Counter(a[:8]) != Counter(c[:8])


def test_exact_resume_with_prefetching_workers(tiny):
    """Requirement 3: state after 7 batches (workers had prefetched more) -> the same continuation."""
    full = global_sequence(ranks(tiny, 2, 8), rounds=30)
    first = ranks(tiny, 2, 8, num_workers=2, prefetch=4)
    head = global_sequence(first, rounds=7)
    states = [ld.state_dict() for ld in first]
    assert states[0]["position"] == 7 * 16  # only batches handed out count
    resumed = ranks(tiny, 2, 8, num_workers=1)
    for ld, st in zip(resumed, states):
        ld.load_state_dict(st)
    tail = global_sequence(resumed, rounds=23)
    assert head + tail == full


def test_a_new_iter_continues_where_the_consumer_stopped(tiny):
    """iter() starts at the position: batches prefetched by an abandoned iterator are not lost."""
    straight = [row_keys(b) for b in take(build_loader(tiny, rank=0, world_size=1, micro_batch_size=8, seed=SEED,
                                                       num_workers=0), 12)]
    ld = build_loader(tiny, rank=0, world_size=1, micro_batch_size=8, seed=SEED, num_workers=2, prefetch=2)
    first = iter(ld)
    got = [row_keys(next(first)) for _ in range(5)]
    second = iter(ld)  # replaces (closes) the first iterator
    with pytest.raises(StopIteration):
        next(first)
    got += [row_keys(next(second)) for _ in range(7)]
    assert got == straight and ld.position == 12 * 8


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_elastic_resume_keeps_every_global_batch(tiny):
    """Requirement 4: global batch 8 at world 4 (mbs 2), then 2 (mbs 2, accum 2), then 8 (mbs 1).

    The stream continues with no sample repeated or skipped: the concatenated global sequence is
    exactly the uninterrupted one, and the epoch covers every row once."""
    n = load_manifest(tiny).splits["train"].rows
    reference = global_sequence(ranks(tiny, 2, 2))  # one full epoch, uninterrupted
    w4 = ranks(tiny, 4, 2)
    part1 = global_sequence(w4, rounds=25)  # 25 steps of 8
    state0 = w4[0].state_dict()
    assert state0["position"] == 200 and len(str(state0)) < 600  # small: a few scalars and ids
    w2 = ranks(tiny, 2, 2)
    for ld in w2:
        ld.load_state_dict(state0)  # rank 0's state handed to every new rank
    part2 = global_sequence(w2, rounds=2 * 30)  # 30 steps of 2 micro-batches
    w8 = ranks(tiny, 8, 1)
    all_states = [ld.state_dict() for ld in w2]
    for ld in w8:
        ld.load_state_dict(all_states)  # or the list of every rank's states
    part3 = global_sequence(w8)  # to the end of the epoch
    stitched = part1 + part2 + part3
    assert stitched[:n] == reference[:n]
    assert Counter(stitched[:n]) == all_train_rows(tiny)


def test_every_rank_same_count_with_uneven_shards_and_more_ranks_than_shards(tiny):
    """Requirement 5: 3 more ranks than shards, shards of unequal size -> equal, full batches."""
    m = load_manifest(tiny)
    sizes = [s.rows for s in m.splits["train"].shards]
    assert len(set(sizes)) > 1, "the tiny dataset should have uneven shards"
    world = len(sizes) + 3
    loaders = ranks(tiny, world, 4)
    lengths = {len(ld) for ld in loaders}
    assert len(lengths) == 1
    counts = []
    for ld in loaders:
        batches = list(ld)
        assert all(b["input_ids"].shape == (4, 128) for b in batches)
        counts.append(len(batches))
    assert set(counts) == lengths


def test_epochs_cover_every_row_once_in_a_new_order(tiny):
    """Requirement 6 (+ len() and the epoch advance of iter())."""
    rows = all_train_rows(tiny)
    n = sum(rows.values())
    loaders = ranks(tiny, 3, 5)
    assert loaders[0].epoch == 0
    expected_len = len(loaders[0])
    e0 = global_sequence(loaders)
    assert len(e0) == expected_len * 15 and loaders[0].epoch == 1
    e1 = global_sequence(loaders)
    stream = e0 + e1
    assert Counter(stream[:n]) == rows
    assert Counter(stream[n:2 * n]) == rows
    assert stream[:n] != stream[n:2 * n]


def test_bytes_read_per_rank_is_its_share(tiny):
    """Requirement 1: bytes per rank <= 1.25 x total/world + one shard, over a whole epoch."""
    m = load_manifest(tiny)
    shards = m.splits["train"].shards
    total = sum(s.bytes for s in shards)
    world = 4
    for ld in ranks(tiny, world, 4):
        for _ in ld:
            pass
        assert 0 < ld.bytes_read <= 1.25 * total / world + max(s.bytes for s in shards)


def test_wait_time_is_measured(tiny):
    """Requirement 8 (local part): consumer wait is accumulated and can be popped per interval."""
    ld = build_loader(tiny, rank=0, world_size=1, micro_batch_size=16, seed=SEED, num_workers=1, prefetch=2)
    it = iter(ld)
    for _ in range(5):
        next(it)
    waited = ld.pop_wait_time()
    assert waited > 0 and ld.wait_time_s == 0.0


def test_val_loader_gives_the_same_batches_each_time(tiny):
    m = load_manifest(tiny)
    mk = lambda: build_loader(tiny, rank=1, world_size=2, micro_batch_size=4, seed=SEED, num_workers=0, split="val")
    ld = mk()
    assert len(ld) == -(-m.splits["val"].rows // 8)
    first = [row_keys(b) for b in ld]
    again = [row_keys(b) for b in ld]
    fresh = [row_keys(b) for b in mk()]
    assert first == again == fresh and len(first) == len(ld)
    assert ld.state_dict()["position"] == 0


def test_padded_last_row_has_masked_labels(tiny):
    m = load_manifest(tiny)
    last = m.splits["train"].shards[-1]
    rows = [s["tokens.npy"] for s in wds.WebDataset(last.location, shardshuffle=False).decode()]
    pads = int((rows[-1][1:] == 0).sum())
    assert pads > 0 and all((r[1:] != 0).all() for r in rows[:-1])  # pad id 0 only pads the tail
    ld = build_loader(tiny, rank=0, world_size=1, micro_batch_size=64, seed=SEED, num_workers=0)
    masked = sum(int((b["labels"] == -100).sum()) for b in ld)
    assert masked == pads


def test_state_from_another_seed_or_dataset_is_refused(tiny, tmp_path):
    ld = build_loader(tiny, rank=0, world_size=1, micro_batch_size=4, seed=SEED, num_workers=0)
    state = ld.state_dict()
    other = build_loader(tiny, rank=0, world_size=1, micro_batch_size=4, seed=SEED + 1, num_workers=0)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="another dataset"):
        ld.load_state_dict({**state, "dataset_id": "0" * 64})
    with pytest.raises(DataError, match="disagree"):
        ld.load_state_dict([state, {**state, "position": 8}])


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny.parent, dst)
    return dst / "manifest.json"


def test_corrupted_shard_is_named_or_skipped(tiny, tmp_path):
    manifest = _copy(tiny, tmp_path / "ds")
    m = load_manifest(manifest)
    victim = m.splits["train"].shards[2]
    with open(victim.location, "r+b") as f:  # flip bytes inside row data, same size
        f.seek(m.row_format.record_bytes * 5 + m.row_format.data_offset + 10)
        f.write(b"\xff\xfe\xfd\xfc")
    ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=32, seed=SEED, num_workers=0)
    with pytest.raises(DataError, match=r"train-000002\.tar.*CRC-32"):
        for _ in ld:
            pass
    with pytest.raises(DataError, match=r"train-000002\.tar.*sha256"):
        build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=SEED, verify="full")
    skipping = [build_loader(manifest, rank=r, world_size=2, micro_batch_size=4, seed=SEED, num_workers=0,
                             verify="full", skip_corrupt=True) for r in range(2)]
    assert all(ld.skipped == ["train-000002.tar"] for ld in skipping)
    assert skipping[0].num_rows == m.splits["train"].rows - victim.rows
    seq = global_sequence(skipping)
    assert len(seq) >= skipping[0].num_rows


def test_truncated_or_missing_shard_is_named(tiny, tmp_path):
    manifest = _copy(tiny, tmp_path / "ds")
    m = load_manifest(manifest)
    victim = Path(m.splits["train"].shards[1].location)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(DataError, match=r"train-000001\.tar is truncated"):
        build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=SEED)
    ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=SEED, skip_corrupt=True, num_workers=0)
    n_batches = len(ld)
    assert ld.skipped == ["train-000001.tar"] and len(list(ld)) == n_batches
    victim.unlink()
    with pytest.raises(DataError, match=r"train-000001\.tar is missing"):
        build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=SEED)


def test_bad_arguments_are_one_line_errors(tiny, tmp_path):
    with pytest.raises(DataError, match="rank=2 world_size=2"):
        build_loader(tiny, rank=2, world_size=2, micro_batch_size=4, seed=SEED)
    with pytest.raises(DataError, match="split 'test'"):
        build_loader(tiny, rank=0, world_size=1, micro_batch_size=4, seed=SEED, split="test")
    with pytest.raises(DataError, match="not found"):
        build_loader(tmp_path / "nothing" / "manifest.json", rank=0, world_size=1, micro_batch_size=4, seed=SEED)


def _damage_row(manifest: Path, shard: int, row: int) -> bytes:
    """Flip bytes inside one row's tokens (same file size); returns the intact row that follows it."""
    m = load_manifest(manifest)
    victim = m.splits["train"].shards[shard]
    rows = [s["tokens.npy"] for s in wds.WebDataset(victim.location, shardshuffle=False).decode()]
    with open(victim.location, "r+b") as f:
        f.seek(m.row_format.record_bytes * row + m.row_format.data_offset + 10)
        f.write(b"\xff\xfe\xfd\xfc")
    return rows[row + 1].astype(np.int64).tobytes()


def test_damaged_row_mid_run_is_named_in_one_line_from_workers_too(tiny, tmp_path):
    """Issue 10.7: a row failing its CRC while training (verify_shards=size) is one line naming
    the shard and row, also when a DataLoader worker met it (not the worker's traceback)."""
    manifest = _copy(tiny, tmp_path / "ds")
    _damage_row(manifest, 2, 5)
    for workers in (0, 1):
        ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=8, seed=SEED, num_workers=workers)
        with pytest.raises(DataError) as e:
            for _ in ld:
                pass
        msg = str(e.value)
        assert "train-000002.tar: row 5 fails its CRC-32 check" in msg and "skip_corrupt_shards=true" in msg, msg
        assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg, msg


def test_damaged_row_mid_run_is_skipped_alike_on_every_rank_and_resume(tiny, tmp_path, capfd):
    """Issue 10.7: with skip_corrupt_shards the run goes on; the damaged row's place is taken by
    the next intact row, decided by the data alone: the same with 1 or 2 ranks, any number of
    workers, and across a resume (the loader state stays one number)."""
    manifest = _copy(tiny, tmp_path / "ds")
    replacement = _damage_row(manifest, 2, 5)
    clean = global_sequence(ranks(tiny, 2, 4))
    capfd.readouterr()
    two = global_sequence(ranks(manifest, 2, 4, num_workers=1, skip_corrupt=True))
    err = capfd.readouterr().err
    changed = [i for i, (a, b) in enumerate(zip(clean, two)) if a != b]
    assert len(two) == len(clean) and len(changed) == 1  # only the damaged row's place differs
    assert two[changed[0]] == replacement
    assert err.count("train-000002.tar: row 5 fails its CRC-32 check (corrupted shard); skipped") == 1, err
    assert "row 6 of train-000002.tar is read in its place" in err

    one = global_sequence(ranks(manifest, 1, 8, num_workers=2, skip_corrupt=True))
    assert one == two  # same decision with another world size and worker count
    first = build_loader(manifest, rank=0, world_size=1, micro_batch_size=8, seed=SEED, num_workers=1,
                         skip_corrupt=True)
    it = iter(first)
    head = [k for _ in range(len(first) // 2) for k in row_keys(next(it))]
    state = first.state_dict()
    again = build_loader(manifest, rank=0, world_size=1, micro_batch_size=8, seed=SEED, num_workers=1,
                         skip_corrupt=True)
    again.load_state_dict(state)
    tail = [k for b in again for k in row_keys(b)]
    assert head + tail == one  # resume: exactly the uninterrupted sequence


def test_damaged_tokenizer_or_edited_manifest_is_named_at_start(tiny, tmp_path):
    """Issue 10.2: a damaged tokenizer.model is a one-line error naming it when the dataset is
    opened for training (not after training, when the final export reads a checkpoint's copy);
    a manifest whose own entries contradict each other is one too."""
    from data_pipeline import check_compatible

    manifest = _copy(tiny, tmp_path / "ds")
    tok = manifest.parent / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tok.write_bytes(bytes(data))
    for opener in (lambda: build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=SEED),
                   lambda: check_compatible(manifest, 2048, 128),
                   lambda: load_manifest(manifest).tokenizer_path()):
        with pytest.raises(DataError) as e:
            opener()
        msg = str(e.value)
        assert f"dataset file {tok} is damaged or was replaced" in msg and str(manifest) in msg, msg
        assert "\n" not in msg

    import json

    edited = _copy(tiny, tmp_path / "ds2")
    d = json.loads(edited.read_text())
    d["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    edited.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"manifest .*ds2/manifest.json is damaged or was edited \(its dataset_id"):
        load_manifest(edited)
    d = json.loads((tiny).read_text())
    d["splits"]["train"]["rows"] += 1
    edited.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"is damaged or was edited \(splits.train.rows="):
        load_manifest(edited)
