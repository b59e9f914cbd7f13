"""AdamW parameter groups and learning-rate schedules.

Weight decay applies only to matrices that transform activations (attention and FFN weights).
It does not apply to biases, norm weights (1-D: decaying them pulls the per-channel scale towards
zero, which fights the normalisation) or embeddings (``nn.Embedding`` weights, and the LM head when
it is tied to the token embedding: rows of rare tokens would shrink just for being rare). This is
the GPT-3 / OLMo choice.

``lr_at(step, train)`` is the learning rate of the update with 0-based index ``step`` (the
trainer passes the number of optimizer steps already taken): a linear warmup over
``warmup_steps`` updates (the first update uses ``lr / warmup_steps``), then

- ``cosine``: half a cosine from ``lr`` to ``lr * min_lr_ratio``, reached at the last update
  (index ``max_steps - 1``);
- ``linear``: a straight line between the same two points;
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of ``max_steps``,
  then linear down to ``lr * min_lr_ratio`` at the last update;
- ``constant``: ``lr``.

Past ``max_steps`` the decaying schedules stay at ``lr * min_lr_ratio``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slam_pretrain.errors import ConfigError

if TYPE_CHECKING:  # the engine floor must not import config (a floor above) at run time
    from slam_pretrain.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: {"params": decayed, "weight_decay": wd} and {"params": rest, 0.0}.

    Works on plain modules and on FSDP2-sharded ones (DTensor parameters keep their names).
    Each parameter appears once (tied weights are one parameter).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if not p.requires_grad:
            continue
        # ds_shape: a parameter partitioned by zero.Init holds an empty tensor in place of its shape.
        if len(getattr(p, "ds_shape", p.shape)) < 2 or id(p) in embedding_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train: "TrainConfig") -> torch.optim.AdamW:
    """torch AdamW over ``param_groups`` (no fused/JIT kernels: the same code on CPU and GPU).

    ``foreach=True``: one multi-tensor kernel per update stage instead of a Python loop over the
    parameters (torch picks foreach by itself only for CUDA tensors; on CPU it would loop).
    """
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=train.eps, foreach=True)


def lr_at(step: int, train: "TrainConfig") -> float:
    """Learning rate for the update with 0-based index ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warmup, total = train.warmup_steps, train.max_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    schedule = train.lr_schedule
    if schedule == "constant":
        return peak
    last = total - 1  # index of the last update, where the decay ends
    if schedule == "wsd":
        decay_steps = int(round(train.decay_fraction * total))
        start = max(warmup, total - decay_steps)  # first update of the decay phase
        if step < start:
            return peak
        span = last - start + 1
        progress = min(1.0, (step - start + 1) / span) if span > 0 else 1.0
        return peak + (floor - peak) * progress
    span = last - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    if schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak + (floor - peak) * progress
    raise ConfigError(f"train.lr_schedule={schedule!r} is invalid: must be one of 'cosine', 'linear', 'wsd', 'constant'")
