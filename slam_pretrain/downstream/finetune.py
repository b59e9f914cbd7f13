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

    def __init__(self, *, val_loader: Optional[ExampleLoader], num_labels: int, **kw: Any):
        super().__init__(val_batches=None, **kw)
        self.val_loader, self.num_labels = val_loader, num_labels  # no val_loader: no evaluation

    def evaluate(self) -> Optional[dict[str, Any]]:
        from slam_pretrain.distributed import all_gather_object

        if self.val_loader is None:
            return None
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
        return {"step": self.state.step, "max_steps": self.train.max_steps, "split": "val",
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
    from slam_pretrain.training.trainer import StopFlag

    stop_flag = StopFlag().install()  # first, as pretraining: a signal during start-up is not lost
    from slam_pretrain.downstream.export import load_model
    from slam_pretrain.training.run import TrainingRun

    ft, t = cfg.finetune, cfg.train
    if not ft.train_file:
        raise UserError("finetune.train_file is not set: a JSONL file with one {text, label} object per line")
    if cfg.engine.context_parallel > 1:  # classification reads every position of short examples
        raise UserError(f"engine.context_parallel={cfg.engine.context_parallel} is invalid for finetune: context "
                        "parallelism is for pretraining on long rows; set engine.context_parallel=1")
    if cfg.train.z_loss:  # the z-loss regularises the LM head's logits, which a classifier does not train
        raise UserError(f"train.z_loss={cfg.train.z_loss} is invalid for finetune: the z-loss applies to the "
                        f"language-model head's logits; set train.z_loss=0")
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

    run = TrainingRun.open(cfg, stop_flag)  # processes, grad accumulation, out_dir (writable), seed
    model = SLAMForClassification(cfg.model, len(ft.labels))
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    assert set(missing) == {"score.weight", "score.bias"} and not unexpected, (missing, unexpected)
    del lm
    engine = cfg.build_engine(model, run.dist)
    rank, world = run.dist.rank, run.dist.world_size
    loader = ExampleLoader(train_ex, rank, world, t.micro_batch_size, cfg.run.seed, ft.max_len)
    val_loader = ExampleLoader(val_ex, rank, world, t.micro_batch_size, cfg.run.seed, ft.max_len, shuffle=False) \
        if len(val_ex) >= world else None
    run.resume(resume, engine, loader, checksums={"tokenizer_sha256": meta["tokenizer_sha256"]},
               tokenizer_path=_tokenizer_file(meta))
    run.start_tracking({"task": "classification", "init": str(meta["source"])})
    base = majority_baseline([e.label for e in val_ex]) if val_ex else float("nan")
    callbacks = run.callbacks(ft.max_len, f"finetune: {len(ft.labels)} classes {ft.labels} | {len(train_ex)} train / "
                              f"{len(val_ex)} val examples (majority-class accuracy {base:.3f}) | init {meta['source']}")
    trainer = ClassifierTrainer(train=t, engine=engine, loader=loader, seq_len=ft.max_len, callbacks=callbacks,
                                state=run.state, stop_flag=stop_flag, val_loader=val_loader, num_labels=len(ft.labels))
    status = run.fit(trainer)
    return run.finish(status, f"{'done' if status == 'done' else 'stopped (' + status + ')'}: {run.state.step} steps; "
                              f"checkpoint {run.newest}")


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
