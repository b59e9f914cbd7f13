"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from slam_pretrain.config import TrainConfig
from slam_pretrain.model import ModelConfig, SLAMv1LM
from slam_pretrain.engine.optim import build_optimizer, lr_at, param_groups


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=100, lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, decay_fraction=0.2)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_is_linear_from_lr_over_warmup() -> None:
    c = cfg(lr_schedule="cosine")
    assert [lr_at(s, c) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(9, c) == pytest.approx(1e-3)  # the last warmup update reaches the peak


def test_cosine() -> None:
    c = cfg(lr_schedule="cosine")
    assert lr_at(10, c) == pytest.approx(1e-3)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), c) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert lr_at(99, c) == pytest.approx(1e-4)  # the last update uses the floor
    assert lr_at(500, c) == pytest.approx(1e-4)
    lrs = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear() -> None:
    c = cfg(lr_schedule="linear")
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-4)
    assert lr_at(10 + 89 // 2, c) == pytest.approx(1e-3 - 9e-4 * (44 / 89))


def test_wsd_stable_then_decays_in_the_last_fraction() -> None:
    c = cfg(lr_schedule="wsd")  # decay over the last 20 of 100 updates: indices 80..99
    assert all(lr_at(s, c) == pytest.approx(1e-3) for s in range(10, 80))
    assert lr_at(80, c) < 1e-3
    assert lr_at(80, c) == pytest.approx(1e-3 - 9e-4 / 20)
    assert lr_at(99, c) == pytest.approx(1e-4)
    assert lr_at(150, c) == pytest.approx(1e-4)


def test_constant_and_no_warmup() -> None:
    c = cfg(lr_schedule="constant", warmup_steps=0)
    assert lr_at(0, c) == lr_at(99, c) == lr_at(1000, c) == pytest.approx(1e-3)
    c = cfg(lr_schedule="cosine", warmup_steps=0)
    assert lr_at(0, c) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        lr_at(-1, c)


def test_param_groups_decay_only_matrices() -> None:
    model = SLAMv1LM(ModelConfig(vocab_size=256, max_seq_len=64, d_model=32, num_heads=4, d_ff=64, ef_cycles=1,
                                 segment_len=32, overlap=4, pos_encoding="learned", norm="layernorm"))
    groups = param_groups(model, weight_decay=0.1)
    name_of = {id(p): n for n, p in model.named_parameters()}  # the real groups, named
    names = {"decay" if g["weight_decay"] else "no_decay": [name_of[id(p)] for p in g["params"]] for g in groups}
    assert "tok_emb.weight" in names["no_decay"]  # also the tied LM head (one parameter)
    assert "pos_emb.weight" in names["no_decay"]
    assert "lm_head.weight" not in names["decay"] + names["no_decay"]  # tied: listed once, as tok_emb
    assert all(n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm_f.weight",
                           "norm_f.bias")) or ".bias" in n or "emb" in n for n in names["no_decay"])
    assert names["decay"] and all(dict(model.named_parameters())[n].dim() == 2 for n in names["decay"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, TrainConfig(lr=3e-4, beta1=0.8, beta2=0.9, weight_decay=0.05))
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and isinstance(opt, torch.optim.AdamW)
