"""Small trainer callbacks: console + metrics.jsonl, MLflow, throughput/MFU, checkpoint cadence."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from slam_pretrain.training.metrics import ConsoleSink, JsonlSink, memory_gb, mfu, peak_flops
from slam_pretrain.training.trainer import Callback, Trainer


class LogCallback(Callback):
    """Rank 0: one line (or a progress bar) per logged step and a metrics.jsonl record."""

    def __init__(self, console: ConsoleSink, jsonl: JsonlSink):
        self.console, self.jsonl = console, jsonl

    def on_step_end(self, trainer: Trainer) -> None:
        self.console.step()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.console.write(record)
        self.jsonl.write({k: v for k, v in record.items() if k not in ("max_steps", "mfu_peak_measured")})

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

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        steps = max(self._steps, 1)
        tokens_per_s = self._tokens / max(self._time, 1e-9)
        out: dict[str, Any] = {
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size),  # None above 100%
            "step_time_s": self._time / steps,
            "data_wait_s": self._wait / steps,
            "mem_gb": memory_gb(self.device),
        }
        if self.peak_measured:
            out["mfu_peak_measured"] = True  # for the console only
        self._steps, self._time, self._wait, self._tokens = 0, 0.0, 0.0, 0  # the next window
        return out


# Namespaced metric names for MLflow (few keys: long histories of many keys slow the UI).
_MLFLOW_NAMES = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "skipped_steps": "train/skipped_steps", "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s", "data_wait_s": "data/wait_s", "mem_gb": "perf/mem_gb",
    "val_loss": "val/loss", "val_ppl": "val/perplexity", "val_acc": "val/accuracy", "val_macro_f1": "val/macro_f1",
}


class TrackingCallback(Callback):
    """Forwards logged records to the tracker (MLflow on rank 0; a no-op tracker elsewhere)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        metrics = {_MLFLOW_NAMES[k]: float(v) for k, v in record.items()
                   if k in _MLFLOW_NAMES and v is not None}
        self.tracker.log_metrics(metrics, step=record["step"])


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
