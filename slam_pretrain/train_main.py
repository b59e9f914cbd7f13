"""``slam-pretrain train``: wire config -> distributed -> model -> engine -> loader -> trainer.

Order matters for exact resume: the model is built from ``run.seed`` on every rank (identical
weights), the engine loads the checkpoint, then the loader state and the RNG states are restored
last, so the first resumed step sees the same batch and the same random stream as the
uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional


from slam_pretrain.config import Config
from slam_pretrain.errors import UserError
from slam_pretrain.training.run import EXIT_BAD_STEPS, EXIT_OK, EXIT_SIGNAL, resume_state, seed_all

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


def run_training(cfg: Config, resume: str = "auto") -> int:
    from slam_pretrain.training.trainer import StopFlag

    # First thing: a preemption signal that lands during the slow start-up is remembered, and the
    # run stops (with a checkpoint) after its first step instead of dying.
    stop_flag = StopFlag().install()
    from data_pipeline.loader import build_loader, loader_kwargs
    from data_pipeline.manifest import check_compatible, load_manifest
    from data_pipeline.storage import sha256_of
    from slam_pretrain.training.callbacks import CheckpointCallback, LogCallback, TrackingCallback
    from slam_pretrain.training.checkpoint import CheckpointManager, capture_rng
    from slam_pretrain.distributed import destroy, init_distributed
    from slam_pretrain.engine import build_engine, grad_accum_steps
    from slam_pretrain.training.metrics import ConsoleSink, JsonlSink, memory_gb, peak_flops
    from slam_pretrain.model import SLAMv1LM, count_params, flops_per_token
    from slam_pretrain.engine.optim import lr_at
    from slam_pretrain.training.tracking import make_tracker, run_params, run_tags
    from slam_pretrain.training.trainer import Trainer

    manifest_loc = _manifest_location(cfg)
    manifest = load_manifest(manifest_loc)
    check_compatible(manifest, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)

    dist_info = init_distributed(cfg.engine.device)
    rank, world = dist_info.rank, dist_info.world_size
    main = dist_info.is_main
    out_dir = Path(cfg.run.out_dir)
    t = cfg.train
    grad_accum = grad_accum_steps(t, world)  # checked before the model is built; the engine agrees
    # Creates out_dir and checks it is writable (one line if not) before anything is built.
    ckpt = CheckpointManager(out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, dist_info,
                             verify=cfg.checkpoint.verify)

    seed_all(cfg.run.seed)
    model = SLAMv1LM(cfg.model)
    engine = build_engine(cfg, model, dist_info)

    kwargs = loader_kwargs(cfg.data)
    loader = build_loader(manifest, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size,
                          seed=cfg.run.seed, split="train", **kwargs)
    val_loader = build_loader(manifest, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size,
                              seed=cfg.run.seed, split="val", **{**kwargs, "num_workers": 0})
    val_start = val_loader.state_dict()

    def val_batches():
        # The same first eval_batches validation batches every time.
        val_loader.load_state_dict(val_start)
        for i, batch in enumerate(val_loader):
            if i >= t.eval_batches:
                break
            yield batch

    tokenizer_path = manifest.tokenizer_path() if main else None
    checksums = {"tokenizer_sha256": manifest.tokenizer_sha256,
                 "manifest_sha256": sha256_of(manifest_loc)}
    state, resume_path = resume_state(ckpt, resume, engine, loader, cfg, checksums, main)

    tracker = make_tracker(cfg, is_main=main, out_dir=out_dir)
    if main:
        state.tracking_run_id = tracker.start(run_id=state.tracking_run_id, params=run_params(cfg),
                                              tags=run_tags(cfg, world)) or state.tracking_run_id
        config_file = out_dir / "config.yaml"
        config_file.write_text(cfg.to_yaml())
        tracker.log_artifact(config_file)
        if tokenizer_path is not None:
            tracker.log_artifact(tokenizer_path)

    saved: list[Path] = []  # what this run wrote: the final export and the done line name it

    def save(step: int) -> None:
        # The run may have been created in the background (server down at start): record its id.
        trainer.state.tracking_run_id = tracker.run_id or trainer.state.tracking_run_id
        saved[:] = [ckpt.save(step, engine,
                              rank_state={"rng": capture_rng(), "loader": loader.state_dict()},
                              trainer_state=trainer.state.to_dict(), config_yaml=cfg.to_yaml(),
                              checksums=checksums, tokenizer_path=tokenizer_path)]

    callbacks: list = []
    if main:
        console = ConsoleSink(t.max_steps, state.step)
        jsonl = JsonlSink(out_dir / "metrics.jsonl", resume_step=state.step if resume_path else None)
        callbacks += [LogCallback(console, jsonl), TrackingCallback(tracker)]
        n_params = count_params(cfg.model)
        console.message(f"model: {n_params / 1e6:.2f}M parameters | engine: {cfg.engine.name}"
                        f"{' zero-' + str(cfg.engine.zero_stage) if cfg.engine.name == 'deepspeed' else ''} "
                        f"{cfg.engine.precision} | world {world} | grad_accum {grad_accum} | "
                        f"device {dist_info.device}")
    callbacks.append(CheckpointCallback(cfg.checkpoint.interval, save, flush_fn=tracker.flush))

    peak, peak_src = peak_flops(dist_info.device, cfg.engine.precision, t.peak_flops)
    trainer = Trainer(
        engine=engine, loader=loader, val_batches=val_batches if t.eval_batches else None,
        lr_at=lambda step: lr_at(step, t), max_steps=t.max_steps, grad_accum=grad_accum,
        tokens_per_step=t.global_batch_size * cfg.data.seq_len,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len), peak_flops=peak,
        world_size=world, device=dist_info.device, log_interval=t.log_interval,
        eval_interval=t.eval_interval, max_bad_steps=t.max_bad_steps, callbacks=callbacks, state=state,
        memory_fn=lambda: memory_gb(dist_info.device), stop_flag=stop_flag,
        peak_measured=peak_src.startswith("measured"))
    if main:
        print(f"MFU peak: {peak / 1e12:.2f} TFLOP/s per device ({peak_src})", flush=True)
    try:
        status = trainer.fit()
    except UserError:  # e.g. a checkpoint that could not be written (disk full): one line, run FAILED
        if main:
            tracker.finish("FAILED")
        raise

    def newest() -> Optional[Path]:
        return saved[-1] if saved else resume_path

    if main:
        if status == "done":
            _export_final(newest(), out_dir, tracker)
        tracker.finish("FINISHED" if status == "done" else "KILLED" if status == "signal" else "FAILED")
    if status == "bad_steps":
        if main:
            print(f"stopped: {t.max_bad_steps} consecutive non-finite steps at step {trainer.state.step}; "
                  f"the last good checkpoint is {newest()}", file=sys.stderr, flush=True)
        destroy()
        return EXIT_BAD_STEPS
    if main:
        latest = newest()
        if status == "signal":
            print(f"stopped by signal at step {trainer.state.step}; checkpoint {latest}", flush=True)
        else:
            print(f"done: {trainer.state.step} steps, {trainer.state.tokens:,} tokens; "
                  f"checkpoint {latest}; metrics {out_dir / 'metrics.jsonl'}", flush=True)
    destroy()
    return EXIT_SIGNAL if status == "signal" else EXIT_OK
