"""A process's RNG state, and the seed of each rank's own random stream.

``capture_rng`` holds the python, numpy, torch (and CUDA) generator states as plain data and
tensors, so a checkpoint's ``rank_XXXXX.pt`` loads with ``torch.load(weights_only=True)``;
``restore_rng`` continues the generators exactly where they were captured. ``rank_stream_seed``
gives every rank a stream of its own (``rank_stream_state`` is that stream's captured state, for a
rank that resumes after a world-size change).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Optional

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo ``capture_rng``: the generators continue exactly where they were captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_generators(seed: int) -> None:
    """Seed python, numpy (its legacy global generator takes 32 bits) and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_stream_seed(seed: int, rank: int, step: Optional[int] = None) -> int:
    """The 64-bit seed of rank ``rank``'s own random stream: from (seed, rank), or from (seed,
    rank, step) for a rank that resumes after a world-size change (no stream of its own was saved).

    A hash rather than ``seed + rank``: with a sum, run seed 1's rank 0 would draw exactly what run
    seed 0's rank 1 drew.
    """
    key = f"slam-rng/{seed}/{rank}" + ("" if step is None else f"/{step}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def rank_stream_state(seed: int, rank: int, step: Optional[int] = None) -> dict[str, Any]:
    """``capture_rng()`` of the stream ``rank_stream_seed(seed, rank, step)`` starts, leaving this
    process's generators as they were."""
    saved = capture_rng()
    try:
        seed_generators(rank_stream_seed(seed, rank, step))
        return capture_rng()
    finally:
        restore_rng(saved)
