"""Staged context extension: ``train.seq_len_schedule``, a list of phases, each a sequence length
and the RoPE settings for it, switched at optimizer-step boundaries.

    train:
      seq_len_schedule:
        - {name: short, until_step: 8000, seq_len: 4096}
        - {name: long, seq_len: 32768, rope: {type: yarn, factor: 8, original_max_len: 4096}}

Phase i runs the optimizer steps ``until_step[i-1] + 1 .. until_step[i]`` (steps counted from 1, as
logged); the last phase may leave ``until_step`` out and runs to the end. Why a step and not a
token count: the step is what every rank, the LR schedule and every checkpoint already agree on,
so the phase of any step is a pure function of the config, and a resumed run (at any step, any
world size) is in the same phase as the uninterrupted one without storing anything.

The dataset is prepared once at the longest length (``data.seq_len``); a phase of length L cuts
each prepared row into ``data.seq_len / L`` sequences (data_pipeline/loader.py ``set_seq_len``).
``train.micro_batch_size`` and ``train.global_batch_size`` count prepared rows, so tokens per
micro-batch and per step, the gradient accumulation and the LR schedule are the same in every phase.

``rope`` (optional; absent = the model section's RoPE settings): ``type`` none | linear | yarn,
``factor`` (linear, yarn), ``original_max_len`` (yarn: the length trained at before extension),
``beta_fast`` / ``beta_slow`` (yarn ramp bounds, default 32 / 1), ``attn_factor`` (yarn q/k scale,
default 0.1 ln(factor) + 1), ``theta`` (the RoPE base for this phase; default model.rope_theta).
A phase's rope replaces every ``model.rope_*`` field (see ``rope_fields``).

This module only reads and checks; ``callbacks.ContextScheduleCallback`` applies phases in a run.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from slam_pretrain.errors import ConfigError

if TYPE_CHECKING:
    from slam_pretrain.model import ModelConfig

PHASE_KEYS = ("name", "until_step", "seq_len", "rope")
ROPE_KEYS = {"none": ("type", "theta"), "linear": ("type", "factor", "theta"),
             "yarn": ("type", "factor", "original_max_len", "beta_fast", "beta_slow", "attn_factor", "theta")}


@dataclass(frozen=True)
class Phase:
    index: int
    name: str
    first_step: int  # the first optimizer step (from 1) run in this phase
    last_step: Optional[int]  # the last one; None: to the end of the run
    seq_len: int
    rope: Optional[dict[str, Any]]  # the ModelConfig rope fields it sets; None: the model section's

    def event(self, count: int, row_len: int, model: "ModelConfig") -> dict[str, Any]:
        """The metrics.jsonl record of this phase's start (``JsonlSink.write_event``); ``model``:
        the model section in effect during the phase (``model_config_for``)."""
        return {"event": "context_phase", "step": self.first_step, "phase": self.index, "phases": count,
                "name": self.name, "seq_len": self.seq_len, "sequences_per_row": row_len // self.seq_len,
                "until_step": self.last_step, "rope": rope_text(model), "rope_theta": model.rope_theta,
                "rope_scaling": model.rope_scaling, "rope_scaling_type": model.rope_scaling_type}


def rope_text(model: "ModelConfig") -> str:
    """A model section's RoPE in a few words, for logs: "plain", "linear x4", "yarn x8 from 4096"."""
    if model.pos_encoding != "rope":
        return "none (learned positions)"
    if model.rope_scaling == 1:
        return "plain"
    if model.rope_scaling_type == "yarn":
        return f"yarn x{model.rope_scaling:g} from {model.rope_original_max_len}"
    return f"linear x{model.rope_scaling:g}"


def _suggest(key: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _check_keys(d: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown key '{where}.{key}': {_suggest(str(key), valid)}valid keys: {', '.join(valid)}")


def _int(value: Any, key: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} is invalid: must be {what}")
    return value


def _number(value: Any, key: str, what: str = "a positive number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}={value!r} is invalid: must be {what}")
    return float(value)


def rope_fields(rope: Any, where: str) -> dict[str, Any]:
    """A phase's ``rope`` mapping -> the ModelConfig fields it sets (all rope_* but rope_theta,
    which only ``theta`` changes); ConfigError naming the key otherwise."""
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}={rope!r} is invalid: expected a mapping such as "
                          "{type: yarn, factor: 8, original_max_len: 4096}, or leave it out")
    kind = rope.get("type")
    if kind not in ROPE_KEYS:
        raise ConfigError(f"{where}.type={kind!r} is invalid: one of 'none', 'linear', 'yarn'")
    _check_keys(rope, ROPE_KEYS[kind], where)
    out: dict[str, Any] = {"rope_scaling": 1.0, "rope_scaling_type": "linear", "rope_original_max_len": None,
                           "rope_yarn_beta_fast": 32.0, "rope_yarn_beta_slow": 1.0, "rope_yarn_attn_factor": None}
    if "theta" in rope:
        out["rope_theta"] = _number(rope["theta"], f"{where}.theta")
    if kind == "none":
        return out
    if "factor" not in rope:
        raise ConfigError(f"{where}.factor is missing: type {kind!r} needs the scale factor (e.g. 8 for 4K -> 32K)")
    out["rope_scaling"] = _number(rope["factor"], f"{where}.factor")
    if kind == "linear":
        return out
    out["rope_scaling_type"] = "yarn"
    if out["rope_scaling"] < 1:
        raise ConfigError(f"{where}.factor={rope['factor']!r} is invalid: YaRN extends the context, must be >= 1")
    if "original_max_len" not in rope:
        raise ConfigError(f"{where}.original_max_len is missing: YaRN needs the context length trained at "
                          "before extension (e.g. the previous phase's seq_len)")
    out["rope_original_max_len"] = _int(rope["original_max_len"], f"{where}.original_max_len",
                                        "a positive number of tokens")
    fast = _number(rope.get("beta_fast", 32.0), f"{where}.beta_fast")
    slow = _number(rope.get("beta_slow", 1.0), f"{where}.beta_slow")
    if slow >= fast:
        raise ConfigError(f"{where}.beta_slow={slow:g} is invalid: must be below beta_fast={fast:g}")
    out["rope_yarn_beta_fast"], out["rope_yarn_beta_slow"] = fast, slow
    if rope.get("attn_factor") is not None:
        out["rope_yarn_attn_factor"] = _number(rope["attn_factor"], f"{where}.attn_factor")
    return out


def parse_schedule(raw: Any, max_steps: int, prefix: str = "train.seq_len_schedule") -> list[Phase]:
    """The phases of ``train.seq_len_schedule`` ([] when empty); ConfigError (one line, naming the
    key) for anything malformed. Lengths against the data and model are checked by
    ``check_lengths`` (they need other sections)."""
    if not raw:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{prefix}={raw!r} is invalid: expected a list of phases "
                          "[{until_step: N, seq_len: L, rope: {...}}, ..., {seq_len: L}]")
    phases: list[Phase] = []
    first = 1
    for i, item in enumerate(raw):
        where = f"{prefix}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}={item!r} is invalid: expected a mapping with {', '.join(PHASE_KEYS)}")
        _check_keys(item, PHASE_KEYS, where)
        if "seq_len" not in item:
            raise ConfigError(f"{where}.seq_len is missing: every phase needs its sequence length in tokens")
        seq_len = _int(item["seq_len"], f"{where}.seq_len", "a positive number of tokens")
        last = item.get("until_step")
        is_last = i == len(raw) - 1
        if last is None and not is_last:
            raise ConfigError(f"{where}.until_step is missing: every phase but the last needs the last step it runs")
        if last is not None:
            _int(last, f"{where}.until_step", "a positive step number")
            if last < first:
                raise ConfigError(f"{where}.until_step={last} is invalid: must be >= {first} (phases run in "
                                  "order; the previous phase ends at step " + str(first - 1) + ")")
            if is_last and last < max_steps:
                raise ConfigError(f"{where}.until_step={last} is invalid: the last phase runs to the end, so leave "
                                  f"it out or make it >= train.max_steps={max_steps}")
        name = item.get("name", f"phase{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name={name!r} is invalid: must be a non-empty string")
        rope = rope_fields(item["rope"], f"{where}.rope") if item.get("rope") is not None else None
        phases.append(Phase(i, name, first, last, seq_len, rope))
        first = (last or 0) + 1
    return phases


def check_lengths(phases: list[Phase], row_len: int, model: "ModelConfig",
                  prefix: str = "train.seq_len_schedule") -> None:
    """Each phase's length divides the prepared length (data.seq_len), and the model section with
    the phase's RoPE is valid; ConfigError naming the phase otherwise."""
    for p in phases:
        where = f"{prefix}[{p.index}]"
        if p.seq_len > row_len or row_len % p.seq_len:
            divisors = [d for d in (row_len // 8, row_len // 4, row_len // 2, row_len) if d >= 1 and row_len % d == 0]
            raise ConfigError(f"{where}.seq_len={p.seq_len} is invalid: must divide data.seq_len={row_len} (the "
                              f"dataset is prepared at the longest length and cut; e.g. "
                              f"{', '.join(str(d) for d in sorted(set(divisors)))})")
        if p.rope is not None and model.pos_encoding != "rope":
            raise ConfigError(f"{where}.rope is invalid: model.pos_encoding={model.pos_encoding!r} has no RoPE to "
                              "scale; leave rope out")
        try:
            model_config_for(model, p).validate("model")
        except ConfigError as e:
            raise ConfigError(f"{where}.rope: {e}") from None


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase optimizer step ``step`` (from 1) runs in; past the end, the last phase."""
    for p in phases:
        if p.last_step is None or step <= p.last_step:
            return p
    return phases[-1]


def model_config_for(base: "ModelConfig", phase: Phase) -> "ModelConfig":
    """The model section as it is during ``phase``: ``base`` with the phase's RoPE fields (a new
    object: the run's own config stays what the user wrote, which is what checkpoints record)."""
    return base if phase.rope is None else dataclasses.replace(base, **phase.rope)


def model_section_at(config: dict[str, Any], step: int) -> dict[str, Any]:
    """The ``model`` section of a run config dict (a checkpoint's config.yaml) as the weights saved
    after ``step`` optimizer steps were trained: with the RoPE of the phase of step ``step`` (step
    0: the first phase's). Configs without a schedule: the model section unchanged."""
    model = dict(config.get("model") or {})
    train = config.get("train") or {}
    raw = train.get("seq_len_schedule")
    if not raw:
        return model
    phases = parse_schedule(raw, int(train.get("max_steps", 0) or 0))
    phase = phase_at(phases, max(int(step), 1))
    return model if phase.rope is None else {**model, **phase.rope}
