"""Text classification on a pretrained SLAM trunk: the seed's use (``inference --input``).

- Model: ``SLAMForClassification`` is ``SLAMv1LM`` plus ``score``, a linear head on the trunk's
  output (after the final norm) at each text's **last token**. The trunk is causal, so the last
  token is the one position that has seen the whole text (the pooling GPT-style classifiers use);
  padding after it changes nothing. The LM head stays (tied to the embedding, or unused) so a
  pretraining checkpoint loads as is.
- Examples: ``[EOS] + encode(text)`` (the packer starts every document after an EOS), cut to
  ``max_len`` tokens, right-padded. The label travels in an LM-shaped targets tensor: -100
  everywhere but at the pooled position, which holds the class index; so the engines, the trainer
  and the checkpoints of pretraining carry fine-tuning unchanged.
- Data: JSONL lines of ``{text, label}`` (field names configurable); the classes are the sorted
  distinct labels of the training file, recorded in the config (``finetune.labels``) so every
  checkpoint knows them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slam_pretrain.errors import UserError
from slam_pretrain.model import ModelConfig, SLAMv1LM

IGNORE = -100


class SLAMForClassification(SLAMv1LM):
    """SLAMv1LM + a classification head on the last token's features."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__(config)
        self.score = nn.Linear(config.d_model, num_labels)
        self._init_score()

    def _init_score(self) -> None:
        nn.init.normal_(self.score.weight, mean=0.0, std=self.config.init_std)
        nn.init.zeros_(self.score.bias)

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "score"):  # SLAMv1LM.__init__ calls this before the head exists
            self._init_score()

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None):
        """tokens [B, N] -> class logits [B, C] at the last real token; with ``targets`` (see the
        module docstring) -> (logits, mean cross-entropy). Without targets the last real token is
        ``lengths - 1`` (default: the last position)."""
        h = self.features(tokens)  # [B, N, D]
        b, n = tokens.shape
        rows = torch.arange(b, device=tokens.device)
        if targets is not None:
            pos = (targets != IGNORE).int().argmax(dim=1)  # [B] the pooled position
            labels = targets[rows, pos]
        else:
            pos = (lengths - 1) if lengths is not None else torch.full((b,), n - 1, device=tokens.device)
        logits = self.score(h[rows, pos])  # [B, C]
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------------------------------------
# Data.

@dataclass
class Example:
    ids: list[int]
    label: int


def read_jsonl(path: str, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label as a string) per line; any problem is one UserError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"finetune data file {path!r} does not exist")
    rows = []
    with p.open(encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not a JSON object ({e.msg}); expected one "
                                    f'{{"{text_field}": ..., "{label_field}": ...}} per line') from None
                if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise UserError(f"{path}:{i}: needs the fields {text_field!r} and {label_field!r} "
                                    f"(finetune.text_field / finetune.label_field), found {keys}")
                text, label = obj[text_field], obj[label_field]
                if not isinstance(text, str) or not text:
                    raise UserError(f"{path}:{i}: {text_field!r} must be a non-empty string")
                if not isinstance(label, (str, int)) or isinstance(label, bool):
                    raise UserError(f"{path}:{i}: {label_field!r} must be a string or an integer, "
                                    f"got {label!r}")
                rows.append((text, str(label)))
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


def encode(tokenizer: Any, text: str, max_len: int) -> list[int]:
    return ([tokenizer.eos_id] + list(tokenizer.encode(text)))[:max_len]


def to_examples(rows: Sequence[tuple[str, str]], labels: Sequence[str], tokenizer: Any, max_len: int,
                source: str) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for text, label in rows:
        if label not in index:
            raise UserError(f"{source}: label {label!r} is not one of the classes {list(labels)}")
        out.append(Example(encode(tokenizer, text, max_len), index[label]))
    return out


def collate(examples: Sequence[Example], max_len: int) -> dict[str, torch.Tensor]:
    """{"input_ids": [B, max_len], "labels": [B, max_len]} with the class at the last real token."""
    ids = torch.zeros(len(examples), max_len, dtype=torch.long)
    targets = torch.full((len(examples), max_len), IGNORE, dtype=torch.long)
    for r, ex in enumerate(examples):
        ids[r, :len(ex.ids)] = torch.tensor(ex.ids)
        targets[r, len(ex.ids) - 1] = ex.label
    return {"input_ids": ids, "labels": targets}


class ExampleLoader:
    """Micro-batches of examples for one rank: each epoch a seeded permutation, every optimizer
    micro-step takes ``world * micro_batch`` consecutive examples and this rank its slice (the
    last incomplete group of an epoch is dropped). State: examples consumed, one number, the same
    on every rank and independent of the world size (as the pretraining loader's)."""

    def __init__(self, examples: list[Example], rank: int, world_size: int, micro_batch_size: int, seed: int,
                 max_len: int, shuffle: bool = True):
        self.examples, self.rank, self.world, self.mb = examples, rank, world_size, micro_batch_size
        self.seed, self.max_len, self.shuffle = seed, max_len, shuffle
        self.group = world_size * micro_batch_size
        self.per_epoch = len(examples) // self.group * self.group
        if self.per_epoch == 0:
            raise UserError(f"{len(examples)} examples are fewer than one step's world x micro_batch_size = "
                            f"{self.group}")
        self.consumed = 0
        self.wait_time_s = 0.0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, offset = divmod(self.consumed, self.per_epoch)
        order = self._order(epoch)
        for start in range(offset - offset % self.group, self.per_epoch, self.group):
            mine = order[start + self.rank * self.mb:start + (self.rank + 1) * self.mb]
            self.consumed = epoch * self.per_epoch + start + self.group
            yield collate([self.examples[i] for i in mine], self.max_len)

    def batches_once(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every example once in file order, this rank's share (for evaluation)."""
        mine = list(range(len(self.examples)))[self.rank::self.world]
        for i in range(0, len(mine), self.mb):
            yield collate([self.examples[j] for j in mine[i:i + self.mb]], self.max_len)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


# ---------------------------------------------------------------------------------------------
# Metrics.

def confusion(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[C, C] counts, rows gold, columns predicted."""
    return torch.bincount(gold * num_labels + pred, minlength=num_labels * num_labels).view(num_labels, num_labels)


def scores(conf: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over classes of 2PR/(P+R); a class never predicted nor
    present counts 0) from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    precision = tp / conf.sum(0).clamp(min=1)
    recall = tp / conf.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    total = conf.sum()
    return {"accuracy": float(tp.sum() / total) if total else math.nan, "macro_f1": float(f1.mean())}


def majority_baseline(gold: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent class."""
    counts = torch.bincount(torch.tensor(list(gold)))
    return float(counts.max()) / len(gold)
