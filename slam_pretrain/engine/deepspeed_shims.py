"""Workarounds for DeepSpeed (checked against deepspeed 0.19.8), each small, named and tested
(tests/test_deepspeed_shims.py), so that each can be deleted once DeepSpeed no longer needs it.

- ``ds_safe_load``: DeepSpeed's checkpoint loaders call ``torch.load(..., weights_only=False)``
  (deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py, deepspeed/checkpoint/*; see
  https://github.com/deepspeedai/DeepSpeed/pull/6751, which made the flag explicit but kept it
  False), so a crafted checkpoint file could run code when loaded. While the context is active,
  every ``torch.load`` unpickles only tensors, plain data and the few DeepSpeed classes its own
  files hold. Delete when DeepSpeed loads with ``weights_only=True``.
- ``disable_shm_comm``: on the CPU accelerator DeepSpeed JIT-builds its ``deepspeed_shm_comm`` op
  (~60 s on 2 cores) when it sets up communication, although that op only serves
  ``inference_all_reduce`` (DeepSpeed inference); training collectives go through
  torch.distributed. No setting switches it off, so the op is marked unavailable in DeepSpeed's
  probed-ops table. Delete when DeepSpeed builds it lazily or offers a switch.
- ``quiet_untested_optimizer_warning``: with ``zero_allow_untested_optimizer: true`` (our client
  torch AdamW is deliberate: no FusedAdam/CPUAdam JIT build) DeepSpeed still warns "You are using
  ZeRO with an untested optimizer, proceed with caution" on every run
  (``DeepSpeedEngine._do_optimizer_sanity_check``). A logging filter drops exactly that record.
  Delete when DeepSpeed stays quiet once the user has allowed the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

UNTESTED_OPTIMIZER_WARNING = "You are using ZeRO with an untested optimizer"


def _ds_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def ds_safe_load() -> Iterator[None]:
    """While active, every ``torch.load`` (DeepSpeed's included, which pass weights_only=False)
    unpickles only tensors, plain data and DeepSpeed's loss-scaler / ZeRO-stage / fragment types."""
    original = torch.load
    allowed = _ds_safe_globals()

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def disable_shm_comm() -> None:
    """Mark DeepSpeed's CPU shared-memory op as unavailable so it is never JIT-built."""
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__  # probed once and cached; DeepSpeed reads this same dict
    ops["deepspeed_shm_comm"] = False


class _DropUntestedOptimizerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return UNTESTED_OPTIMIZER_WARNING not in record.getMessage()


def quiet_untested_optimizer_warning() -> None:
    """Drop DeepSpeed's untested-optimizer warning (idempotent: one filter on its logger)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropUntestedOptimizerWarning) for f in logger.filters):
        logger.addFilter(_DropUntestedOptimizerWarning())
