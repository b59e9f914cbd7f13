"""Typed run configuration: section dataclasses, YAML + ``--set dotted.key=value`` overrides.

Precedence: command line > YAML > dataclass defaults. Every value is checked against its field's
type (Literal choices, Optional, Union[int, float], lists, dicts), unknown keys are rejected with
the closest valid key, and each section's ``validate()`` checks what types cannot. Every problem
becomes one ``ConfigError`` line naming the key, the value and what is valid.

Sections also turn themselves into the parts they configure (``CheckpointConfig.build``,
``Config.build_engine``, ``Config.build_tracker``), so a run's wiring (training/run.py,
train_main.py, downstream/finetune.py) reads as a list of steps. Those builders import lazily:
reading and checking a config needs none of the parts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import yaml

from data_pipeline.config import DataConfig, DataConfigError
from slam_pretrain.errors import ConfigError
from slam_pretrain.redact import redact
from slam_pretrain.model import ModelConfig
from slam_pretrain.training.context_schedule import Phase, check_lengths, parse_schedule

if TYPE_CHECKING:
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine import Engine
    from slam_pretrain.engine.base import ModelSource
    from slam_pretrain.training.checkpoint import CheckpointManager
    from slam_pretrain.training.tracking import Tracker


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16  # sequences of data.seq_len tokens (prepared rows) per optimizer step, all ranks
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 20
    lr_schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables periodic validation
    eval_batches: int = 8
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run
    peak_flops: Optional[float] = None  # per device, overrides the MFU peak table
    # z-loss coefficient (PaLM: 1e-4): the objective adds z_loss * mean(logsumexp(logits)^2); the
    # logged loss stays the cross-entropy, the term is logged as z_loss. 0 = off.
    z_loss: float = 0.0
    # Staged context extension (training/context_schedule.py): phases [{name, until_step, seq_len,
    # rope: {type, factor, ...}}, ...], each cutting the rows prepared at data.seq_len; batch sizes
    # above count prepared rows, so tokens per step stay the same in every phase. [] = data.seq_len.
    seq_len_schedule: list[dict[str, Any]] = field(default_factory=list)

    def phases(self) -> list[Phase]:
        """The parsed ``seq_len_schedule`` ([] without one)."""
        return parse_schedule(self.seq_len_schedule, self.max_steps)

    def validate(self, prefix: str = "train") -> None:
        for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval",
                    "eval_batches", "max_bad_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be a positive integer")
        for key in ("warmup_steps", "eval_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{prefix}.global_batch_size={self.global_batch_size} is invalid: must be a multiple "
                f"of train.micro_batch_size={self.micro_batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr={self.lr!r} is invalid: must be positive")
        for key in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be in [0, 1]")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            key = "weight_decay" if self.weight_decay < 0 else "grad_clip" if self.grad_clip < 0 else "eps"
            raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be >= 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"{prefix}.peak_flops={self.peak_flops!r} is invalid: must be positive or null")
        if self.z_loss < 0:
            raise ConfigError(f"{prefix}.z_loss={self.z_loss!r} is invalid: must be >= 0 (0 = off; PaLM uses 1e-4)")
        parse_schedule(self.seq_len_schedule, self.max_steps, f"{prefix}.seq_len_schedule")


@dataclass
class EngineConfig:
    name: Literal["deepspeed", "fsdp"] = "deepspeed"
    zero_stage: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: Literal["none", "ef_cycles", "all"] = "none"
    compile: bool = False
    offload_optimizer: bool = False  # DeepSpeed ZeRO optimizer offload to CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DS config
    # Context parallelism: every sequence split over this many ranks (FSDP2; the world is data
    # ranks x context ranks). 1 = off. See slam_pretrain/model/sequence_shard.py.
    context_parallel: int = 1

    def validate(self, prefix: str = "engine") -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage={self.zero_stage!r} is invalid: must be one of 0, 1, 2, 3")
        if self.context_parallel < 1:
            raise ConfigError(f"{prefix}.context_parallel={self.context_parallel!r} is invalid: must be >= 1 "
                              "(ranks each sequence is split over; 1 = off)")
        if self.context_parallel > 1 and self.name != "fsdp":
            raise ConfigError(f"{prefix}.context_parallel={self.context_parallel} is invalid with "
                              f"engine.name={self.name!r}: context parallelism runs on engine.name='fsdp'")
        if self.context_parallel > 1 and self.compile:
            raise ConfigError(f"{prefix}.compile=true is invalid with {prefix}.context_parallel="
                              f"{self.context_parallel}: compiled blocks under context parallelism are not "
                              "tested yet; set engine.compile=false")
        if self.offload_optimizer and self.name != "deepspeed":
            raise ConfigError(f"{prefix}.offload_optimizer=True is invalid: only engine.name='deepspeed' offloads")


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints (0 = only at the end and on signals)
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step's checkpoint forever (0 = none)
    # Checked before resuming: every file's size against the checkpoint's files.json (size), also
    # its sha256 (full: reads every byte once), or nothing (none).
    verify: Literal["size", "full", "none"] = "size"
    # Write checkpoints in the background where the engine can (FSDP2: DCP async_save, the copy
    # overlapping the next forward/backward); the previous one stays `latest` until the new one is
    # wholly on disk. Off by default (as torchtitan): a kill right after a save then finds that
    # save published; turn it on where saves are long (large models, slow filesystems).
    async_save: bool = False

    def validate(self, prefix: str = "checkpoint") -> None:
        for key in ("interval", "keep_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"{prefix}.keep_last={self.keep_last!r} is invalid: must be >= 1")

    def build(self, out_dir: Path, dist: "DistInfo") -> "CheckpointManager":
        """The run's checkpoints under ``out_dir``; creates it and checks that it is writable (one
        line if not), so call it before anything slow is built."""
        from slam_pretrain.training.checkpoint import CheckpointManager

        return CheckpointManager(out_dir, self.keep_last, self.keep_every, dist, verify=self.verify)


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<run.out_dir>/mlflow.db
    uri: Optional[str] = None
    experiment: str = "slam-pretrain"
    run_name: Optional[str] = None

    def validate(self, prefix: str = "tracking") -> None:
        if self.uri is not None and not self.uri.startswith(("sqlite:///", "http://", "https://", "file:")):
            raise ConfigError(f"{prefix}.uri={self.uri!r} is invalid: use sqlite:///PATH or http(s)://HOST:PORT")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 1234
    name: str = "slam"

    def validate(self, prefix: str = "run") -> None:
        if not self.out_dir:
            raise ConfigError(f"{prefix}.out_dir={self.out_dir!r} is invalid: must be a non-empty path")


@dataclass
class FinetuneConfig:
    """``slam-pretrain finetune``: text classification on a pretrained trunk (downstream/classify.py)."""

    train_file: Optional[str] = None  # JSONL, one {text, label} object per line
    val_file: Optional[str] = None  # None: hold out val_fraction of train_file (seeded by run.seed)
    val_fraction: float = 0.1
    text_field: str = "text"
    label_field: str = "label"
    max_len: int = 128  # tokens per example: EOS + the text, cut
    labels: list[str] = field(default_factory=list)  # the classes; empty: the sorted labels of train_file

    def validate(self, prefix: str = "finetune") -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{prefix}.val_fraction={self.val_fraction!r} is invalid: must be in (0, 1)")
        if self.max_len < 2:
            raise ConfigError(f"{prefix}.max_len={self.max_len!r} is invalid: must be >= 2")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"{prefix}.labels={self.labels!r} is invalid: names must be distinct")


@dataclass
class StabilityConfig:
    """Loss-spike monitor (training/stability.py): a step whose loss z-score over the last
    ``window`` good steps exceeds ``z_threshold`` (after ``min_steps`` of them) is a spike."""

    enabled: bool = False
    policy: Literal["skip", "rollback", "stop"] = "skip"
    z_threshold: float = 6.0
    window: int = 100  # good steps in the running mean/std
    min_steps: int = 20  # good steps seen before the monitor arms
    max_rollbacks: int = 3  # rollbacks allowed for spikes within rollback_window_steps; one more stops
    rollback_window_steps: int = 1000
    lr_factor: float = 1.0  # after a rollback the LR is multiplied by this for lr_factor_steps steps
    lr_factor_steps: int = 0

    def validate(self, prefix: str = "stability") -> None:
        if self.z_threshold <= 0:
            raise ConfigError(f"{prefix}.z_threshold={self.z_threshold!r} is invalid: must be > 0 (e.g. 6.0)")
        for key, low in (("window", 2), ("min_steps", 2), ("max_rollbacks", 1), ("rollback_window_steps", 1),
                         ("lr_factor_steps", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: must be >= {low}")
        if self.min_steps > self.window:
            raise ConfigError(f"{prefix}.min_steps={self.min_steps} is invalid: must be <= {prefix}.window="
                              f"{self.window} (the window never holds more steps, so it would never arm)")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError(f"{prefix}.lr_factor={self.lr_factor!r} is invalid: must be in (0, 1]")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            try:
                section.validate(f.name)
            except DataConfigError as e:
                raise ConfigError(str(e)) from None
        # Cross-section checks.
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is invalid: must be <= "
                              f"model.max_seq_len={self.model.max_seq_len}")
        if self.model.vocab_size > 2**32:
            raise ConfigError(f"model.vocab_size={self.model.vocab_size} is invalid: must be < 2**32")
        check_lengths(self.train.phases(), self.data.seq_len, self.model)  # each phase cuts data.seq_len rows
        if self.engine.context_parallel > 1:  # every length trained at must split into the CP chunks
            from slam_pretrain.model.sequence_shard import layout_problem

            lengths = sorted({self.data.seq_len, *(p.seq_len for p in self.train.phases())})
            for n in lengths:
                problem = layout_problem(self.model, n, self.engine.context_parallel)
                if problem is not None:
                    key = "data.seq_len" if n == self.data.seq_len else "train.seq_len_schedule"
                    raise ConfigError(f"{key}: {problem}")

    def build_engine(self, model: "ModelSource", dist: "DistInfo") -> "Engine":
        """The engine named by ``engine.name`` around ``model``: a built module (moved to
        ``dist.device``), or a factory the engine calls on the meta device / inside zero.Init and
        then initialises from ``run.seed`` (no rank ever holds the whole model)."""
        from slam_pretrain.engine import build_engine

        return build_engine(self, model, dist)

    def build_tracker(self, is_main: bool) -> "Tracker":
        """MLflow on rank 0 when ``tracking.enabled`` (its default store under ``run.out_dir``), a
        no-op tracker elsewhere."""
        from slam_pretrain.training.tracking import make_tracker

        return make_tracker(self, is_main=is_main, out_dir=Path(self.run.out_dir))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML for files and logs: credentials in URIs masked (slam_pretrain.redact)."""
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}`` (MLflow params), credentials in URIs masked."""
        out: dict[str, Any] = {}
        for section, values in redact(self.to_dict()).items():
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        return out


# ---------------------------------------------------------------------------------------------
# Type coercion and the dict -> dataclass walk.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return names + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin in (list, dict):
        return origin.__name__
    return getattr(tp, "__name__", str(tp))


class _NonFinite(ConfigError):
    """A float that is NaN or infinite (the message says so, whatever else the type allows)."""


def _check_finite(value: Any, key: str) -> None:
    """Refuse NaN and infinities, also inside free-form values (``data.sources[0].weight``,
    ``engine.deepspeed_extra``), naming the nested key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _NonFinite(f"{key}={value!r} is invalid: must be a finite number (not .nan or .inf)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float only).

    Floats must be finite wherever they appear: YAML's ``.nan``/``.inf`` (or ``nan`` / ``1e999``
    on the command line) pass every ``<``/``>`` check in ``validate()`` and fail much later.
    """
    _check_finite(value, key)
    origin = typing.get_origin(tp)
    err = ConfigError(f"{key}={value!r} is invalid: expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise err
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise err
        # Prefer an exact type match (keeps 256 an int and 0.6 a float in Union[int, float]).
        for a in args:
            if a in (int, float, str, bool) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except _NonFinite:
                raise
            except ConfigError:
                pass
        raise err
    if origin is list:
        if not isinstance(value, list):
            raise err
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise err
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise err
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
            return int(value)  # 1e6 in YAML
        raise err
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise err from None
            return _coerce(number, tp, key)  # "nan" and "inf" parse too: checked again
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        raise err
    raise err


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""


def _build(cls: type, values: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """Make a ``cls`` from ``base`` (or defaults) updated with ``values``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}={values!r} is invalid: expected a mapping of {', '.join(names)}")
    obj = base if base is not None else cls()
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}': {_suggest(str(key), names, prefix)}"
                              f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, _build(tp, value or {}, dotted, getattr(obj, key)))
        else:
            setattr(obj, key, _coerce(value, tp, dotted))
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is invalid: expected dotted.key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r} is invalid: the key must be section.name, e.g. train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "3e-4" as a string (no dot); numbers written that way are still numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path, value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then ``--set`` overrides; validated. Raises ConfigError."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found: pass an existing YAML file, e.g. configs/tiny_cpu.yaml")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if data is None:  # an empty file, or only comments: almost surely not what was meant
            raise ConfigError(f"config file {str(p)!r} is empty (no sections): start from a preset such as "
                              f"configs/tiny_cpu.yaml, or write '{{}}' to mean all defaults")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(Config))})")
        try:
            cfg = _build(Config, data, "", cfg)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    for item in overrides or []:
        keypath, value = parse_override(item)
        cfg = _build(Config, _nest(keypath, value), "", cfg)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (checkpoints store it); validated."""
    cfg = _build(Config, data, "", Config())
    cfg.validate()
    return cfg
