"""Loss-spike monitor (``stability`` section): skip the update, roll back, or stop.

A trainer callback keeps the last ``window`` losses and gradient norms of good steps. Once it has
seen ``min_steps`` of them (armed), a step whose loss z-score ``(loss - mean) / std`` exceeds
``z_threshold`` is a spike. The loss is the trainer's all-reduced one, known after the step's
micro-batches and before the update (``Callback.before_update``), so every rank sees the same
value and takes the same decision without another collective. What happens then (``policy``):

- ``skip``: the update is not applied (``engine.optimizer_step(lr, hold=True)``); the step's data
  is consumed and the run goes on (the trainer counts it as a skipped step).
- ``rollback``: the update is held, then (``on_step_end``) the newest checkpoint of the current
  branch is loaded through the resume machinery (``CheckpointManager.resume_point("auto")`` +
  ``load``: engine, trainer state, RNG), but the loader is *not* rewound: the samples consumed
  since that checkpoint (the window that led into the spike) are skipped. The LR is multiplied by
  ``lr_factor`` for the next ``lr_factor_steps`` steps. More than ``max_rollbacks`` rollbacks for
  spikes within ``rollback_window_steps`` steps stop the run instead (a loop). Before the first
  checkpoint there is nothing to roll back to: the step is skipped instead.
- ``stop``: the update is held and the run stops with status ``loss_spike`` (no checkpoint is
  written, so the newest one is the last good state).

The monitor's state (windows, rollback history, LR countdown) rides in the trainer state
(``TrainerState.stability``), so it is in every checkpoint: a run killed during recovery resumes
from the checkpoint before the spike, meets the same spike, and rolls back the same way.

Gradient norms are only known inside the optimizer step, after the decision: their z-score is
reported with each spike (and in MLflow) as a diagnosis, not used to decide.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from slam_pretrain.training.rng import restore_rng
from slam_pretrain.training.trainer import Callback, Trainer, TrainerState

if TYPE_CHECKING:
    from slam_pretrain.config import StabilityConfig
    from slam_pretrain.training.checkpoint import CheckpointManager

SPIKE_STATUS = "loss_spike"  # the trainer's final status when the monitor stops the run
TEST_SPIKE_FACTOR = 10.0


def _test_spike_factor(first_sample: int, samples: int) -> float:
    """The one test-only switch of this module: ``SLAM_TEST_SPIKE_AT_STEP=N[,M...]`` multiplies the
    loss the monitor sees by 10 for the step that consumes the samples the uninterrupted run
    consumes at step N (samples [(N-1)*G, N*G), G per step). Tied to the data, not the step
    number, like a poisoned batch: after a rollback skips those samples it does not come back,
    and a resumed run meets it at the same point. Unset, it costs one getenv."""
    spec = os.environ.get("SLAM_TEST_SPIKE_AT_STEP")
    if not spec or samples <= 0 or first_sample % samples:
        return 1.0
    return TEST_SPIKE_FACTOR if first_sample // samples + 1 in {int(s) for s in spec.split(",")} else 1.0


class RunningStats:
    """Mean and standard deviation of the last ``window`` values (recomputed from the deque with
    fsum: exact enough, order-independent of history, and the values are what is saved)."""

    def __init__(self, window: int, values: Optional[list[float]] = None):
        self.values: deque[float] = deque(values or [], maxlen=window)

    def add(self, x: float) -> None:
        self.values.append(float(x))

    def __len__(self) -> int:
        return len(self.values)

    def z(self, x: float) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        mean = math.fsum(self.values) / n
        var = math.fsum((v - mean) ** 2 for v in self.values) / (n - 1)
        # A floor on the spread: a loss that sat still for a window would make any wobble "6 sigma".
        std = max(math.sqrt(var), 1e-3 * abs(mean), 1e-8)
        return (x - mean) / std


class SpikeMonitor(Callback):
    """The ``stability`` section as a callback (every rank; events reach metrics.jsonl and the
    console through ``Trainer.emit_event`` on rank 0, and MLflow through ``tracker``)."""

    def __init__(self, cfg: "StabilityConfig", *, ckpt: "CheckpointManager", engine: Any, config: Any,
                 checksums: dict[str, Any], loader: Any, tracker: Any, is_main: bool):
        self.cfg, self.ckpt, self.engine, self.config, self.checksums = cfg, ckpt, engine, config, checksums
        self.loader, self.tracker, self.is_main = loader, tracker, is_main
        self.loss = RunningStats(cfg.window)
        self.grad_norm = RunningStats(cfg.window)
        self.rollbacks: list[int] = []  # the spike steps that led to a rollback
        self.spikes = 0
        self.lr_left = 0  # steps still run at lr_factor
        self.samples_skipped = 0
        self._first_sample = 0  # loader position before the step under way
        self._pending: Optional[dict[str, Any]] = None  # the spike of the step under way

    # -- state (TrainerState.stability, saved in every checkpoint) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"loss": list(self.loss.values), "grad_norm": list(self.grad_norm.values),
                "rollbacks": list(self.rollbacks), "spikes": self.spikes, "lr_left": self.lr_left,
                "samples_skipped": self.samples_skipped}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.loss = RunningStats(self.cfg.window, d.get("loss", []))
        self.grad_norm = RunningStats(self.cfg.window, d.get("grad_norm", []))
        self.rollbacks = [int(s) for s in d.get("rollbacks", [])]
        self.spikes, self.lr_left = int(d.get("spikes", 0)), int(d.get("lr_left", 0))
        self.samples_skipped = int(d.get("samples_skipped", 0))

    # -- hooks ------------------------------------------------------------------------------
    def on_start(self, trainer: Trainer) -> None:
        if trainer.state.stability:
            self.load_state_dict(trainer.state.stability)
        self._first_sample = self.loader.position
        trainer.lr_factor = self.cfg.lr_factor if self.lr_left > 0 else 1.0

    def before_update(self, trainer: Trainer, loss: float) -> bool:
        step = trainer.state.step + 1  # the step under way
        taken = self.loader.position - self._first_sample
        seen = loss * _test_spike_factor(self._first_sample, taken)
        self._pending = None
        if not math.isfinite(seen) or len(self.loss) < self.cfg.min_steps:
            return False  # not armed yet; a non-finite loss is the engine's to skip
        z = self.loss.z(seen)
        if z <= self.cfg.z_threshold:
            return False
        self._pending = {"event": "loss_spike", "step": step, "loss": seen, "loss_z": z,
                         "policy": self.cfg.policy, "samples": [self._first_sample, self.loader.position]}
        return True  # every policy holds the spiking update

    def on_train_step(self, trainer: Trainer, out: dict[str, Any]) -> None:
        if self.lr_left > 0:
            self.lr_left -= 1
        spike = self._pending
        if spike is None:
            if math.isfinite(out["loss"]) and not out["skipped"]:
                self.loss.add(out["loss"])
                if math.isfinite(out["grad_norm"]):
                    self.grad_norm.add(out["grad_norm"])
        else:
            self.spikes += 1
            spike["grad_norm"] = out["grad_norm"]
            spike["grad_norm_z"] = self.grad_norm.z(out["grad_norm"]) if math.isfinite(out["grad_norm"]) else None
        trainer.state.stability = self.state_dict()  # before CheckpointCallback.on_step_end saves it

    def on_step_end(self, trainer: Trainer) -> None:
        spike, self._pending = self._pending, None
        if spike is not None:
            self._act(trainer, spike)
        self._first_sample = self.loader.position
        trainer.lr_factor = self.cfg.lr_factor if self.lr_left > 0 else 1.0

    # -- policies ---------------------------------------------------------------------------
    def _act(self, trainer: Trainer, spike: dict[str, Any]) -> None:
        step, policy = spike["step"], self.cfg.policy
        if policy == "rollback":
            recent = [s for s in self.rollbacks if s > step - self.cfg.rollback_window_steps]
            if len(recent) >= self.cfg.max_rollbacks:
                spike["action"] = "stop"
                spike["reason"] = (f"{len(recent)} rollbacks within {self.cfg.rollback_window_steps} steps "
                                   f"(stability.max_rollbacks={self.cfg.max_rollbacks})")
            else:
                spike.update(self._rollback(trainer, step))
        else:
            spike["action"] = policy
        if spike["action"] == "stop":
            trainer.stop_status = SPIKE_STATUS
        trainer.state.stability = self.state_dict()
        self._report(trainer, spike)

    def _rollback(self, trainer: Trainer, step: int) -> dict[str, Any]:
        """Restore the newest checkpoint of the branch (every rank: collectives), keep the loader
        where it is; what the event says about it."""
        t0 = time.perf_counter()
        self.ckpt.wait()  # a save in flight is part of what we may roll back to
        path = self.ckpt.resume_point("auto")
        if path is None:
            return {"action": "skip", "reason": "no checkpoint to roll back to yet: the update was skipped"}
        trainer_state, rank_state, _ = self.ckpt.load(path, self.engine, config=self.config, checksums=self.checksums)
        restore_rng(rank_state["rng"])
        saved = TrainerState.from_dict(trainer_state)
        # In place: TrainingRun saves from this object. Wall time and the MLflow run go on.
        saved.tracking_run_id, saved.train_time_s = trainer.state.tracking_run_id, trainer.state.train_time_s
        trainer.state.__dict__.update(saved.__dict__)
        # The windows as they were at the checkpoint; the rollback history and counters are this run's.
        live = self.state_dict()
        self.load_state_dict(saved.stability or {})
        skipped = [int(rank_state["loader"]["position"]), self.loader.position]
        self.rollbacks, self.spikes = live["rollbacks"] + [step], live["spikes"]
        self.samples_skipped = live["samples_skipped"] + skipped[1] - skipped[0]
        self.lr_left = self.cfg.lr_factor_steps if self.cfg.lr_factor != 1.0 else 0
        # The run goes on from an older state on other data: a new checkpoint branch, as a rewind.
        branch = self.ckpt.begin_branch(saved.step, path)
        trainer.emit_event(branch)
        self.tracker.log_metrics({"train/branch": float(branch["branch"])}, step=saved.step)
        return {"action": "rollback", "to_step": saved.step, "checkpoint": str(path),
                "skipped_samples": skipped, "skipped_steps": [saved.step + 1, step],
                "rollbacks": len(self.rollbacks), "lr_factor": self.cfg.lr_factor, "lr_factor_steps": self.lr_left,
                "recovery_s": round(time.perf_counter() - t0, 3)}  # what it cost (wall time; not deterministic)

    def _report(self, trainer: Trainer, spike: dict[str, Any]) -> None:
        trainer.emit_event(spike)  # metrics.jsonl (LogCallback, rank 0)
        metrics = {"stability/spike": 1.0, "stability/loss_z": spike["loss_z"],
                   "stability/rollback": float(spike["action"] == "rollback")}
        if spike.get("grad_norm_z") is not None:
            metrics["stability/grad_norm_z"] = spike["grad_norm_z"]
        self.tracker.log_metrics(metrics, step=spike["step"])
        if self.is_main:
            print(_spike_line(spike), file=sys.stderr, flush=True)


def _spike_line(s: dict[str, Any]) -> str:
    head = f"loss spike at step {s['step']}: loss {s['loss']:.4f} (z {s['loss_z']:.1f})"
    if s["action"] == "rollback":
        a, b = s["skipped_samples"]
        return (f"{head}: rolled back to step {s['to_step']} ({s['checkpoint']}); skipped samples [{a}, {b}) "
                f"(the data of steps {s['skipped_steps'][0]}-{s['skipped_steps'][1]}); rollback {s['rollbacks']} "
                f"in {s['recovery_s']:.2f}s"
                + (f"; lr x{s['lr_factor']} for {s['lr_factor_steps']} steps" if s["lr_factor_steps"] else ""))
    if s["action"] == "stop":
        return f"{head}: stopping the run" + (f" ({s['reason']})" if s.get("reason") else "")
    return f"{head}: update skipped" + (f" ({s['reason']})" if s.get("reason") else "")
