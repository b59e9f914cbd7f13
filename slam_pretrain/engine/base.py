"""The engine interface the trainer talks to (DeepSpeed and FSDP2 implement it).

One optimizer step is ``grad_accum`` calls of ``forward_backward`` (one micro-batch each, on every
rank) followed by one ``optimizer_step(lr)``. A non-finite loss or gradient on any rank makes every
rank skip the update: parameters and optimizer state stay exactly as they were, the gradients are
dropped, and ``StepResult.skipped`` is True everywhere.

Tensors handed to ``forward_backward`` and ``eval_loss`` are already on the engine's ``device``:
the trainer moves each batch there once (non-blocking on CUDA), and engines do not move them again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import torch
from torch import nn

from slam_pretrain.engine.context_parallel import data_parallel
from slam_pretrain.errors import ConfigError
from slam_pretrain.model.slam_v1 import deferred_init

if TYPE_CHECKING:
    from slam_pretrain.config import Config, TrainConfig
    from slam_pretrain.distributed import DistInfo


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm before clipping (nan/inf when the step was skipped for it)
    skipped: bool


# What an engine is built from: a model already built (eagerly, on the host, initialised from the
# global seed), or a factory (no arguments) that the engine calls on the meta device or inside
# DeepSpeed's zero.Init, so that no rank ever holds more than its share of the weights; the engine
# then initialises them with ``model.init_weights(seed=run.seed)`` (or the same values written
# straight into ZeRO-3 partitions). Both give the same weights for the same seed, at any world size.
ModelSource = Union[nn.Module, Callable[[], nn.Module]]


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` on the meta device with initialisation deferred: parameters have shapes only."""
    with torch.device("meta"), deferred_init():
        model = factory()
    check_initialisable(model)
    return model


def check_initialisable(model: nn.Module) -> None:
    """A model built by the engine must say how it starts (``init_weights(seed)``, ``initial_values``)."""
    for attr in ("init_weights", "initial_values"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"{type(model).__name__} has no {attr}(): an engine can only build models that "
                            "initialise themselves after sharding; pass a built model instead of a factory")


def grad_accum_steps(train: "TrainConfig", world_size: int) -> int:
    """global_batch / (micro_batch * world); ConfigError when it does not divide. ``world_size``
    counts data-parallel ranks (world / engine.context_parallel: a context group reads one batch)."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is invalid for {world_size} data-parallel rank(s): "
            f"must be a multiple of train.micro_batch_size x data ranks = {train.micro_batch_size} x {world_size} "
            f"= {per_step}")
    return train.global_batch_size // per_step


class Engine(ABC):
    """Model + optimizer + parallelism. All ranks call every method (they hold collectives)."""

    name: str = "base"

    def __init__(self, cfg: "Config", dist_info: "DistInfo"):
        self.cfg = cfg
        self.dist = dist_info
        # The ranks of one context-parallel group share their rows: the batch is split over data ranks.
        self.grad_accum = grad_accum_steps(
            cfg.train, data_parallel(dist_info.rank, dist_info.world_size, cfg.engine.context_parallel)[1])
        self._micro = 0  # micro-batches since the last optimizer_step
        # Set when a micro-batch loss was non-finite on this rank; a device tensor, so no sync per micro-batch.
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=dist_info.device)

    # -- the step ---------------------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, backward (gradients accumulate); the detached mean loss."""

    @abstractmethod
    def optimizer_step(self, lr: float, hold: bool = False) -> StepResult:
        """After ``grad_accum`` micro-batches: clip, step (or skip everywhere), zero gradients.
        ``hold=True`` skips the update as a non-finite step would (``skipped`` True); the caller
        passes the same value on every rank (the spike monitor decides on the all-reduced loss)."""

    @abstractmethod
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch, no gradients."""

    @abstractmethod
    def train(self) -> None: ...

    @abstractmethod
    def eval(self) -> None: ...

    # -- state ------------------------------------------------------------------------------
    @abstractmethod
    def save(self, dir: Path) -> None:
        """Write the engine state (weights, optimizer) under ``dir``; every rank calls it."""

    @abstractmethod
    def load(self, dir: Path) -> None:
        """Read what ``save`` wrote, also from a run with another world size; every rank calls it."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 model weights on CPU (keys as ``SLAMv1LM().state_dict()``); a collective,
        every rank gets the whole dict."""

    def meta(self) -> dict[str, Any]:
        """What ``engine.json`` records: {"name", "zero_stage", "world_size", "precision"}."""
        e = self.cfg.engine
        return {"name": self.name, "zero_stage": e.zero_stage if self.name == "deepspeed" else None,
                "world_size": self.dist.world_size, "precision": e.precision,
                "context_parallel": e.context_parallel}

    @property
    @abstractmethod
    def num_params(self) -> int:
        """Parameters of the whole model (tied weights once), not of this rank's shard."""

    @property
    def device(self) -> torch.device:
        return self.dist.device

    # -- helpers for subclasses -------------------------------------------------------------
    def _begin_micro(self) -> None:
        if self._micro >= self.grad_accum:
            raise RuntimeError(f"forward_backward called {self._micro + 1} times before optimizer_step; "
                               f"this engine accumulates {self.grad_accum} micro-batches per step")

    def _end_micro(self, loss: torch.Tensor) -> torch.Tensor:
        loss = loss.detach()
        self._loss_bad |= ~torch.isfinite(loss)
        self._micro += 1
        return loss

    def _check_boundary(self) -> None:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"optimizer_step after {self._micro} micro-batches; this engine needs exactly "
                               f"grad_accum={self.grad_accum} (train.global_batch_size / (micro_batch x world))")

    def _reset_step(self) -> None:
        self._micro = 0
        self._loss_bad.zero_()
