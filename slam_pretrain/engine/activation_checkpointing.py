"""Activation checkpointing applied from outside the model, with the EF cycle as its unit.

The model runs ``w(fn, x)`` instead of ``fn(x)`` when ``model.cycle_wrapper`` (each EF cycle: both
blocks and the fusion) or ``model.block_wrapper`` (initial and final block) is set. We set them to
a non-reentrant ``torch.utils.checkpoint`` call: it composes with FSDP2 and ZeRO-3 parameter
gathering, needs no ``requires_grad`` input, and keeps the tied embedding / LM head outside every
checkpointed region (DeepSpeed#988, "gradient computed twice").

Modes: ``none``; ``ef_cycles`` (one region per EF cycle); ``all`` (EF cycles plus the initial and
final blocks). Engines apply this BEFORE sharding or compiling.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slam_pretrain.errors import ConfigError

MODES = ("none", "ef_cycles", "all")


def checkpoint_wrapper(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run ``fn(x)`` keeping only ``x``; recompute the inside during backward."""
    # preserve_rng_state (the default) replays dropout masks exactly in the recomputation.
    return checkpoint(fn, x, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Set ``model.cycle_wrapper`` / ``model.block_wrapper`` for ``mode`` (none|ef_cycles|all)."""
    if mode not in MODES:
        raise ConfigError(f"engine.activation_checkpointing={mode!r} is invalid: must be one of "
                          + ", ".join(repr(m) for m in MODES))
    for attr in ("cycle_wrapper", "block_wrapper"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} has no attribute {attr!r}: activation checkpointing "
                            "needs the SLAMv1LM wrapper hooks")
    model.cycle_wrapper = checkpoint_wrapper if mode in ("ef_cycles", "all") else None
    model.block_wrapper = checkpoint_wrapper if mode == "all" else None



def saved_activation_bytes(fn: Callable[[], torch.Tensor], model: Optional[nn.Module] = None) -> tuple[torch.Tensor, int]:
    """(``fn()``, the bytes of the tensors autograd saves for backward while it runs): activation
    memory measured exactly, independent of the allocator and of other processes. Each storage is
    counted once (views of one buffer share it); ``model``'s parameters are left out (they are in
    memory anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
