"""The generic training loop.

The trainer talks to an engine (forward_backward / optimizer_step / eval_loss), a loader, and a
list of callbacks (console + metrics.jsonl, MLflow, throughput/MFU, checkpointing). It knows
nothing of DeepSpeed, FSDP or MLflow. One optimizer step = ``grad_accum`` micro-batches on every
rank (the engine's ``grad_accum``). Its settings are the ``train`` section (``TrainConfig``):
``max_steps``, ``log_interval``, ``eval_interval``, ``max_bad_steps`` and the LR schedule
(``engine.optim.lr_at``).

Each batch is moved to the device here, once (non-blocking on CUDA); engines take tensors that are
already on their device.

Stops: ``max_steps`` reached (status "done"), a stop signal on any rank (checkpoint, then
"signal"), or ``max_bad_steps`` consecutive non-finite steps ("bad_steps", no checkpoint written,
so the last good one stays the newest), or a callback's ``stop_status`` (the spike monitor's
"loss_spike": no checkpoint written either).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Protocol

import torch

from slam_pretrain.distributed import all_reduce_any, all_reduce_mean
from slam_pretrain.engine.optim import lr_at

if TYPE_CHECKING:
    from slam_pretrain.config import TrainConfig


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed (skipped ones included: their data was consumed)
    tokens: int = 0  # tokens consumed, all ranks
    bad_consecutive: int = 0
    bad_total: int = 0
    tracking_run_id: Optional[str] = None
    train_time_s: float = 0.0
    stability: Optional[dict[str, Any]] = None  # the spike monitor's state (training/stability.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class Callback:
    """Hooks with no-op defaults; subclasses override what they need.

    Per optimizer step, in this order: ``on_train_step(trainer, out)`` with the step's figures
    (``loss``, ``lr``, ``grad_norm``, ``skipped``, ``step_time_s``, ``data_wait_s``); on a logged
    step, ``metrics(trainer)`` of every callback (the fields each adds to the training record,
    called once per record, so a callback may start a new averaging window there), then
    ``on_log(trainer, record)`` of every callback (also for validation records); last
    ``on_step_end(trainer)``. ``on_start`` / ``on_stop`` bracket ``fit``. ``on_event(trainer,
    event)``: a record that is not a metric (``{"event": KIND, "step": N, ...}``, e.g. a context
    phase starting), sent by ``Trainer.emit_event``. ``before_update(trainer, loss)``: the step's
    all-reduced loss before the optimizer update; True holds (skips) the update on every rank.
    Only callbacks that override it make the trainer read the loss that early.
    """

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_train_step(self, trainer: "Trainer", out: dict[str, Any]) -> None: ...
    def metrics(self, trainer: "Trainer") -> dict[str, Any]:
        return {}
    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_event(self, trainer: "Trainer", event: dict[str, Any]) -> None: ...
    def before_update(self, trainer: "Trainer", loss: float) -> bool:
        return False
    def on_stop(self, trainer: "Trainer", status: str) -> None: ...


class EngineLike(Protocol):
    grad_accum: int
    device: torch.device
    model: torch.nn.Module  # the model being trained (a context phase changes its RoPE settings)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def optimizer_step(self, lr: float, hold: bool = False) -> Any: ...
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
        train: "TrainConfig",
        engine: EngineLike,
        loader: Any,  # data_pipeline loader: iterable per epoch, state_dict(), wait_time_s
        seq_len: int,  # tokens per sequence: a step consumes train.global_batch_size x seq_len tokens
        callbacks: list[Callback],
        val_batches: Optional[Callable[[], Iterable[dict[str, torch.Tensor]]]] = None,
        state: Optional[TrainerState] = None,
        stop_flag: Optional[StopFlag] = None,
    ):
        self.train, self.engine, self.loader, self.val_batches = train, engine, loader, val_batches
        self.tokens_per_step = train.global_batch_size * seq_len
        self.callbacks = callbacks
        # Shared with whoever saves checkpoints (training.run.TrainingRun): updated in place, never replaced.
        self.state = state or TrainerState()
        # Install the handler as early as possible (the caller may pass one installed at start-up,
        # before the slow imports and init, so an early SLURM signal is not lost).
        self.stop_flag = stop_flag or StopFlag()
        self.status = "running"
        self._epoch_iter: Optional[Iterator[dict[str, torch.Tensor]]] = None
        # The sequence length in effect when a context schedule sets it (ContextScheduleCallback);
        # then every record carries it as ``seq_len``. None: the loader's rows, not logged.
        self.phase_seq_len: Optional[int] = None
        # Set by callbacks (the spike monitor): the scheduled LR is multiplied by lr_factor, and a
        # stop_status ends the run after the step (a decision every rank takes alike).
        self.lr_factor = 1.0
        self.stop_status: Optional[str] = None
        self._pre_update = [cb for cb in callbacks if type(cb).before_update is not Callback.before_update]

    @property
    def device(self) -> torch.device:
        return self.engine.device

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
        """The one place a batch moves to the device (engines expect it there)."""
        nb = self.device.type == "cuda"  # pinned host memory -> copy overlaps compute
        return (batch["input_ids"].to(self.device, non_blocking=nb),
                batch["labels"].to(self.device, non_blocking=nb))

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        wait0 = getattr(self.loader, "wait_time_s", 0.0)
        lr = lr_at(self.state.step, self.train) * self.lr_factor
        grad_accum = self.engine.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(grad_accum):
            input_ids, labels = self._to_device(self._next_batch())
            # Summed on the device: one host sync per step (the .item() below), not per micro-batch.
            loss_sum += self.engine.forward_backward(input_ids, labels).double()
        # The mean over ranks of each rank's mean micro-batch loss (equal-sized batches). Read before
        # the update only when a callback decides on it (one more host sync before the update).
        loss = all_reduce_mean(loss_sum.item() / grad_accum) if self._pre_update else None
        if loss is not None and any([cb.before_update(self, loss) for cb in self._pre_update]):
            result = self.engine.optimizer_step(lr, hold=True)
        else:
            result = self.engine.optimizer_step(lr)
        if loss is None:
            loss = all_reduce_mean(loss_sum.item() / grad_accum)
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

    def train_record(self, out: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Every log_interval steps (and at the last step): this step's record, with the fields each
        callback's ``metrics`` adds (throughput, MFU, memory: ThroughputCallback); else None."""
        step = self.state.step
        if step % self.train.log_interval and step != self.train.max_steps:
            return None
        record = {
            "step": step,
            "max_steps": self.train.max_steps,
            "loss": out["loss"],  # this step's loss (exactly comparable across resumed runs)
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "tokens": self.state.tokens,
        }
        if self.phase_seq_len is not None:
            record["seq_len"] = self.phase_seq_len
        for cb in self.callbacks:
            record.update(cb.metrics(self))
        record["skipped_steps"] = self.state.bad_total
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
        record = {"step": self.state.step, "max_steps": self.train.max_steps, "split": "val",
                  "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.phase_seq_len is not None:
            record["seq_len"] = self.phase_seq_len
        return record

    def _emit(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, record)

    def emit_event(self, event: dict[str, Any]) -> None:
        """Hand ``event`` (``{"event": KIND, "step": N, ...}``) to every callback's ``on_event``."""
        for cb in self.callbacks:
            cb.on_event(self, event)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> str:
        """Run until done, a stop signal, or too many bad steps; return the final status."""
        if not self.stop_flag.installed:
            self.stop_flag.install()
        t = self.train
        self.engine.train()
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.state.step < t.max_steps:
                out = self.train_step()
                for cb in self.callbacks:
                    cb.on_train_step(self, out)
                if self.state.bad_consecutive >= t.max_bad_steps:
                    self.status = "bad_steps"
                    break
                record = self.train_record(out)
                if record is not None:
                    self._emit(record)
                if t.eval_interval and self.state.step % t.eval_interval == 0 and self.state.step != t.max_steps:
                    val = self.evaluate()
                    if val is not None:
                        self._emit(val)
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if self.stop_status is not None:  # a callback ended the run (the spike monitor's "stop")
                    self.status = self.stop_status
                    break
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
