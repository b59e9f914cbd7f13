"""The world-size-independent sample order: a seeded pseudo-random permutation per epoch.

Position ``p`` of the training stream (``p`` = samples consumed by all ranks together) is row
``perm_e(p mod N)`` of epoch ``e = p // N``, where ``perm_e`` is a bijection of [0, N) keyed by
(seed, epoch, split). It is a 6-round (unbalanced) Feistel network over the smallest power-of-two domain >= N
with cycle walking, evaluated per index: O(1) memory for any N (no N-sized array on any rank),
vectorized in numpy, and identical on every rank, worker and world size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_ROUNDS = 6
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_SPLIT_CODES = {"train": 1, "val": 2}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=64)
def round_keys(seed: int, epoch: int, split: str) -> np.ndarray:
    seq = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, _SPLIT_CODES.get(split, 3)])
    keys = seq.generate_state(_ROUNDS, dtype=np.uint64)
    keys.setflags(write=False)  # cached: shared by every caller
    return keys


def permute(idx: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """perm(idx) for idx in [0, n): a bijection of [0, n) fixed by ``keys``."""
    x = np.asarray(idx, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())  # domain 2**bits < 2n: ~2 cycle-walking passes on average
    half_a, half_b = bits // 2, bits - bits // 2
    todo = np.ones(x.shape, dtype=bool)
    while True:  # cycle walking: re-apply until inside [0, n)
        v = x[todo]
        # Unbalanced Feistel: (left: a bits, right: b bits) -> (right, left ^ F(right)); widths swap.
        wl, wr = half_a, half_b
        left, right = v >> np.uint64(wr), v & np.uint64((1 << wr) - 1)
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & np.uint64((1 << wl) - 1))
            wl, wr = wr, wl
        x[todo] = (left << np.uint64(wr)) | right
        todo = x >= np.uint64(n)
        if not todo.any():
            return x.astype(np.int64)


def rows_at(positions: np.ndarray, n: int, seed: int, split: str, fixed_epoch: int | None = None) -> np.ndarray:
    """Row ids [k] for stream positions [k]: epoch = position // n (or ``fixed_epoch``)."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs = positions // n if fixed_epoch is None else np.full_like(positions, fixed_epoch)
    within = positions % n
    if positions.size == 0 or epochs.min() == epochs.max():  # the common case: one epoch
        e = int(epochs.flat[0]) if positions.size else 0
        return permute(within, n, round_keys(seed, e, split))
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = permute(within[sel], n, round_keys(seed, int(e), split))
    return out
