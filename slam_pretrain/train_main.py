"""``slam-pretrain train``: wire config -> distributed -> model -> engine -> loader -> trainer.

Order matters for exact resume: the model is built from ``run.seed`` on every rank (identical
weights), the engine loads the checkpoint, then the loader state and the RNG states are restored
last, so the first resumed step sees the same batch and the same random stream as the
uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from slam_pretrain.config import Config
from slam_pretrain.errors import ConfigError, UserError
from slam_pretrain.model import count_params

if TYPE_CHECKING:
    from slam_pretrain.training.run import TrainingRun


def _manifest_location(cfg: Config) -> str:
    d = cfg.data.dataset_dir
    if d.startswith(("http://", "https://")):
        return d.rstrip("/") + "/manifest.json"
    path = Path(d) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no dataset at data.dataset_dir={d!r} ({path} missing): run "
                        f"`slam-pretrain prepare --config <the same config>` first")
    return str(path)


def _export_final(latest: Optional[Path], out_dir: Path, tracker: Any) -> None:
    """Consolidated safetensors of the final checkpoint (the one this run just wrote), logged as
    the run's model artifact."""
    from slam_pretrain.downstream.export import export_checkpoint

    if latest is None:
        return
    out = export_checkpoint(latest, out_dir / "export" / "model.safetensors")
    for f in sorted(out.parent.iterdir()):
        tracker.log_artifact(f, artifact_path="export")
    print(f"exported {out}", flush=True)


def _loaders(cfg: Config, manifest: Any, run: "TrainingRun") -> tuple[Any, Any, Optional[Callable[[], Iterator[Any]]]]:
    """This rank's training and validation loaders, and the validation batches (None when
    train.eval_batches is 0)."""
    from data_pipeline.loader import build_loader, loader_kwargs

    t, kwargs = cfg.train, loader_kwargs(cfg.data, run.dist.device)  # pinned batches for a CUDA device
    # Split over data-parallel ranks: the ranks of a context-parallel group read the same rows.
    common = dict(rank=run.data_rank, world_size=run.data_world, micro_batch_size=t.micro_batch_size,
                  seed=cfg.run.seed)
    loader = build_loader(manifest, split="train", **common, **kwargs)
    val_loader = build_loader(manifest, split="val", **common, **{**kwargs, "num_workers": 0})
    val_start = val_loader.state_dict()

    def val_batches() -> Iterator[Any]:
        # The same first eval_batches validation batches every time.
        val_loader.load_state_dict(val_start)
        for i, batch in enumerate(val_loader):
            if i >= t.eval_batches:
                break
            yield batch

    return loader, val_loader, val_batches if t.eval_batches else None


def _model_line(cfg: Config, run: "TrainingRun") -> str:
    e = cfg.engine
    context = f" (data {run.data_world} x context {e.context_parallel})" if e.context_parallel > 1 else ""
    return (f"model: {count_params(cfg.model) / 1e6:.2f}M parameters | engine: {e.name}"
            f"{' zero-' + str(e.zero_stage) if e.name == 'deepspeed' else ''} {e.precision} | "
            f"world {run.dist.world_size}{context} | grad_accum {run.grad_accum} | device {run.dist.device}")


def _final_line(cfg: Config, run: "TrainingRun", status: str) -> str:
    step = run.state.step
    if status == "bad_steps":
        return (f"stopped: {cfg.train.max_bad_steps} consecutive non-finite steps at step {step}; "
                f"the last good checkpoint is {run.newest}")
    if status == "signal":
        return f"stopped by signal at step {step}; checkpoint {run.newest}"
    if status == "loss_spike":  # the monitor printed the spike line (stability.policy / max_rollbacks)
        return f"stopped: loss spike at step {step}; the last good checkpoint is {run.newest}"
    return (f"done: {step} steps, {run.state.tokens:,} tokens; checkpoint {run.newest}; "
            f"metrics {run.out_dir / 'metrics.jsonl'}")


def run_training(cfg: Config, resume: str = "auto") -> int:
    from slam_pretrain.training.trainer import StopFlag

    # First thing: a preemption signal that lands during the slow start-up is remembered, and the
    # run stops (with a checkpoint) after its first step instead of dying.
    stop_flag = StopFlag().install()
    from data_pipeline.manifest import check_compatible, load_manifest
    from data_pipeline.storage import sha256_of
    from slam_pretrain.model import SLAMv1LM
    from slam_pretrain.training.run import TrainingRun
    from slam_pretrain.training.trainer import Trainer

    manifest_loc = _manifest_location(cfg)
    manifest = load_manifest(manifest_loc)
    check_compatible(manifest, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
    eos = manifest.tokenizer.get("eos_id")
    if cfg.model.doc_masking and eos is not None and int(eos) != cfg.model.eos_id:
        # Documents are told apart by the EOS token: masking on another id would silently mix them.
        raise ConfigError(f"model.eos_id={cfg.model.eos_id} is invalid: the dataset's tokenizer ends documents "
                          f"with {eos}; set model.eos_id={eos}")
    run = TrainingRun.open(cfg, stop_flag)  # processes, grad accumulation, out_dir (writable), seed
    # A factory: the engine builds the model on the meta device (FSDP2) or inside zero.Init
    # (ZeRO-3) and initialises its own shard from run.seed, so no rank holds the whole model.
    engine = cfg.build_engine(lambda: SLAMv1LM(cfg.model), run.dist)
    loader, val_loader, val_batches = _loaders(cfg, manifest, run)
    tokenizer_path = manifest.tokenizer_path() if run.main else None
    run.resume(resume, engine, loader, tokenizer_path=tokenizer_path,
               checksums={"tokenizer_sha256": manifest.tokenizer_sha256, "manifest_sha256": sha256_of(manifest_loc)})
    run.start_tracking(artifacts=[tokenizer_path] if tokenizer_path is not None else [])
    callbacks = run.callbacks(cfg.data.seq_len, _model_line(cfg, run))
    if cfg.train.seq_len_schedule:  # staged context extension: both loaders cut rows to the phase's length
        from slam_pretrain.training.callbacks import ContextScheduleCallback

        callbacks.append(ContextScheduleCallback(cfg.train.phases(), cfg.model, [loader, val_loader], cfg.data.seq_len))
    if cfg.train.z_loss:  # the model adds the z-loss to its training gradient; records get z_loss
        from slam_pretrain.training.callbacks import ZLossCallback

        callbacks.append(ZLossCallback(engine.model, cfg.train.z_loss))
    if run.main:
        print(run.speed.peak_line(), flush=True)
    trainer = Trainer(train=cfg.train, engine=engine, loader=loader, seq_len=cfg.data.seq_len, callbacks=callbacks,
                      val_batches=val_batches, state=run.state, stop_flag=stop_flag)
    status = run.fit(trainer)
    if run.main and status == "done":
        _export_final(run.newest, run.out_dir, run.tracker)
    return run.finish(status, _final_line(cfg, run, status), stderr=status in ("bad_steps", "loss_spike"))
