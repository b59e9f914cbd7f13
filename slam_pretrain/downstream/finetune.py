"""``slam-pretrain finetune`` and ``slam-pretrain classify``: text classification on a pretrained
trunk, through the machinery of pretraining (engines, trainer, checkpoints with exact resume,
metrics.jsonl, MLflow). The model, data and metrics are in classify.py.

A fine-tuning run's ``model`` section comes from ``--init`` (the pretrained checkpoint or export),
not from the YAML; its checkpoints hold the classes (``finetune.labels``) and the tokenizer, so
``classify`` needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from slam_pretrain.config import Config
from slam_pretrain.downstream.classify import (ExampleLoader, SLAMForClassification, collate, confusion, encode,
                                               majority_baseline, read_jsonl, scores, to_examples)
from slam_pretrain.errors import UserError
from slam_pretrain.training.trainer import Trainer


class ClassifierTrainer(Trainer):
    """The pretraining loop; evaluation reports loss, accuracy and macro-F1 on the validation set."""

    def __init__(self, *args: Any, val_loader: ExampleLoader, num_labels: int, **kw: Any):
        super().__init__(*args, val_batches=None, **kw)
        self.val_loader, self.num_labels = val_loader, num_labels

    def evaluate(self) -> Optional[dict[str, Any]]:
        from slam_pretrain.distributed import all_gather_object

        model = self.engine.model
        self.engine.eval()
        conf = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long)
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            for batch in self.val_loader.batches_once():
                ids, targets = self._to_device(batch)
                logits, _ = model(ids, targets)
                gold = targets[torch.arange(len(ids), device=ids.device), (targets != -100).int().argmax(1)]
                loss_sum += float(F.cross_entropy(logits.float(), gold, reduction="sum"))
                n += len(ids)
                conf += confusion(logits.argmax(-1).cpu(), gold.cpu(), self.num_labels)
        self.engine.train()
        parts = all_gather_object((conf, loss_sum, n))
        conf = sum(p[0] for p in parts)
        total = sum(p[2] for p in parts)
        if total == 0:
            return None
        s = scores(conf)
        return {"step": self.state.step, "max_steps": self.max_steps, "split": "val",
                "val_loss": sum(p[1] for p in parts) / total, "val_acc": s["accuracy"], "val_macro_f1": s["macro_f1"]}


def _tokenizer_file(meta: dict[str, Any]) -> Path:
    from slam_pretrain.downstream.export import export_paths

    src = Path(meta["source"])
    return export_paths(src)[2] if meta["kind"] == "export" else src / "tokenizer.model"


def _split(rows: list, cfg: Config) -> tuple[list, list]:
    """Train and validation rows: finetune.val_file, or a seeded val_fraction of train_file."""
    ft = cfg.finetune
    if ft.val_file:
        return rows, read_jsonl(ft.val_file, ft.text_field, ft.label_field)
    g = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_val = max(1, round(ft.val_fraction * len(rows)))
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def run_finetune(cfg: Config, init: str, resume: str = "auto") -> int:
    """Fine-tune the trunk of ``init`` with a classification head; returns an exit code."""
    from slam_pretrain.training.callbacks import CheckpointCallback, LogCallback, TrackingCallback
    from slam_pretrain.training.checkpoint import CheckpointManager, capture_rng
    from slam_pretrain.distributed import destroy, init_distributed
    from slam_pretrain.engine import build_engine, grad_accum_steps
    from slam_pretrain.downstream.export import load_model
    from slam_pretrain.training.metrics import ConsoleSink, JsonlSink, memory_gb, peak_flops
    from slam_pretrain.model import flops_per_token
    from slam_pretrain.engine.optim import lr_at
    from slam_pretrain.training.tracking import make_tracker, run_params, run_tags
    from slam_pretrain.training.run import EXIT_OK, EXIT_SIGNAL, resume_state, seed_all
    from slam_pretrain.training.trainer import StopFlag

    stop_flag = StopFlag().install()
    ft = cfg.finetune
    if not ft.train_file:
        raise UserError("finetune.train_file is not set: a JSONL file with one {text, label} object per line")
    lm, tokenizer, meta = load_model(init)
    cfg.model = lm.config  # the trunk decides the model section
    if ft.max_len > cfg.model.max_seq_len:
        raise UserError(f"finetune.max_len={ft.max_len} is invalid: must be <= the trunk's "
                        f"model.max_seq_len={cfg.model.max_seq_len}")
    train_rows, val_rows = _split(read_jsonl(ft.train_file, ft.text_field, ft.label_field), cfg)
    if not ft.labels:
        ft.labels = sorted({label for _, label in train_rows})
    if len(ft.labels) < 2:
        raise UserError(f"{ft.train_file}: needs at least 2 classes, found {ft.labels}")
    train_ex = to_examples(train_rows, ft.labels, tokenizer, ft.max_len, ft.train_file)
    val_ex = to_examples(val_rows, ft.labels, tokenizer, ft.max_len, ft.val_file or ft.train_file)

    dist_info = init_distributed(cfg.engine.device)
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    out_dir = Path(cfg.run.out_dir)
    t = cfg.train
    grad_accum = grad_accum_steps(t, world)
    ckpt = CheckpointManager(out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, dist_info,
                             verify=cfg.checkpoint.verify)
    seed_all(cfg.run.seed)
    model = SLAMForClassification(cfg.model, len(ft.labels))
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    assert set(missing) == {"score.weight", "score.bias"} and not unexpected, (missing, unexpected)
    del lm
    engine = build_engine(cfg, model, dist_info)
    loader = ExampleLoader(train_ex, rank, world, t.micro_batch_size, cfg.run.seed, ft.max_len)
    val_loader = ExampleLoader(val_ex, rank, world, t.micro_batch_size, cfg.run.seed, ft.max_len, shuffle=False) \
        if len(val_ex) >= world else None
    tokenizer_path = _tokenizer_file(meta)
    checksums = {"tokenizer_sha256": meta["tokenizer_sha256"]}

    state, resume_path = resume_state(ckpt, resume, engine, loader, cfg, checksums, main)

    tracker = make_tracker(cfg, is_main=main, out_dir=out_dir)
    if main:
        state.tracking_run_id = tracker.start(run_id=state.tracking_run_id, params=run_params(cfg),
                                              tags={**run_tags(cfg, world), "task": "classification",
                                                    "init": str(meta["source"])}) or state.tracking_run_id
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        tracker.log_artifact(out_dir / "config.yaml")

    saved: list[Path] = []  # what this run wrote: the done line names it

    def save(step: int) -> None:
        trainer.state.tracking_run_id = tracker.run_id or trainer.state.tracking_run_id
        saved[:] = [ckpt.save(step, engine, rank_state={"rng": capture_rng(), "loader": loader.state_dict()},
                              trainer_state=trainer.state.to_dict(), config_yaml=cfg.to_yaml(),
                              checksums=checksums, tokenizer_path=tokenizer_path)]

    callbacks: list = []
    if main:
        console = ConsoleSink(t.max_steps, state.step)
        jsonl = JsonlSink(out_dir / "metrics.jsonl", resume_step=state.step if resume_path else None)
        callbacks += [LogCallback(console, jsonl), TrackingCallback(tracker)]
        base = majority_baseline([e.label for e in val_ex]) if val_ex else float("nan")
        console.message(f"finetune: {len(ft.labels)} classes {ft.labels} | {len(train_ex)} train / {len(val_ex)} "
                        f"val examples (majority-class accuracy {base:.3f}) | init {meta['source']}")
    callbacks.append(CheckpointCallback(cfg.checkpoint.interval, save, flush_fn=tracker.flush))
    peak, peak_src = peak_flops(dist_info.device, cfg.engine.precision, t.peak_flops)
    trainer = ClassifierTrainer(
        engine=engine, loader=loader, lr_at=lambda step: lr_at(step, t), max_steps=t.max_steps,
        grad_accum=grad_accum, tokens_per_step=t.global_batch_size * ft.max_len,
        flops_per_token=flops_per_token(cfg.model, ft.max_len), peak_flops=peak, world_size=world,
        device=dist_info.device, log_interval=t.log_interval, eval_interval=t.eval_interval,
        max_bad_steps=t.max_bad_steps, callbacks=callbacks, state=state,
        memory_fn=lambda: memory_gb(dist_info.device), stop_flag=stop_flag,
        peak_measured=peak_src.startswith("measured"),
        val_loader=val_loader, num_labels=len(ft.labels))
    if val_loader is None:
        trainer.evaluate = lambda: None  # type: ignore[method-assign]
    status = trainer.fit()
    if main:
        tracker.finish("FINISHED" if status == "done" else "KILLED" if status == "signal" else "FAILED")
        print(f"{'done' if status == 'done' else 'stopped (' + status + ')'}: {trainer.state.step} steps; "
              f"checkpoint {saved[0] if saved else ckpt.find_latest()}", flush=True)
    destroy()
    return EXIT_SIGNAL if status == "signal" else EXIT_OK if status == "done" else 3


# ---------------------------------------------------------------------------------------------
# classify

def load_classifier(path: str) -> tuple[SLAMForClassification, Any, list[str], dict[str, Any]]:
    """(model in eval mode, tokenizer, class names, info) from a fine-tuning checkpoint or run dir."""
    from data_pipeline.tokenizer import Tokenizer
    from slam_pretrain.downstream.export import read_checkpoint

    ckpt = read_checkpoint(path)
    step_dir, finetune = ckpt.step_dir, ckpt.config.get("finetune") or {}
    labels = finetune.get("labels") or []
    if not labels:  # before the slow weights: a language model's checkpoint is refused at once
        raise UserError(f"{step_dir} is not a fine-tuned classifier (its config has no finetune.labels): "
                        f"use `slam-pretrain generate` for a language model")
    mcfg = ckpt.model_config()
    model = SLAMForClassification(mcfg, len(labels))
    missing, unexpected = model.load_state_dict(ckpt.state_dict(), strict=False)
    allowed = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise UserError(f"{step_dir}: weights do not fit the classifier (missing {sorted(set(missing) - allowed)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval(), Tokenizer(ckpt.tokenizer), list(labels), {"source": str(step_dir), "step": ckpt.step,
                                                                 "max_len": finetune.get("max_len")}


@torch.no_grad()
def classify_texts(model: SLAMForClassification, tokenizer: Any, texts: list[str], max_len: int) -> torch.Tensor:
    """Class probabilities [len(texts), C]."""
    ids = [encode(tokenizer, t, max_len) for t in texts]
    batch = collate([_Ex(i) for i in ids], max(len(i) for i in ids))
    lengths = torch.tensor([len(i) for i in ids])
    return torch.softmax(model(batch["input_ids"], lengths=lengths).float(), dim=-1)


@dataclasses.dataclass
class _Ex:
    ids: list[int]
    label: int = 0


def classify_cli(args: argparse.Namespace) -> int:
    """``slam-pretrain classify``: the label of ``--input`` and every class's probability."""
    model, tokenizer, labels, info = load_classifier(args.checkpoint)
    max_len = info["max_len"] or model.config.max_seq_len
    probs = classify_texts(model, tokenizer, [args.input], min(max_len, model.config.max_seq_len))[0]
    print(f"[classify] {info['source']} (step {info['step']})", file=sys.stderr, flush=True)
    print(labels[int(probs.argmax())])
    for name, p in sorted(zip(labels, probs.tolist()), key=lambda x: -x[1]):
        print(f"  {name}\t{p:.4f}")
    return 0
