"""What every training run (pretraining and fine-tuning) shares: exit codes, seeding, resuming
the engine, the loader and the RNG states from a checkpoint, and ``TrainingRun``, the wiring
around the trainer (processes, checkpoints, tracking, the standard callbacks, the final status)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from slam_pretrain.distributed import destroy, init_distributed
from slam_pretrain.engine import grad_accum_steps
from slam_pretrain.engine.context_parallel import data_parallel
from slam_pretrain.errors import UserError
from slam_pretrain.model import flops_per_token
from slam_pretrain.training.callbacks import CheckpointCallback, LogCallback, ThroughputCallback, TrackingCallback
from slam_pretrain.training.checkpoint import CheckpointManager
from slam_pretrain.training.metrics import ConsoleSink, JsonlSink
from slam_pretrain.training.rng import capture_rng, rank_stream_seed, restore_rng, seed_generators
from slam_pretrain.training.tracking import run_params, run_tags
from slam_pretrain.training.trainer import Callback, StopFlag, Trainer, TrainerState

if TYPE_CHECKING:
    from slam_pretrain.config import Config
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.training.tracking import Tracker

EXIT_OK = 0
EXIT_BAD_STEPS = 3
EXIT_LOSS_SPIKE = 4  # the spike monitor stopped the run (stability.policy=stop, or too many rollbacks)
EXIT_SIGNAL = 143  # what a shell reports for SIGTERM; the sbatch scripts requeue on it


def seed_all(seed: int, rank: Optional[int] = None) -> None:
    """Seed python, numpy and torch: with ``seed`` itself (``rank=None``), or with this rank's own
    stream, ``rank_stream_seed(seed, rank)``.

    Two calls, in this order: ``seed_all(seed)`` before the model is built, so every rank draws the
    same initial weights (FSDP shards them as built; DeepSpeed assumes every rank starts alike);
    then ``seed_all(seed, rank)`` once the engine is built, so each rank draws its own dropout
    masks: with one shared stream every rank would drop the same units in the same step, and
    data parallelism would average gradients of one mask instead of ``world`` of them. Each
    rank's stream is saved in its rank file and restored on resume; after a world-size change
    every rank starts ``rank_stream_seed(seed, rank, step)`` (``CheckpointManager.load``).
    """
    seed_generators(seed if rank is None else rank_stream_seed(seed, rank))


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


# Final status -> exit code, and -> MLflow run status.
EXIT_CODES = {"done": EXIT_OK, "signal": EXIT_SIGNAL, "bad_steps": EXIT_BAD_STEPS, "loss_spike": EXIT_LOSS_SPIKE}
_RUN_STATUS = {"done": "FINISHED", "signal": "KILLED", "bad_steps": "FAILED", "loss_spike": "FAILED"}


class TrainingRun:
    """One training run's wiring around the trainer, shared by ``slam-pretrain train`` and
    ``finetune``; the caller builds what differs (model, engine, loaders, messages). In order:

        run = TrainingRun.open(cfg, stop_flag)   # processes, grad accumulation, out_dir, seed
        engine = cfg.build_engine(model, run.dist)
        run.resume(resume, engine, loader, checksums, tokenizer_path)   # state; "resumed from step N"
        run.start_tracking(extra_tags, artifacts)                          # MLflow run, config.yaml
        callbacks = run.callbacks(seq_len, message)   # console, metrics.jsonl, MLflow, speed, checkpoints
        status = run.fit(Trainer(train=cfg.train, ..., callbacks=callbacks, state=run.state,
                                 stop_flag=run.stop_flag))
        return run.finish(status, final_line)

    The order is what exact resume needs: the model is built after ``open`` seeded every rank
    alike (identical weights), the engine loads the checkpoint, and the loader and RNG states are
    restored last. ``save(step)`` needs no trainer: the trainer updates ``run.state`` in place.
    """

    def __init__(self, cfg: "Config", stop_flag: StopFlag, dist: "DistInfo", ckpt: CheckpointManager,
                 data_parallel: tuple[int, int], grad_accum: int):
        self.cfg, self.stop_flag, self.dist, self.ckpt, self.grad_accum = cfg, stop_flag, dist, ckpt, grad_accum
        # This rank's (rank, world) among data-parallel ranks: the ranks of one context-parallel
        # group read the same rows (engine.context_parallel; = (rank, world) without it).
        self.data_rank, self.data_world = data_parallel
        self.main: bool = dist.is_main
        self.out_dir = Path(cfg.run.out_dir)
        self.state = TrainerState()
        self.resume_path: Optional[Path] = None
        self.saved: Optional[Path] = None  # the newest checkpoint this run wrote
        self.tracker: Optional["Tracker"] = None  # start_tracking
        self.speed: Optional[ThroughputCallback] = None  # callbacks
        self._engine: Any = None
        self._loader: Any = None
        self._checksums: dict[str, Any] = {}
        self._tokenizer_path: Optional[Path] = None

    @classmethod
    def open(cls, cfg: "Config", stop_flag: StopFlag) -> "TrainingRun":
        """Join the process group, check the batch arithmetic and out_dir (one line each if wrong)
        before the model is built, and seed every rank with ``run.seed``."""
        dist = init_distributed(cfg.engine.device)
        data = data_parallel(dist.rank, dist.world_size, cfg.engine.context_parallel)
        grad_accum = grad_accum_steps(cfg.train, data[1])  # the engine computes the same
        ckpt = cfg.checkpoint.build(Path(cfg.run.out_dir), dist)  # creates out_dir, checks it is writable
        seed_all(cfg.run.seed)
        return cls(cfg, stop_flag, dist, ckpt, data, grad_accum)

    def resume(self, resume: str, engine: Any, loader: Any, checksums: dict[str, Any],
               tokenizer_path: Optional[Path]) -> None:
        """Record what this run trains and saves (checkpoints hold ``checksums`` and a copy of the
        tokenizer), and take the state from ``--resume auto|never|PATH``."""
        self._engine, self._loader = engine, loader
        self._checksums, self._tokenizer_path = checksums, tokenizer_path
        # The model was built from the common seed (identical weights); from here each rank draws
        # from its own stream (dropout), which resume_state restores from the checkpoint.
        seed_all(self.cfg.run.seed, rank=self.dist.rank)
        self.state, self.resume_path = resume_state(self.ckpt, resume, engine, loader, self.cfg, checksums,
                                                    self.main)

    def start_tracking(self, extra_tags: Optional[dict[str, Any]] = None, artifacts: Sequence[Path] = ()) -> None:
        """Open (or continue) the MLflow run on rank 0; log out_dir/config.yaml and ``artifacts``."""
        cfg = self.cfg
        self.tracker = cfg.build_tracker(self.main)
        if not self.main:
            return
        branch = self.ckpt.branch_event  # this start began a new checkpoint branch: say where
        tags = dict(extra_tags or {})
        if branch is not None:
            b = branch["branch"]
            tags.update({"branch": b, f"branch/{b}/start_step": branch["step"],
                         f"branch/{b}/from": branch["from"] or "step 0"})
        self.state.tracking_run_id = self.tracker.start(
            run_id=self.state.tracking_run_id, params=run_params(cfg),
            tags=run_tags(cfg, self.dist.world_size, tags)) or self.state.tracking_run_id
        if branch is not None:
            self.tracker.log_metrics({"train/branch": float(branch["branch"])}, step=branch["step"])
        config_file = self.out_dir / "config.yaml"
        config_file.write_text(cfg.to_yaml())
        for path in (config_file, *artifacts):
            self.tracker.log_artifact(path)

    def save(self, step: int) -> None:
        """The collective checkpoint at ``step`` (every rank calls it at the same step)."""
        # The run may have been created in the background (server down at start): record its id.
        self.state.tracking_run_id = self.tracker.run_id or self.state.tracking_run_id
        self.saved = self.ckpt.save(step, self._engine,
                                    rank_state={"rng": capture_rng(), "loader": self._loader.state_dict()},
                                    trainer_state=self.state.to_dict(), config_yaml=self.cfg.to_yaml(),
                                    checksums=self._checksums, tokenizer_path=self._tokenizer_path,
                                    blocking=not self.cfg.checkpoint.async_save)

    def callbacks(self, seq_len: int, message: str) -> list[Callback]:
        """Rank 0: console (``message`` first) + metrics.jsonl and MLflow; every rank: throughput/MFU
        (the peak measured now, as ``self.speed``), checkpoints every ``checkpoint.interval``, and the
        loss-spike monitor when ``stability.enabled``."""
        cfg = self.cfg
        out: list[Callback] = []
        if self.main:
            console = ConsoleSink(cfg.train.max_steps, self.state.step)
            jsonl = JsonlSink(self.out_dir / "metrics.jsonl",
                              resume_step=self.state.step if self.resume_path else None)
            if self.ckpt.branch_event is not None:
                jsonl.write_event(self.ckpt.branch_event)
            out += [LogCallback(console, jsonl), TrackingCallback(self.tracker)]
            console.message(message)
        self.speed = ThroughputCallback.measure(flops_per_token(cfg.model, seq_len), self.dist.world_size,
                                                self.dist.device, cfg.engine.precision, cfg.train.peak_flops)
        out += [self.speed, CheckpointCallback(cfg.checkpoint.interval, self.save, flush_fn=self.tracker.flush)]
        if cfg.stability.enabled:  # after CheckpointCallback: a rollback follows that step's (skipped) save
            from slam_pretrain.training.stability import SpikeMonitor

            out.append(SpikeMonitor(cfg.stability, ckpt=self.ckpt, engine=self._engine, config=cfg,
                                    checksums=self._checksums, loader=self._loader, tracker=self.tracker,
                                    is_main=self.main))
        return out

    def fit(self, trainer: Trainer) -> str:
        """``trainer.fit()``; a UserError (e.g. a checkpoint that could not be written: disk full)
        still ends the MLflow run, as FAILED, before it becomes the one-line error."""
        try:
            status = trainer.fit()
            self.ckpt.wait()  # the last (background) checkpoint is published before export and exit
            return status
        except UserError:
            if self.main:
                self.tracker.finish("FAILED")
            raise

    @property
    def newest(self) -> Optional[Path]:
        """The checkpoint a run that continues would start from: this run's newest, else the one it
        resumed from."""
        return self.saved or self.resume_path

    def finish(self, status: str, line: str, stderr: bool = False) -> int:
        """End the MLflow run, print ``line`` on rank 0, leave the process group; the exit code."""
        if self.main:
            self.tracker.finish(_RUN_STATUS[status])
            print(line, file=sys.stderr if stderr else sys.stdout, flush=True)
        destroy()
        return EXIT_CODES[status]
