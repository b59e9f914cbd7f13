"""Engines: one interface (``Engine``), two implementations chosen by ``engine.name``.

``build_engine(cfg, model, dist)`` wraps a freshly built model, or builds one from a factory without
ever holding the whole model on a rank's host (``ModelSource`` in base.py); ``consolidated_state_dict``
reads any engine's saved state back into full fp32 weights in one process (export, tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from slam_pretrain.engine.base import Engine, ModelSource, StepResult, grad_accum_steps
from slam_pretrain.errors import ConfigError, UserError

if TYPE_CHECKING:
    from slam_pretrain.config import Config
    from slam_pretrain.distributed import DistInfo

__all__ = ["Engine", "ModelSource", "StepResult", "build_engine", "consolidated_state_dict", "grad_accum_steps"]


def build_engine(cfg: "Config", model: ModelSource, dist: "DistInfo") -> Engine:
    """The engine named by ``cfg.engine.name`` around ``model``: a built module (moved to
    ``dist.device``), or a factory ``() -> nn.Module`` that the engine builds without the whole
    model on any rank's host (meta device / ``zero.Init``) and initialises from ``run.seed``
    (see ``ModelSource`` in base.py)."""
    name = cfg.engine.name
    if name == "deepspeed":
        from slam_pretrain.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, dist)
    if name == "fsdp":
        from slam_pretrain.engine.fsdp_engine import FSDPEngine

        return FSDPEngine(cfg, model, dist)
    raise ConfigError(f"engine.name={name!r} is invalid: must be one of 'deepspeed', 'fsdp'")


def consolidated_state_dict(engine_dir: Path, engine_meta: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine state in ``engine_dir`` (a checkpoint's ``engine/``).

    ``engine_meta`` is the checkpoint's engine.json (read from ``engine_dir/../engine.json`` when
    None). One process, no process group needed. Keys are those of ``SLAMv1LM.state_dict()``: a
    tied LM head that the saved state holds once (as ``tok_emb.weight``) is filled in.
    """
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UserError(f"{engine_dir} is not an engine state directory")
    if engine_meta is None:
        meta_file = engine_dir.parent / "engine.json"
        if not meta_file.is_file():
            raise UserError(f"{meta_file} not found: pass the checkpoint's engine/ directory")
        engine_meta = json.loads(meta_file.read_text())
    name = engine_meta.get("name")
    if name == "deepspeed":
        from slam_pretrain.engine.deepspeed_engine import consolidated_state_dict_ds

        sd = consolidated_state_dict_ds(engine_dir, engine_meta)
    elif name == "fsdp":
        from slam_pretrain.engine.fsdp_engine import consolidated_state_dict_dcp

        sd = consolidated_state_dict_dcp(engine_dir)
    else:
        raise UserError(f"{engine_dir}: unknown engine {name!r} in engine.json (expected 'deepspeed' or 'fsdp')")
    if "lm_head.weight" not in sd and "tok_emb.weight" in sd:  # tied: an untied head is always saved
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd
