"""Small trainer callbacks: console + metrics.jsonl, MLflow, throughput/MFU, checkpoint cadence,
context-extension phases, the z-loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from slam_pretrain.distributed import all_reduce_mean
from slam_pretrain.model import flops_per_token
from slam_pretrain.training.context_schedule import Phase, model_config_for, phase_at
from slam_pretrain.training.metrics import ConsoleSink, JsonlSink, memory_gb, mfu, peak_flops
from slam_pretrain.training.trainer import Callback, Trainer

if TYPE_CHECKING:
    from slam_pretrain.model import ModelConfig


class LogCallback(Callback):
    """Rank 0: one line (or a progress bar) per logged step and a metrics.jsonl record."""

    def __init__(self, console: ConsoleSink, jsonl: JsonlSink):
        self.console, self.jsonl = console, jsonl

    def on_step_end(self, trainer: Trainer) -> None:
        self.console.step()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.console.write(record)
        self.jsonl.write({k: v for k, v in record.items() if k not in ("max_steps", "mfu_peak_measured")})

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        self.jsonl.write_event(event)
        if event.get("event") == "context_phase":
            self.console.message(
                f"context phase {event['phase'] + 1}/{event['phases']} ({event['name']}) from step {event['step']}: "
                f"seq_len {event['seq_len']} ({event['sequences_per_row']} per prepared row), rope {event['rope']}")

    def on_stop(self, trainer: Trainer, status: str) -> None:
        self.console.close()
        self.jsonl.close()


class ThroughputCallback(Callback):
    """A speed monitor: adds ``tokens_per_s``, ``mfu``, ``step_time_s``, ``data_wait_s`` and
    ``mem_gb`` to each logged training record, averaged over the steps since the previous one (and
    ``mfu_peak_measured`` when the peak is a measured estimate, for the console's ``~``).

    ``mfu`` is None above 100% (the peak was underestimated: see training/metrics.py). The step
    times are the trainer's own (a step's micro-batches and optimizer update, not evaluation or
    checkpointing).
    """

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int, device: torch.device,
                 peak_measured: bool = False, peak_source: str = ""):
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.device, self.peak_measured, self.peak_source = device, peak_measured, peak_source
        self._steps, self._time, self._wait, self._tokens = 0, 0.0, 0.0, 0
        self._flops = 0.0  # summed per step: flops_per_token changes with a context phase

    @classmethod
    def measure(cls, flops_per_token: float, world_size: int, device: torch.device, precision: str,
                override: Optional[float] = None) -> "ThroughputCallback":
        """With the peak FLOP/s of ``device`` (train.peak_flops, the data-sheet table, or a matmul
        measured now: see metrics.peak_flops)."""
        peak, source = peak_flops(device, precision, override)
        return cls(flops_per_token, peak, world_size, device, peak_measured=source.startswith("measured"),
                   peak_source=source)

    def peak_line(self) -> str:
        return f"MFU peak: {self.peak_flops / 1e12:.2f} TFLOP/s per device ({self.peak_source})"

    def on_train_step(self, trainer: Trainer, out: dict[str, Any]) -> None:
        self._steps += 1
        self._time += out["step_time_s"]
        self._wait += out["data_wait_s"]
        self._tokens += trainer.tokens_per_step
        self._flops += trainer.tokens_per_step * self.flops_per_token

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        steps = max(self._steps, 1)
        tokens_per_s = self._tokens / max(self._time, 1e-9)
        fpt = self._flops / self._tokens if self._tokens else self.flops_per_token  # the window's mean
        out: dict[str, Any] = {
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, fpt, self.peak_flops, self.world_size),  # None above 100%
            "step_time_s": self._time / steps,
            "data_wait_s": self._wait / steps,
            "mem_gb": memory_gb(self.device),
        }
        if self.peak_measured:
            out["mfu_peak_measured"] = True  # for the console only
        self._steps, self._time, self._wait, self._tokens, self._flops = 0, 0.0, 0.0, 0, 0.0  # the next window
        return out


class ZLossCallback(Callback):
    """The z-loss stability switch (``train.z_loss``): sets the coefficient on the model, whose
    training forwards then add the z-loss to the gradient (``SLAMv1LM._z_term``), and adds
    ``z_loss`` to each logged training record: coefficient x mean(logsumexp(logits)^2) over every
    counted token of the micro-batches since the previous record, on all ranks (all-reduced, so
    every rank calls ``metrics``; token-weighted). The record's ``loss`` stays the cross-entropy.
    """

    def __init__(self, model: torch.nn.Module, coefficient: float):
        self.model, self.coefficient = model, coefficient
        model.z_loss = coefficient

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        stats = self.model.pop_z_loss_stats()  # [sum of lse^2, tokens] on this rank, or None
        total, tokens = (0.0, 0.0) if stats is None else stats.tolist()
        # Means over ranks of both: their ratio is the mean over all ranks' tokens.
        total, tokens = all_reduce_mean(total), all_reduce_mean(tokens)
        return {"z_loss": self.coefficient * total / tokens if tokens else None}


# Namespaced metric names for MLflow (few keys: long histories of many keys slow the UI).
_MLFLOW_NAMES = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "skipped_steps": "train/skipped_steps", "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s", "data_wait_s": "data/wait_s", "mem_gb": "perf/mem_gb",
    "val_loss": "val/loss", "val_ppl": "val/perplexity", "val_acc": "val/accuracy", "val_macro_f1": "val/macro_f1",
    "seq_len": "train/seq_len", "z_loss": "train/z_loss",
}
# A context phase's start, at its first step (the event record's other fields are in metrics.jsonl).
_MLFLOW_EVENT_NAMES = {"phase": "context/phase", "seq_len": "context/seq_len", "rope_scaling": "context/rope_scaling"}


class TrackingCallback(Callback):
    """Forwards logged records to the tracker (MLflow on rank 0; a no-op tracker elsewhere)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        metrics = {_MLFLOW_NAMES[k]: float(v) for k, v in record.items()
                   if k in _MLFLOW_NAMES and v is not None}
        self.tracker.log_metrics(metrics, step=record["step"])

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        if event.get("event") == "context_phase":
            self.tracker.log_metrics({name: float(event[k]) for k, name in _MLFLOW_EVENT_NAMES.items()},
                                     step=event["step"])


class CheckpointCallback(Callback):
    """Saves every ``interval`` steps, at the end, and when stopped by a signal.

    ``save_fn(step)`` does the collective save (every rank calls it at the same step); ``flush_fn``
    flushes tracking first so a resumed run finds every metric logged up to the checkpoint.
    """

    def __init__(self, interval: int, save_fn: Callable[[int], None], flush_fn: Optional[Callable[[], None]] = None):
        self.interval, self.save_fn, self.flush_fn = interval, save_fn, flush_fn
        self.last_saved: Optional[int] = None

    def _save(self, step: int) -> None:
        if self.last_saved == step:
            return
        if self.flush_fn is not None:
            self.flush_fn()
        self.save_fn(step)
        self.last_saved = step

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        # Never checkpoint inside a run of non-finite steps: resuming there would replay it.
        if self.interval and step % self.interval == 0 and trainer.state.bad_consecutive == 0:
            self._save(step)

    def on_stop(self, trainer: Trainer, status: str) -> None:
        # After too many bad steps the newest checkpoint stays the last good one: write nothing.
        if status in ("done", "signal"):
            self._save(trainer.state.step)


class ContextScheduleCallback(Callback):
    """Staged context extension (``train.seq_len_schedule``, training/context_schedule.py).

    Before each optimizer step (``on_start``, then ``on_step_end`` of the step before) the phase of
    the next step is put in effect: the loaders cut their prepared rows to the phase's length, the
    model gets the phase's RoPE settings (``model.config`` replaced by a copy, so the run's config
    and its checkpoints keep the section as written; the model drops its cached EF plans when its
    RoPE settings change, so no factor of the old phase is reused), the MFU uses the new FLOPs per token,
    and records carry ``seq_len``. The phase is a function of the step alone, which every rank
    holds alike, so all ranks switch at the same boundary without a collective, and a run resumed
    at any step is in the phase the uninterrupted run was in. A phase's first step gets an event
    record (``context_phase``) in metrics.jsonl and MLflow, also when a resumed run starts there
    (the killed attempt's copy was dropped with the records after its checkpoint).
    """

    def __init__(self, phases: list[Phase], base_model: "ModelConfig", loaders: Sequence[Any], row_len: int):
        self.phases, self.base_model, self.loaders, self.row_len = phases, base_model, list(loaders), row_len
        self.current: Optional[Phase] = None

    def on_start(self, trainer: Trainer) -> None:
        self._enter(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step < trainer.train.max_steps:  # no phase starts after the last step
            self._enter(trainer)

    def _enter(self, trainer: Trainer) -> None:
        step = trainer.state.step + 1  # the step about to run
        phase = phase_at(self.phases, step)
        if self.current is not None and phase.index == self.current.index:
            return
        self.current = phase
        model_cfg = model_config_for(self.base_model, phase)
        trainer.engine.model.config = model_cfg
        for loader in self.loaders:
            loader.set_seq_len(phase.seq_len)
        trainer.phase_seq_len = phase.seq_len
        for cb in trainer.callbacks:
            if isinstance(cb, ThroughputCallback):
                cb.flops_per_token = flops_per_token(model_cfg, phase.seq_len)
        if phase.first_step == step:
            trainer.emit_event(phase.event(len(self.phases), self.row_len, model_cfg))
