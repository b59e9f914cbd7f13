"""Consolidate any engine's checkpoint into one safetensors file; load a model from either.

``export_checkpoint(checkpoint, out)`` writes three files next to each other:

    out                       FILE.safetensors: full fp32 weights; a tied lm_head is stored once
                              (as tok_emb.weight) and re-tied on load. Metadata (all strings):
                              format, model_config (JSON), step, tokenizer_sha256, tied_weights
                              (JSON {"lm_head.weight": "tok_emb.weight"} or {}), engine, source.
    <stem>.config.yaml        the run's resolved config, as the checkpoint stored it
    <stem>.tokenizer.model    the tokenizer the model was trained with

(``<stem>`` is ``out`` without ``.safetensors``.) Each file is written to a temporary name in the
same directory, fsynced and renamed; the weights file is renamed last, so its presence means the
export is complete.

``load_model(path)`` accepts a checkpoint directory (``checkpoints/step_XXXXXXXX``), a run
``out_dir`` (its latest checkpoint) or an export, and returns ``(model, tokenizer, meta)``: the
model in eval mode, fp32.

``read_checkpoint(path)`` is what both read a checkpoint through (and what builds another model
from one, such as the classifier): its config, step, tokenizer and, on demand, fp32 weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
import yaml

from data_pipeline.storage import atomic_write, sha256_of
from slam_pretrain.training.checkpoint_files import STEP_RE, find_latest, is_complete, is_damage_error, verify_checkpoint
from slam_pretrain.errors import UserError

if TYPE_CHECKING:
    from slam_pretrain.model import ModelConfig

EXPORT_FORMAT = "slam-pretrain-export-v1"
SUFFIX = ".safetensors"
TIED = {"lm_head.weight": "tok_emb.weight"}  # tied name -> the name stored

PathLike = Union[str, os.PathLike]


def export_paths(out: PathLike) -> tuple[Path, Path, Path]:
    """``(weights, config_yaml, tokenizer)`` paths of the export ``out`` (FILE.safetensors)."""
    out = Path(out)
    stem = out.name[: -len(SUFFIX)] if out.name.endswith(SUFFIX) else out.name
    return out, out.with_name(f"{stem}.config.yaml"), out.with_name(f"{stem}.tokenizer.model")


def sha256_file(path: PathLike) -> str:
    return sha256_of(str(path))


# ---------------------------------------------------------------------------------------------
# Finding what a path points at.

def is_export(path: PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(SUFFIX)


def resolve_checkpoint(path: PathLike) -> Path:
    """A step directory from a step dir, a ``checkpoints/`` dir or a run out_dir (its latest).

    Raises UserError naming the path and what would be valid.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist: pass a checkpoints/step_XXXXXXXX directory, "
                        "a run out_dir, or a .safetensors export")
    if p.is_file():
        raise UserError(f"checkpoint {str(p)!r} is a file but not a {SUFFIX} export: pass a "
                        "checkpoints/step_XXXXXXXX directory, a run out_dir, or a .safetensors export")
    if STEP_RE.match(p.name):
        if not is_complete(p):
            raise UserError(f"checkpoint {str(p)!r} is incomplete (a save that did not finish?): pass "
                            "another checkpoints/step_XXXXXXXX directory or the run out_dir")
        problem = verify_checkpoint(p)  # sizes against files.json: a truncated file is named here
        if problem is not None:
            raise UserError(f"checkpoint {str(p)!r} is damaged: {problem}; pass another checkpoint")
        return p
    for out_dir in ((p.parent, p) if p.name == "checkpoints" else (p,)):
        skipped: list[tuple[Path, str]] = []
        latest = find_latest(out_dir, on_skip=lambda c, why: skipped.append((c, why)))
        if skipped:  # never an older model in place of the run's newest without saying so
            older = f"; the newest intact one is {latest}: pass it explicitly" if latest else ""
            raise UserError(f"checkpoint {skipped[0][0]} (the newest in {out_dir}) is damaged: "
                            f"{skipped[0][1]}{older}")
        if latest is not None:
            return latest
    raise UserError(f"no checkpoint in {str(p)!r}: expected a checkpoints/step_XXXXXXXX directory or a "
                    "run out_dir with complete checkpoints under checkpoints/")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _tokenizer_sha256(step_dir: Path, tokenizer: Path) -> str:
    """The tokenizer copy's sha256, checked against the run's record in checksums.json."""
    sha = sha256_file(tokenizer)
    sums = step_dir / "checksums.json"
    recorded = _read_json(sums).get("tokenizer_sha256") if sums.is_file() else None
    if recorded and recorded != sha:
        raise UserError(f"{tokenizer} is not the tokenizer the run trained with (sha256 {sha[:12]}... but "
                        f"checksums.json records {recorded[:12]}...): the checkpoint is damaged")
    return sha


@dataclasses.dataclass(frozen=True)
class CheckpointContents:
    """What a checkpoint step directory holds, read without building a model. The weights are read
    on demand (``state_dict()``), so that the cheap checks of a caller come before that slow part."""

    step_dir: Path
    config: dict[str, Any]  # the run's resolved config, as config.yaml stored it
    engine_meta: dict[str, Any]  # engine.json: the engine and layout that wrote engine/
    step: int
    tokenizer: Path

    @property
    def config_path(self) -> Path:
        return self.step_dir / "config.yaml"

    def model_config(self) -> "ModelConfig":
        """The validated ``model`` section as the model was at this step (the RoPE of the context
        phase in effect when ``train.seq_len_schedule`` is set); a UserError naming config.yaml if
        it is not valid."""
        from slam_pretrain.training.context_schedule import model_section_at

        return model_config_from_dict(model_section_at(self.config, self.step), str(self.config_path))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights in fp32, consolidated from whatever shards the engine wrote (slow)."""
        return _consolidate(self.step_dir, self.engine_meta)


def read_checkpoint(path: PathLike) -> CheckpointContents:
    """The contents of a checkpoint: a step directory, a ``checkpoints/`` dir or a run out_dir (its
    latest complete checkpoint). UserError naming the path when it is missing, incomplete or damaged."""
    step_dir = resolve_checkpoint(path)
    cfg_path, tok = step_dir / "config.yaml", step_dir / "tokenizer.model"
    for need in (cfg_path, tok):
        if not need.is_file():
            raise UserError(f"checkpoint {step_dir} is incomplete: {need.name} is missing")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(f"{cfg_path} has no 'model' section")
    engine_meta = _read_json(step_dir / "engine.json")
    state_path = step_dir / "trainer_state.json"
    step = _read_json(state_path).get("step") if state_path.is_file() else None
    if step is None:  # step_00000100 -> 100
        digits = step_dir.name.rsplit("_", 1)[-1]
        step = int(digits) if digits.isdigit() else -1
    return CheckpointContents(step_dir, cfg, engine_meta, int(step), tok)


def model_config_from_dict(d: dict[str, Any], source: str) -> "ModelConfig":
    """A validated ModelConfig from a plain dict; unknown keys are a UserError naming ``source``."""
    from slam_pretrain.config import _build  # the same type checks as YAML configs
    from slam_pretrain.errors import ConfigError
    from slam_pretrain.model import ModelConfig

    d = dict(d)
    # Written before layout revision 2 existed: revision 1 (validate refuses it for token layouts).
    d.setdefault("layout_revision", 1)
    try:
        cfg = _build(ModelConfig, d, "model")
        cfg.validate("model")
    except ConfigError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Weights.

def _consolidate(step_dir: Path, engine_meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from slam_pretrain.engine import consolidated_state_dict

    # DeepSpeed's converter prints progress bars and banners: shown only if it fails unexpectedly.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            sd = consolidated_state_dict(step_dir / "engine", engine_meta)
    except UserError:
        raise
    except Exception as e:
        if is_damage_error(e):  # a file that verify_checkpoint could not catch (no files.json, same size)
            raise UserError(f"checkpoint {step_dir} is damaged: reading its engine state failed "
                            f"({str(e).strip().splitlines()[0][:160]})") from None
        sys.stderr.write(chatter.getvalue())
        raise
    return {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


def _check_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], tied: dict[str, str], source: str) -> None:
    """Every parameter the model has (tied ones aside), nothing else, with the right shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model config (missing: {missing[:5]}, "
                        f"unexpected: {unexpected[:5]})")
    bad = [k for k, shape in expected.items() if tuple(sd[k].shape) != tuple(shape)]
    if bad:
        k = bad[0]
        raise UserError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the model config needs {tuple(expected[k])}")


def _meta_model(mcfg: "ModelConfig") -> torch.nn.Module:
    """SLAMv1LM without storage (no random init: the weights are assigned next)."""
    from slam_pretrain.model import SLAMv1LM

    with torch.device("meta"):
        return SLAMv1LM(mcfg)


def _load_weights(mcfg: "ModelConfig", sd: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The model holding ``sd``'s tensors themselves (assigned, not copied: one copy in memory)."""
    tied = TIED if mcfg.tie_embeddings else {}
    model = _meta_model(mcfg)
    sd = {k: v.float().contiguous() for k, v in sd.items() if k not in tied}  # a tied copy, if any
    _check_weights(model, sd, tied, source)
    model.load_state_dict(dict(sd, **{name: sd[stored] for name, stored in tied.items()}), strict=True,
                          assign=True)
    for name, stored in tied.items():  # one Parameter again, as SLAMv1LM builds it
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, model.get_parameter(stored))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict would need building here
        raise RuntimeError(f"{source}: no values for {left[:5]} after loading")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Public API.

def export_checkpoint(checkpoint: PathLike, out: PathLike) -> Path:
    """Write ``out`` (.safetensors) plus ``<stem>.config.yaml`` and ``<stem>.tokenizer.model``.

    ``checkpoint`` is a step directory or a run out_dir (its latest checkpoint). Returns ``out``.
    """
    from safetensors.torch import save_file

    weights_path, config_path, tok_path = export_paths(out)
    if not weights_path.name.endswith(SUFFIX) or weights_path.name == SUFFIX:
        raise UserError(f"--out {str(out)!r} is invalid: the export must be a FILE{SUFFIX} path")
    if weights_path.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory: pass a FILE{SUFFIX} path")
    if is_export(checkpoint):
        raise UserError(f"--checkpoint {str(checkpoint)!r} is already an export; pass a checkpoint "
                        "directory or a run out_dir")
    ckpt = read_checkpoint(checkpoint)
    step_dir, cfg_dict, engine_meta, tokenizer = ckpt.step_dir, ckpt.config, ckpt.engine_meta, ckpt.tokenizer
    mcfg = ckpt.model_config()
    sd = ckpt.state_dict()
    tied = TIED if mcfg.tie_embeddings else {}
    for name, stored in tied.items():
        if name in sd and not torch.equal(sd[name], sd[stored]):
            raise UserError(f"{step_dir}: {name} differs from {stored} but model.tie_embeddings is true")
    sd = {k: v for k, v in sd.items() if k not in tied}
    _check_weights(_meta_model(mcfg), sd, tied, str(step_dir))
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": json.dumps(dataclasses.asdict(mcfg), sort_keys=True),
        "step": str(ckpt.step),
        "tokenizer_sha256": _tokenizer_sha256(step_dir, tokenizer),
        "tied_weights": json.dumps(tied),
        "engine": json.dumps(engine_meta, sort_keys=True),
        "source": str(step_dir.resolve()),
    }
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(config_path, lambda tmp: tmp.write_text(yaml.safe_dump(cfg_dict, sort_keys=False)))
    atomic_write(tok_path, lambda tmp: shutil.copyfile(tokenizer, tmp))
    atomic_write(weights_path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return weights_path


def _load_export(path: Path) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read export {path}: {e}") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not a slam-pretrain export (metadata format={meta.get('format')!r}, "
                        f"expected {EXPORT_FORMAT!r})")
    if "model_config" not in meta:
        raise UserError(f"{path} has no model_config in its metadata: re-export it with `slam-pretrain export`")
    mcfg = model_config_from_dict(json.loads(meta["model_config"]), str(path))
    tied = json.loads(meta.get("tied_weights", "{}"))
    if tied != (TIED if mcfg.tie_embeddings else {}):
        raise UserError(f"{path}: tied_weights={tied} does not match model.tie_embeddings={mcfg.tie_embeddings}")
    model = _load_weights(mcfg, sd, str(path))
    _, _, tok_path = export_paths(path)
    info = {"kind": "export", "source": str(path), "step": int(meta.get("step", -1)),
            "model_config": dataclasses.asdict(mcfg), "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "config_path": str(export_paths(path)[1])}
    return model, tok_path, info


def _load_checkpoint(path: PathLike) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    mcfg = ckpt.model_config()
    tok_sha = _tokenizer_sha256(ckpt.step_dir, ckpt.tokenizer)  # before the (slow) consolidation
    model = _load_weights(mcfg, ckpt.state_dict(), str(ckpt.step_dir))
    info = {"kind": "checkpoint", "source": str(ckpt.step_dir), "step": ckpt.step,
            "model_config": dataclasses.asdict(mcfg), "tokenizer_sha256": tok_sha,
            "config_path": str(ckpt.config_path), "engine": ckpt.engine_meta}
    return model, ckpt.tokenizer, info


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(SLAMv1LM in eval mode, fp32, on device; Tokenizer; meta)`` from a checkpoint dir, a run
    out_dir or a .safetensors export. ``meta``: kind, source, step, model_config, tokenizer_sha256.
    """
    from data_pipeline.tokenizer import Tokenizer

    p = Path(path)
    if is_export(p):
        model, tok_path, info = _load_export(p)
    elif p.is_file():
        raise UserError(f"checkpoint {str(p)!r} is a file but not a {SUFFIX} export: pass a "
                        "checkpoints/step_XXXXXXXX directory, a run out_dir, or a .safetensors export")
    else:
        model, tok_path, info = _load_checkpoint(p)
    if not tok_path.is_file():
        raise UserError(f"tokenizer {tok_path} is missing (an export keeps it next to the weights as "
                        f"<stem>.tokenizer.model)")
    if info["kind"] == "export" and info.get("tokenizer_sha256") and sha256_file(tok_path) != info["tokenizer_sha256"]:
        raise UserError(f"tokenizer {tok_path} does not match the one the model was trained with "
                        f"(sha256 {info['tokenizer_sha256'][:12]}...)")
    tokenizer = Tokenizer(str(tok_path))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model only "
                        f"model.vocab_size={model.config.vocab_size}")
    return model.to(_device(device)), tokenizer, info


def _device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is invalid: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r} is invalid: CUDA is not available here; use cpu")
    return dev
