"""The streaming loader: exact, elastic, and each rank reads only its own rows.

Design
------
*One global sample order, independent of the world size.* The training split is N fixed-size
rows. The stream of samples is epoch 0's order, then epoch 1's, ...: stream position ``p`` is
row ``perm_e(p mod N)`` with ``e = p // N`` and ``perm_e`` a seeded bijection of [0, N)
(``order.py``: keyed by seed, epoch and split; computed per index, no N-sized array).

*Ranks take consecutive slices of it.* With micro-batch b and world size W, one "round" is the
next M = b * W positions; rank r takes positions ``[s + r*b, s + r*b + b)`` of the round that
starts at ``s``. So every rank yields the same number of full batches, whatever the shard sizes
and even with more ranks than shards (no rank ever waits for a batch another rank lacks), and a
global step of G = b * W * grad_accum samples always covers positions ``[k*G, (k+1)*G)``.

*The state is one number:* ``position`` = samples handed to the consumers of all ranks together
(= batches handed out here x M; prefetched batches are not counted). ``state_dict()`` also holds
the seed, dataset id and split as checks. Elastic resume: save at world size W, resume at W'
with the same global batch; hand rank 0's state (or the list of every rank's states, which must
agree) to every new rank's ``load_state_dict()``; they continue at the same position, so no
sample is repeated or skipped. Exact resume is the special case W' = W.

*Epochs.* ``iter()`` yields the rounds that start inside the current epoch, from the current
position; afterwards the loader is in the next epoch (a new order). A round that starts near the
end of an epoch finishes with the first positions of the next one, so nothing is dropped and no
rank is padded: each epoch's N positions cover every training row exactly once. ``len()`` is the
number of rounds starting in the current epoch (floor or ceil of N / M).

*Bytes per rank.* Rows are fixed-size tar records (``shards.py``), so the byte range of any row
is known: a rank reads exactly its rows (a memory map locally, HTTP range requests remotely,
consecutive rows coalesced). Per epoch a rank reads ~N/W records = total/W bytes. (A server
that ignores Range costs each process one full download of each shard, into ``cache_dir``.)

*Determinism with workers.* Rounds are grouped in chunks of ~256 rows; worker w of
``num_workers`` builds the chunks c with c % num_workers == w and torch's DataLoader returns
them round-robin, i.e. in order: the batch sequence does not depend on the number of workers.
Prefetching happens chunk-wise; the position counts only batches handed to the consumer.
Nothing is seeded from time, pid or hash().

*Cut rows (staged context extension).* ``set_seq_len(L)`` hands out sequences of L tokens from
rows prepared at R = ``manifest.seq_len`` tokens, L dividing R: each row (R + 1 tokens: inputs
row[:-1], labels row[1:]) becomes its R / L consecutive pieces, piece i with inputs
row[iL:(i+1)L] and labels row[iL+1:(i+1)L+1], in order, next to each other in the batch
([b * R/L, L] instead of [b, R]). Every token is still an input once and a target once: nothing
is repeated or skipped. The state stays one number, counted in prepared rows, and the cut is
applied only when a batch is handed over (after prefetching), so changing L between two batches
(a phase switch at a step boundary) needs no restart and a resume at any position gives the same
batches whatever L was before. Set L on every rank alike (the trainer does, from the step).

*Validation split.* ``split="val"`` uses a fixed order (epoch 0 of the val permutation) and every
``iter()`` starts from the beginning: ceil(N_val / M) rounds, the last one wrapping around to the
first rows. The same batches every time.

*Integrity.* At start the tokenizer is checked against the manifest's sha256 and each shard's
size (``verify="size"``) or sha256 (``"full"``, reads every shard once) is checked; a missing,
truncated or corrupted shard is a DataError naming it, or, with ``skip_corrupt=True``, left out.
When ``torch.distributed`` is initialized with the loader's rank and world size, the shard checks
are split across the ranks (rank r checks shards r, r+W, ...: each file is stat'ed, HEADed or
hashed once per job, not once per rank) and the findings are gathered, so every rank raises the
same error or leaves out the same shards, hence reads the same row order; building the loader is
then a collective (every rank builds it, as the trainer does). Without a process group (or with
one of another size) the loader checks every shard itself, as a single process. While reading,
each row's name and CRC-32 are checked; a damaged row (or a shard that became unreadable) is a CorruptData naming the
shard and row, or, with ``skip_corrupt=True``, replaced by the next intact row of the split and
reported once (see ``_RowSource``): a function of the data only, so every rank, worker count and
resume decides alike. Errors met in worker processes reach the consumer as the same one line.

*Bounded open files.* A reader (the consumer without workers, or each worker) keeps at most
``max_open_shards`` shards mapped (``storage.OpenShards``, least recently used closed first), so
thousands of shards stay under the open-files limit; remote shards are read with range requests
(no descriptor kept), or from their local copies under the same bound.

*Pinned batches.* With ``pin_memory=True`` (the consumer's device is CUDA, ``loader_kwargs(...,
device=...)``) each batch is built directly in page-locked memory, so ``.to("cuda",
non_blocking=True)`` is a real asynchronous copy; without CUDA the flag does nothing.

*Workers die with the trainer:* ``die_with_parent`` (PR_SET_PDEATHSIG) in each worker.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import order, storage
from data_pipeline.errors import CorruptData, DataError
from data_pipeline.lifecycle import die_with_parent
from data_pipeline.manifest import Manifest, ShardInfo, default_cache_dir, load_manifest
from data_pipeline.shards import RowFormat, bad_records, corrupt_row_error, tokens_of

STATE_VERSION = 1
IGNORE_INDEX = -100
_GROUP_POSITIONS = 256  # rows per chunk: a worker orders, reads and hands over this many at once


class _RowSource:
    """The kept shards of one split: maps row ids to (shard, row) and reads them. Picklable.

    Damaged data met while reading (a row failing its CRC-32 or not where the manifest says, a
    shard gone or truncated since start-up) raises CorruptData naming the shard and row, or, with
    ``skip_corrupt``, is skipped: the damaged row's place in the batch is taken by the next intact
    row of the split (row id + 1, + 2, ..., wrapping around). That choice depends only on the
    data, so it is the same on every rank, worker count and resume, and the loader state stays one
    number.
    """

    def __init__(self, shards: list[ShardInfo], split: str, fmt: RowFormat, cache_dir: Path, check_crc: bool,
                 skip_corrupt: bool = False, max_open_shards: int = storage.DEFAULT_MAX_OPEN_SHARDS):
        self.split, self.fmt, self.check_crc, self.skip_corrupt = split, fmt, check_crc, skip_corrupt
        self.infos = shards
        # One bound for all shards of this reader (pickled along: each worker gets its own, empty).
        self.open_shards = storage.OpenShards(max_open_shards)
        self.files = [storage.ShardFile(s.location, s.bytes, s.sha256, fmt.record_bytes, s.rows, cache_dir,
                                        open_shards=self.open_shards)
                      for s in shards]
        self.starts = np.concatenate(([0], np.cumsum([s.rows for s in shards]))).astype(np.int64)
        self._unreadable: dict[int, str] = {}  # shard -> problem (per process: found while reading)
        self._replacement: dict[int, int] = {}  # damaged row id -> the intact row read in its place

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, int, list[str]]:
        """Token rows [k, row_tokens] for row ids [k], the bytes transferred, and one line per
        damaged row skipped (only with ``skip_corrupt``; otherwise the first one raises)."""
        order_ = np.argsort(rows, kind="stable")  # shard by shard, ascending offsets in each
        srt = rows[order_]
        shard_of = np.searchsorted(self.starts, srt, side="right") - 1
        cuts = np.concatenate(([0], np.flatnonzero(np.diff(shard_of)) + 1, [srt.size])).tolist()
        out = np.empty((rows.size, self.fmt.row_tokens), dtype=self.fmt.np_dtype)
        segments = [(int(shard_of[a]), a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        wanted = [srt[a:b] - self.starts[s] for s, a, b in segments]
        requests = [(self.files[s], local) for (s, _, _), local in zip(segments, wanted)]
        one_by_one = lambda: [self._read_shard(s, local) for (s, _, _), local in zip(segments, wanted)]  # noqa: E731
        results: list
        if any(s in self._unreadable for s, _, _ in segments):
            results = one_by_one()
        else:
            try:
                results = storage.read_many(requests)
            except CorruptData:
                if not self.skip_corrupt:
                    raise
                results = one_by_one()
        nbytes, skipped = 0, []
        for (s, a, b), local, res in zip(segments, wanted, results):
            info = self.infos[s]
            if res is None:  # the whole shard is unreadable
                bad = [(i, self._unreadable[s]) for i in range(b - a)]
            else:
                rec, nb = res
                nbytes += nb
                bad = bad_records(rec, local, self.split, info.index, self.fmt, self.check_crc)
                if bad and not self.skip_corrupt:
                    i, problem = bad[0]
                    raise corrupt_row_error(info.location, int(local[i]), problem)
                out[order_[a:b]] = tokens_of(rec, self.fmt)
            for i, problem in bad:
                row = int(self.starts[s] + local[i])
                sub, nb = self._intact_replacement(row)
                out[order_[a + i]] = sub
                nbytes += nb
                s2, local2 = self._locate(self._replacement[row])
                skipped.append(f"shard {info.location}: row {int(local[i])} {problem}; skipped "
                               f"(data.skip_corrupt_shards): row {local2} of {self.infos[s2].url} is read in its place")
        return out, nbytes, skipped

    def _locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within the shard) of row id ``row``."""
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        return s, int(row - self.starts[s])

    def _read_shard(self, s: int, local: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
        """Records of rows ``local`` of shard ``s``, or None when the shard cannot be read at all."""
        if s in self._unreadable:
            return None
        try:
            return self.files[s].read(local)
        except CorruptData as e:
            self._unreadable[s] = f"is in a shard that cannot be read now ({str(e).split('; re-run')[0]})"
            return None

    def _row_if_intact(self, row: int) -> Optional[tuple[np.ndarray, int]]:
        s, j = self._locate(row)
        local = np.array([j], dtype=np.int64)
        res = self._read_shard(s, local)
        if res is None:
            return None
        rec, nb = res
        info = self.infos[s]
        if bad_records(rec, local, self.split, info.index, self.fmt, self.check_crc):
            return None
        return tokens_of(rec, self.fmt)[0], nb

    def _intact_replacement(self, row: int) -> tuple[np.ndarray, int]:
        """The first intact row after ``row`` (wrapping around) and the bytes read to find it."""
        n = self.num_rows
        if row in self._replacement:
            got = self._row_if_intact(self._replacement[row])
            if got is not None:
                return got
        nbytes, step = 0, 1
        while step < n:
            cand = (row + step) % n
            s, j = self._locate(cand)
            if s in self._unreadable:  # jump to the next shard's first row
                step += self.infos[s].rows - j
                continue
            got = self._row_if_intact(cand)
            if got is not None:
                self._replacement[row] = cand
                return got[0], nbytes + got[1]
            nbytes += self.fmt.record_bytes
            step += 1
        raise CorruptData(f"no intact {self.split} row left to read in place of damaged ones: every shard "
                          "is damaged; re-run `slam-pretrain prepare`")


class _Chunk:
    """Rows [g, b, L+1] of g consecutive rounds, on their way from a worker to the consumer.

    Workers hand over whole chunks (not single batches): one queue transfer per ~256 rows instead
    of per batch, and plain bytes, which pickle fast (tensors would go through shared-memory
    handles, several times slower for small batches). ``skipped``: one line per damaged row that
    was skipped, reported by the consumer (once each).
    """

    __slots__ = ("data", "shape", "nbytes", "skipped")

    def __init__(self, rows: np.ndarray, nbytes: int, as_bytes: bool, skipped: Sequence[str] = ()):
        self.data = rows.tobytes() if as_bytes else rows
        self.shape, self.nbytes, self.skipped = rows.shape, nbytes, list(skipped)


class _Failure:
    """A DataError raised in a worker, handed to the consumer to raise as the same one line
    (DataLoader would re-raise it with the worker's traceback folded into the message)."""

    __slots__ = ("message", "corrupt")

    def __init__(self, error: DataError):
        self.message, self.corrupt = str(error), isinstance(error, CorruptData)

    def error(self) -> DataError:
        return (CorruptData if self.corrupt else DataError)(self.message)


class _Rounds(IterableDataset):
    """Chunks of rounds ``0 .. count - 1`` after stream position ``start``, for one rank.

    Chunk c holds rounds [c*g, (c+1)*g); worker w of n builds chunks c = w, w+n, ... and the
    DataLoader hands them over round-robin, i.e. in chunk order, for any number of workers.
    """

    def __init__(self, source: _RowSource, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 start: int, count: int, fixed: bool):
        super().__init__()
        self.source, self.rank, self.W, self.b = source, rank, world_size, micro_batch_size
        self.seed, self.start, self.count, self.fixed = seed, start, count, fixed
        self.per_chunk = max(1, _GROUP_POSITIONS // micro_batch_size)

    def __iter__(self) -> Iterator[Union[_Chunk, _Failure]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n, b, M, g = self.source.num_rows, self.b, self.b * self.W, self.per_chunk
        for c in range(wid, -(-self.count // g), nw):
            ks = np.arange(c * g, min((c + 1) * g, self.count), dtype=np.int64)
            pos = self.start + ks[:, None] * M + self.rank * b + np.arange(b)  # [g, b]
            if self.fixed:
                rows = order.rows_at(pos.ravel() % n, n, self.seed, self.source.split, fixed_epoch=0)
            else:
                rows = order.rows_at(pos.ravel(), n, self.seed, self.source.split)
            try:
                tokens, nbytes, skipped = self.source.read(rows)
            except DataError as e:
                if info is None:
                    raise
                yield _Failure(e)
                return
            yield _Chunk(tokens.reshape(ks.size, b, -1), nbytes, as_bytes=info is not None, skipped=skipped)


class TokenLoader:
    """Iterable of ``{"input_ids": LongTensor[b, L], "labels": LongTensor[b, L]}`` for one rank."""

    def __init__(self, manifest: Manifest, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 num_workers: int = 1, split: str = "train", prefetch: int = 4, verify: str = "size",
                 skip_corrupt: bool = False, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 pin_memory: bool = False, max_open_shards: int = storage.DEFAULT_MAX_OPEN_SHARDS):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"loader rank={rank} world_size={world_size} is invalid: need 0 <= rank < world_size")
        if micro_batch_size < 1:
            raise DataError(f"train.micro_batch_size={micro_batch_size} is invalid: must be >= 1")
        if num_workers < 0 or prefetch < 1:
            raise DataError(f"data.num_workers={num_workers} / data.prefetch={prefetch} are invalid: need >= 0 / >= 1")
        if max_open_shards < 1:
            raise DataError(f"max_open_shards={max_open_shards} is invalid: must be >= 1")
        if verify not in ("size", "full", "none"):
            raise DataError(f"data.verify_shards={verify!r} is invalid: one of 'size', 'full', 'none'")
        if split not in manifest.splits:
            raise DataError(f"split {split!r} is not in {manifest.location}: one of {sorted(manifest.splits)}")
        self.manifest, self.rank, self.world_size, self.micro_batch_size = manifest, rank, world_size, micro_batch_size
        self.seed, self.split, self.num_workers, self.prefetch = int(seed), split, num_workers, prefetch
        # Page-locked memory needs CUDA; on a machine without it there is nothing to pin for.
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        shards = manifest.splits[split].shards
        bad = _startup_checks(manifest, shards, verify, rank, world_size)
        if bad and not skip_corrupt:
            s, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"shard {s.location} {why}{more}: re-run `slam-pretrain prepare`, or set "
                            "data.skip_corrupt_shards=true to leave such shards out")
        for s, why in bad:
            storage.warn_once(f"skipping shard {s.location}: {why}")
        self.skipped = [s.url for s, _ in bad]
        kept = [s for s in shards if s.url not in set(self.skipped)]
        if not kept:
            raise DataError(f"no usable {split} shard left in {manifest.location}")
        cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
        self._source = _RowSource(kept, split, manifest.row_format, cache, check_crc=verify != "none",
                                  skip_corrupt=skip_corrupt, max_open_shards=max_open_shards)
        pad = manifest.tokenizer.get("pad_id", 0)
        self.pad_id = -1 if pad is None else int(pad)  # None: no pad token, no padded row (tail dropped)
        self._position = 0
        self._cut = 1  # pieces per prepared row (set_seq_len)
        self._active: Optional[weakref.ref] = None  # weak: no loader <-> generator cycle
        self.wait_time_s = 0.0  # cumulative time the consumer waited in next(); see pop_wait_time()
        self.bytes_read = 0  # bytes this rank transferred from the shards (all workers)

    # -- sizes and positions ---------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self._source.num_rows

    @property
    def row_len(self) -> int:
        """Tokens per prepared row (inputs; the manifest's seq_len)."""
        return self.manifest.row_format.row_tokens - 1

    @property
    def seq_len(self) -> int:
        """Tokens per sequence handed out: row_len, or what ``set_seq_len`` chose."""
        return self.row_len // self._cut

    def set_seq_len(self, seq_len: Optional[int]) -> None:
        """Hand out sequences of ``seq_len`` tokens (None: the prepared length), each prepared row
        cut into row_len / seq_len consecutive pieces (see the module doc). Takes effect with the
        next batch handed over, also in an iteration under way."""
        row = self.row_len
        n = row if seq_len is None else seq_len
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or row % n:
            raise DataError(f"seq_len={seq_len!r} is invalid for {self.manifest.location}: it must divide the "
                            f"prepared row length {row} (data.seq_len; e.g. {row // 2}, {row // 4})")
        self._cut = row // n

    @property
    def round_size(self) -> int:
        """Samples per round over all ranks (micro_batch_size * world_size)."""
        return self.micro_batch_size * self.world_size

    @property
    def position(self) -> int:
        """Samples consumed so far by all ranks together (the resume state)."""
        return self._position

    @property
    def epoch(self) -> int:
        return 0 if self.split == "val" else self._position // self.num_rows

    def _epoch_rounds(self) -> tuple[int, int]:
        """(first position, number of rounds) that the next iter() yields."""
        n, M = self.num_rows, self.round_size
        if self.split == "val":
            return 0, -(-n // M)
        p = self._position
        end = (p // n + 1) * n
        return p, -(-(end - p) // M)

    def __len__(self) -> int:
        n, M = self.num_rows, self.round_size
        if self.split == "val":
            return -(-n // M)
        p, e = self._position, self._position // n
        # Rounds p + k*M (any integer k) that start in [e*n, (e+1)*n).
        return -(-((e + 1) * n - p) // M) - -(-(e * n - p) // M)

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._close_active()  # one live iterator: a new iter() drops the old one's prefetch
        gen = self._run()
        self._active = weakref.ref(gen)
        return gen

    def _close_active(self) -> None:
        gen = self._active() if self._active is not None else None
        if gen is not None:
            gen.close()
        self._active = None

    def _run(self) -> Iterator[dict[str, torch.Tensor]]:
        start, count = self._epoch_rounds()
        ds = _Rounds(self._source, rank=self.rank, world_size=self.world_size, micro_batch_size=self.micro_batch_size,
                     seed=self.seed, start=start, count=count, fixed=self.split == "val")
        chunks = -(-count // ds.per_chunk)
        if self.num_workers == 0:
            inner: Iterator = iter(ds)
        else:
            # Workers die with this process (a SIGKILLed trainer must not leave them blocked on its queue).
            dl = DataLoader(ds, batch_size=None, num_workers=min(self.num_workers, chunks) or 1,
                            prefetch_factor=self.prefetch, persistent_workers=False,
                            worker_init_fn=functools.partial(die_with_parent, os.getpid()))
            inner = iter(dl)
        dtype = self.manifest.row_format.np_dtype
        try:
            for _ in range(chunks):
                t0 = time.perf_counter()
                chunk = next(inner)
                self.wait_time_s += time.perf_counter() - t0
                if isinstance(chunk, _Failure):
                    raise chunk.error()
                for line in chunk.skipped:
                    storage.warn_once(line)
                self.bytes_read += chunk.nbytes
                rows = chunk.data
                if isinstance(rows, bytes):
                    rows = np.frombuffer(rows, dtype=dtype).reshape(chunk.shape)
                for i in range(rows.shape[0]):
                    batch = self._batch(rows[i])
                    if self.split != "val":
                        self._position += self.round_size  # counted when handed out, never when prefetched
                    yield batch
        finally:
            shutdown = getattr(inner, "_shutdown_workers", None)
            if shutdown is not None:  # stop the workers now; their prefetched chunks are dropped
                shutdown()

    def _batch(self, data: np.ndarray) -> dict[str, torch.Tensor]:
        b, width = data.shape  # [b, R+1]
        cut = self._cut
        # Pinned: allocate the tensors page-locked and fill them in place (no second copy to pin).
        # [b * cut, R / cut] is [b, R] in memory: row i's pieces are rows i*cut .. i*cut + cut - 1.
        input_ids = torch.empty((b * cut, (width - 1) // cut), dtype=torch.int64, pin_memory=self.pin_memory)
        labels_t = torch.empty((b * cut, (width - 1) // cut), dtype=torch.int64, pin_memory=self.pin_memory)
        inputs, labels = input_ids.numpy().reshape(b, width - 1), labels_t.numpy().reshape(b, width - 1)  # views
        inputs[...] = data[:, :-1]  # widen and shift in one pass each
        labels[...] = data[:, 1:]
        padded = np.nonzero(data[:, -1] == self.pad_id)[0] if self.pad_id >= 0 else ()  # a split's last row
        for i in list(padded):
            labels[i][labels[i] == self.pad_id] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels_t}

    def pop_wait_time(self) -> float:
        """Consumer wait time since the last call (for a per-log-interval ``data_wait_s``)."""
        w, self.wait_time_s = self.wait_time_s, 0.0
        return w

    # -- resume ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "dataset_id": self.manifest.dataset_id, "split": self.split,
                "seed": self.seed, "position": self._position, "epoch": self.epoch, "num_rows": self.num_rows,
                "skipped_shards": list(self.skipped), "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: Union[dict[str, Any], Sequence[dict[str, Any]]]) -> None:
        """Continue from a saved state: one rank's (any rank: they agree) or a list of all ranks'."""
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        if not states:
            raise DataError("loader state list is empty")
        positions = {int(s.get("position", -1)) for s in states}
        if len(positions) != 1:
            raise DataError(f"saved loader states disagree on the position ({sorted(positions)[:4]}): "
                            "the checkpoint was not taken at a step boundary")
        s = states[0]
        if s.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {s.get('version')} is not {STATE_VERSION}")
        if s.get("dataset_id") != self.manifest.dataset_id:
            raise DataError(f"loader state is from another dataset ({str(s.get('dataset_id'))[:12]}... vs "
                            f"{self.manifest.dataset_id[:12]}... in {self.manifest.location}): resume with the "
                            "dataset the run started with")
        if s.get("split") != self.split or int(s.get("seed", -1)) != self.seed:
            raise DataError(f"loader state has split={s.get('split')!r} seed={s.get('seed')}, this loader "
                            f"split={self.split!r} seed={self.seed}: resume with the same data seed")
        if int(s.get("num_rows", -1)) != self.num_rows:
            storage.warn_once(f"the dataset has {self.num_rows} usable rows, the saved state {s.get('num_rows')} "
                              "(skipped shards changed): continuing at the same position in a different order")
        self._close_active()
        self._position = positions.pop()


def _checking_rank(index: int, world_size: int) -> int:
    """The rank that checks shard ``index`` of a split at start-up when the checks are shared."""
    return index % world_size


def _shared_group(rank: int, world_size: int) -> bool:
    """Whether the start-up checks are shared: torch.distributed is initialized and its default
    group is exactly this loader's ranks (then every rank builds this loader)."""
    import torch.distributed as dist

    return (world_size > 1 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() == world_size and dist.get_rank() == rank)


def _startup_checks(manifest: Manifest, shards: list[ShardInfo], verify: str, rank: int,
                    world_size: int) -> list[tuple[ShardInfo, str]]:
    """The tokenizer check and (shard, problem) for each shard failing its check, in manifest order.

    Without a shared group (``_shared_group``) this process checks everything, as before. With
    one, rank r checks only the shards ``_checking_rank`` gives it and the findings of all ranks
    are gathered, so every rank gets the same list (the skip decision is the job's, not each
    rank's). An error on any rank (a damaged tokenizer, an unreachable server) is raised on every
    rank as the same line, instead of leaving the others waiting in the gather.
    """
    if not _shared_group(rank, world_size):
        manifest.verify_tokenizer()  # a damaged tokenizer.model stops the run here, not at export
        return _check_shards(shards, verify)
    import torch.distributed as dist

    mine = [i for i in range(len(shards)) if _checking_rank(i, world_size) == rank]
    found: list[tuple[int, str]] = []
    failure: Optional[Exception] = None
    try:
        manifest.verify_tokenizer()
        position = {id(shards[i]): i for i in mine}
        found = [(position[id(s)], why) for s, why in _check_shards([shards[i] for i in mine], verify)]
    except Exception as e:  # noqa: BLE001 - every rank must reach the gather; re-raised below
        failure = e
    report = {"bad": found, "error": None if failure is None else str(failure),
              "kind": "corrupt" if isinstance(failure, CorruptData) else
                      "data" if isinstance(failure, DataError) else type(failure).__name__}
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, report)
    failed = [(r, rep_) for r, rep_ in enumerate(reports) if rep_["error"] is not None]
    if failed:  # every rank raises the lowest failing rank's error
        r, first = failed[0]
        if r == rank and failure is not None:
            raise failure  # with its traceback
        if first["kind"] in ("corrupt", "data"):
            raise (CorruptData if first["kind"] == "corrupt" else DataError)(first["error"])
        raise DataError(f"rank {r} failed the start-up data checks ({first['kind']}: {first['error']})")
    problems = {int(i): str(why) for rep_ in reports for i, why in rep_["bad"]}
    return [(shards[i], problems[i]) for i in sorted(problems)]


def _check_shards(shards: list[ShardInfo], verify: str) -> list[tuple[ShardInfo, str]]:
    """(shard, problem) for each shard failing the start-up check, in manifest order."""
    if verify == "none":
        return []

    def check(s: ShardInfo) -> Optional[str]:
        size = storage.size_of(s.location)
        if size is None:
            return "is missing"
        if size != s.bytes:
            return f"is truncated or damaged ({size} bytes, manifest says {s.bytes})"
        if verify == "full" and storage.sha256_of(s.location) != s.sha256:
            return "fails its sha256 check (corrupted)"
        return None

    remote = any(storage.is_url(s.location) for s in shards)
    if shards and (remote or verify == "full"):
        with ThreadPoolExecutor(min(16, len(shards))) as ex:
            results = list(ex.map(check, shards))
    else:
        results = [check(s) for s in shards]
    return [(s, why) for s, why in zip(shards, results) if why]


def build_loader(manifest: Union[Manifest, str, os.PathLike], *, rank: int, world_size: int, micro_batch_size: int,
                 seed: int, num_workers: int = 1, split: str = "train", prefetch: int = 4, verify: str = "size",
                 skip_corrupt: bool = False, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 pin_memory: bool = False, max_open_shards: int = storage.DEFAULT_MAX_OPEN_SHARDS) -> TokenLoader:
    """The loader for one rank; ``manifest`` is a Manifest, a path/folder or an http(s) URL.

    With an initialized ``torch.distributed`` group of ``world_size`` ranks this is a collective
    (the start-up checks are shared): every rank builds it."""
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    return TokenLoader(m, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seed=seed,
                       num_workers=num_workers, split=split, prefetch=prefetch, verify=verify,
                       skip_corrupt=skip_corrupt, cache_dir=cache_dir, pin_memory=pin_memory,
                       max_open_shards=max_open_shards)


def loader_kwargs(data_cfg: Any, device: Optional[Union[str, torch.device]] = None) -> dict[str, Any]:
    """The ``build_loader`` keyword arguments that come from the ``data`` config section, and
    ``pin_memory`` from the consumer's ``device`` (pinned batches when it is CUDA)."""
    return {"num_workers": data_cfg.num_workers, "prefetch": data_cfg.prefetch, "verify": data_cfg.verify_shards,
            "skip_corrupt": data_cfg.skip_corrupt_shards, "cache_dir": data_cfg.cache_dir,
            "pin_memory": device is not None and torch.device(device).type == "cuda"}
