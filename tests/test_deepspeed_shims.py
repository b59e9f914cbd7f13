"""Each DeepSpeed workaround (slam_pretrain/engine/deepspeed_shims.py) does what it says, and
nothing more, so it can be deleted safely once DeepSpeed no longer needs it."""

from __future__ import annotations

import io
import logging
import os
import pickle

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from slam_pretrain.engine.deepspeed_shims import (UNTESTED_OPTIMIZER_WARNING, disable_shm_comm, ds_safe_load,
                                                  quiet_untested_optimizer_warning)


class _Payload:
    """Unpickling this would call os.system: what a crafted checkpoint file does."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_ds_safe_load_refuses_code_and_restores_torch_load(tmp_path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "scaler": DynamicLossScaler(init_scale=8, scale_window=1000, min_scale=1, delayed_shift=1,
                                                                    consecutive_hysteresis=False)}, good)
    bad.write_bytes(pickle.dumps({"x": _Payload()}))
    original = torch.load
    with ds_safe_load():
        assert torch.load is not original
        loaded = torch.load(good, weights_only=False)  # what DeepSpeed passes: overridden
        assert torch.equal(loaded["w"], torch.ones(2)) and loaded["scaler"].cur_scale == 8
        with pytest.raises(pickle.UnpicklingError):
            torch.load(bad, weights_only=False)
    assert torch.load is original


def test_disable_shm_comm_marks_the_op_unavailable() -> None:
    import deepspeed.ops

    disable_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_untested_optimizer_warning_is_dropped_and_nothing_else() -> None:
    logger = logging.getLogger("DeepSpeed")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        quiet_untested_optimizer_warning()
        quiet_untested_optimizer_warning()  # idempotent
        assert sum(type(f).__name__ == "_DropUntestedOptimizerWarning" for f in logger.filters) == 1
        logger.warning("**** %s, proceed with caution *****", UNTESTED_OPTIMIZER_WARNING)
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "another warning\n"
