"""``make demo``: prepare the stdlib dataset, train the tiny model, validate, checkpoint, generate.

Runs the same code paths a user runs: ``prepare``, ``train`` (DeepSpeed, one process), ``generate``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slam_pretrain.config import load_config

PROMPT = "def main("


def run_demo(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import prepare_from_config
    from slam_pretrain.downstream.generate import generate_cli
    from slam_pretrain.train_main import run_training

    t0 = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    print(f"== 1/3 prepare: {cfg.data.sources} -> {cfg.data.dataset_dir}", flush=True)
    prepare_from_config(cfg.data, vocab_size=cfg.model.vocab_size)
    print(f"== 2/3 train: {cfg.train.max_steps} steps with {cfg.engine.name} -> {cfg.run.out_dir}", flush=True)
    rc = run_training(cfg, resume="auto")
    if rc != 0:
        return rc
    print(f"== 3/3 generate from the trained model (prompt {PROMPT!r}, greedy)", flush=True)
    gen_args = argparse.Namespace(checkpoint=cfg.run.out_dir, input=PROMPT, max_new_tokens=48,
                                  temperature=0.0, top_k=0, top_p=1.0, seed=0, device="cpu")
    generate_cli(gen_args)
    from slam_pretrain.training.tracking import resolve_tracking_uri, ui_command

    out = Path(cfg.run.out_dir).resolve()
    store = resolve_tracking_uri(cfg.tracking.uri, out)
    print()
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"metrics:     {out / 'metrics.jsonl'}")
    print(f"export:      {out / 'export' / 'model.safetensors'}")
    print(f"MLflow:      {store}")
    print(f"  view it:   {ui_command(store)}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
