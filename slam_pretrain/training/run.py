"""What every training run (pretraining and fine-tuning) shares: exit codes, seeding, and resuming
the engine, the loader and the RNG states from a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from slam_pretrain.training.checkpoint import restore_rng
from slam_pretrain.training.trainer import TrainerState

EXIT_OK = 0
EXIT_BAD_STEPS = 3
EXIT_SIGNAL = 143  # what a shell reports for SIGTERM; the sbatch scripts requeue on it


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_state(ckpt: Any, resume: str, engine: Any, loader: Any, cfg: Any, checksums: dict[str, Any],
                 main: bool) -> tuple[Any, Optional[Path]]:
    """(TrainerState, the checkpoint resumed from or None) for ``--resume auto|never|PATH``: the
    engine, the loader and the RNG states are restored from it (the checkpoint is verified first;
    what belongs to another run or an abandoned branch is moved aside by ``resume_point``)."""
    resume_path = ckpt.resume_point(resume)
    if resume_path is None:
        return TrainerState(), None
    trainer_state, rank_state, _world_changed = ckpt.load(resume_path, engine, config=cfg, checksums=checksums)
    state = TrainerState.from_dict(trainer_state)
    loader.load_state_dict(rank_state["loader"])
    restore_rng(rank_state["rng"])
    if main:
        print(f"resumed from step {state.step} ({resume_path})", flush=True)
    return state, resume_path
