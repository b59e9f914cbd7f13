"""The generic training loop.

The trainer talks to an engine (forward_backward / optimizer_step / eval_loss), a loader, and a
list of callbacks (console + metrics.jsonl, MLflow, checkpointing). It knows nothing of DeepSpeed,
FSDP or MLflow. One optimizer step = ``grad_accum`` micro-batches on every rank.

Stops: ``max_steps`` reached (status "done"), a stop signal on any rank (checkpoint, then
"signal"), or ``max_bad_steps`` consecutive non-finite steps ("bad_steps", no checkpoint written,
so the last good one stays the newest).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch

from slam_pretrain.distributed import all_reduce_any, all_reduce_mean
from slam_pretrain.training.metrics import mfu


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed (skipped ones included: their data was consumed)
    tokens: int = 0  # tokens consumed, all ranks
    bad_consecutive: int = 0
    bad_total: int = 0
    tracking_run_id: Optional[str] = None
    train_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class Callback:
    """Hooks with no-op defaults; subclasses override what they need."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_stop(self, trainer: "Trainer", status: str) -> None: ...


class EngineLike(Protocol):
    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def optimizer_step(self, lr: float) -> Any: ...
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (SLURM preemption, time limit, scancel); read at step boundaries."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopFlag":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class Trainer:
    def __init__(
        self,
        *,
        engine: EngineLike,
        loader: Any,  # data_pipeline loader: iterable per epoch, state_dict(), wait_time_s
        val_batches: Optional[Callable[[], Iterable[dict[str, torch.Tensor]]]],
        lr_at: Callable[[int], float],
        max_steps: int,
        grad_accum: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        world_size: int,
        device: torch.device,
        log_interval: int,
        eval_interval: int,
        max_bad_steps: int,
        callbacks: list[Callback],
        state: Optional[TrainerState] = None,
        memory_fn: Callable[[], float] = lambda: float("nan"),
        stop_flag: Optional[StopFlag] = None,
        peak_measured: bool = False,  # peak_flops was measured here (an estimate): MFU shown as ~x%
    ):
        self.engine, self.loader, self.val_batches = engine, loader, val_batches
        self.lr_at, self.max_steps, self.grad_accum = lr_at, max_steps, grad_accum
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.world_size, self.device = peak_flops, world_size, device
        self.peak_measured = peak_measured
        self.log_interval, self.eval_interval, self.max_bad_steps = log_interval, eval_interval, max_bad_steps
        self.callbacks, self.memory_fn = callbacks, memory_fn
        self.state = state or TrainerState()
        # Install the handler as early as possible (the caller may pass one installed at start-up,
        # before the slow imports and init, so an early SLURM signal is not lost).
        self.stop_flag = stop_flag or StopFlag()
        self.status = "running"
        self._epoch_iter: Optional[Iterator[dict[str, torch.Tensor]]] = None
        self._window = {"steps": 0, "time": 0.0, "wait": 0.0, "tokens": 0}

    # -- data ------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # at most one epoch boundary per call
            if self._epoch_iter is None:
                self._epoch_iter = iter(self.loader)
            try:
                return next(self._epoch_iter)
            except StopIteration:
                self._epoch_iter = None
        raise RuntimeError("the training loader yielded no batch in a whole epoch")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        return (batch["input_ids"].to(self.device, non_blocking=nb),
                batch["labels"].to(self.device, non_blocking=nb))

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        wait0 = getattr(self.loader, "wait_time_s", 0.0)
        lr = self.lr_at(self.state.step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.grad_accum):
            input_ids, labels = self._to_device(self._next_batch())
            # Summed on the device: one host sync per step (the .item() below), not per micro-batch.
            loss_sum += self.engine.forward_backward(input_ids, labels).double()
        result = self.engine.optimizer_step(lr)
        # The mean over ranks of each rank's mean micro-batch loss (equal-sized batches).
        loss = all_reduce_mean(loss_sum.item() / self.grad_accum)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        if result.skipped or not math.isfinite(loss):
            self.state.bad_consecutive += 1
            self.state.bad_total += 1
        else:
            self.state.bad_consecutive = 0
        dt = time.perf_counter() - t0
        self.state.train_time_s += dt
        wait = getattr(self.loader, "wait_time_s", 0.0) - wait0
        return {"loss": loss, "lr": lr, "grad_norm": float(result.grad_norm), "skipped": bool(result.skipped),
                "step_time_s": dt, "data_wait_s": wait}

    def _window_record(self, out: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Accumulate per-step figures; every log_interval steps return a record averaged over the window."""
        w = self._window
        w["steps"] += 1
        w["time"] += out["step_time_s"]
        w["wait"] += out["data_wait_s"]
        w["tokens"] += self.tokens_per_step
        if self.state.step % self.log_interval and self.state.step != self.max_steps:
            return None
        tokens_per_s = w["tokens"] / max(w["time"], 1e-9)
        record = {
            "step": self.state.step,
            "max_steps": self.max_steps,
            "loss": out["loss"],  # this step's loss (exactly comparable across resumed runs)
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "tokens": self.state.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size),  # None above 100%
            "step_time_s": w["time"] / w["steps"],
            "data_wait_s": w["wait"] / w["steps"],
            "mem_gb": self.memory_fn(),
            "skipped_steps": self.state.bad_total,
        }
        if self.peak_measured:
            record["mfu_peak_measured"] = True  # for the console only
        self._window = {k: 0 for k in w}
        return record

    def evaluate(self) -> Optional[dict[str, Any]]:
        if self.val_batches is None:
            return None
        self.engine.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in self.val_batches():
                input_ids, labels = self._to_device(batch)
                total += float(self.engine.eval_loss(input_ids, labels))
                n += 1
        self.engine.train()
        if n == 0:
            return None
        val_loss = all_reduce_mean(total / n)
        return {"step": self.state.step, "max_steps": self.max_steps, "split": "val",
                "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _emit(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, record)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> str:
        """Run until done, a stop signal, or too many bad steps; return the final status."""
        if not self.stop_flag.installed:
            self.stop_flag.install()
        self.engine.train()
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.state.step < self.max_steps:
                out = self.train_step()
                if self.state.bad_consecutive >= self.max_bad_steps:
                    self.status = "bad_steps"
                    break
                record = self._window_record(out)
                if record is not None:
                    self._emit(record)
                if self.eval_interval and self.state.step % self.eval_interval == 0 \
                        and self.state.step != self.max_steps:
                    val = self.evaluate()
                    if val is not None:
                        self._emit(val)
                for cb in self.callbacks:
                    cb.on_step_end(self)
                # Every rank must stop at the same step: agree on the flag collectively.
                if all_reduce_any(self.stop_flag.signum is not None):
                    self.status = "signal"
                    break
            else:
                val = self.evaluate()
                if val is not None:
                    self._emit(val)
                self.status = "done"
            for cb in self.callbacks:
                cb.on_stop(self, self.status)
            return self.status
        finally:
            self.stop_flag.uninstall()
