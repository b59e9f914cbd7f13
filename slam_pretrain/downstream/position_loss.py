"""Loss by position for ``slam-pretrain eval-long``: does the loss keep falling along the context?

Validation rows of a prepared dataset, read with the real loader (``split="val"``, the run's seed:
the rows training validated on, each once), cut to ``seq_len`` tokens. Every target token's
cross-entropy is added to its position's sum; positions are then grouped into buckets (``pow2``:
0, 1, 2-3, 4-7, ...; ``width:W``; or explicit starts ``0,64,512``) and each bucket reports its mean
loss over the tokens in it (padding, labelled -100, is not counted). torch and the loader are
imported where used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from slam_pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

LOGITS_CHUNK = 1024  # positions per LM-head call: logits stay [B, 1024, V], not [B, N, V]


# ---------------------------------------------------------------------------------------------
# Position buckets.

def check_buckets(spec: str) -> None:
    """UserError naming ``--buckets`` unless ``spec`` is pow2, width:W or increasing starts from 0."""
    bucket_starts(spec, 1)


def bucket_starts(spec: str, n: int) -> list[int]:
    """The first position of every bucket over positions [0, n): bucket i is [s_i, s_{i+1}) and
    the last one ends at n. ``pow2``: 0, 1, 2, 4, 8, ...; ``width:W``: 0, W, 2W, ...; or explicit
    starts ``0,64,512`` (those >= n cover nothing and are dropped)."""
    bad = UserError(f"--buckets {spec!r} is invalid: use pow2, width:W (W >= 1) or increasing bucket starts "
                    "from 0 such as 0,64,512")
    spec = spec.strip()
    if spec == "pow2":
        starts = [0] + [1 << k for k in range(max(n - 1, 1).bit_length())]
    elif spec.startswith("width:"):
        w = spec[len("width:"):]
        if not w.isdigit() or int(w) < 1:
            raise bad
        starts = list(range(0, max(n, 1), int(w)))
    else:
        try:
            starts = [int(s) for s in spec.split(",")]
        except ValueError:
            raise bad from None
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise bad
    return [s for s in starts if s < n] or [0]


def bucket_losses(sums: list[float], counts: list[int], starts: list[int]) -> list[dict[str, Any]]:
    """Per bucket: ``start``, ``end`` (exclusive), ``tokens`` counted and ``mean_loss`` (None when
    no token of the bucket was a target)."""
    n = len(sums)
    out = []
    for a, b in zip(starts, starts[1:] + [n]):
        tokens, total = sum(counts[a:b]), sum(sums[a:b])
        out.append({"start": a, "end": b, "tokens": int(tokens), "mean_loss": total / tokens if tokens else None})
    return out


def bucket_name(bucket: dict[str, Any]) -> str:
    """``"64-127"``: the first and last position of the bucket."""
    return f"{bucket['start']}-{bucket['end'] - 1}"


# ---------------------------------------------------------------------------------------------
# Loss by position on validation rows.

def val_batches(manifest: Any, *, seq_len: int, max_rows: int, batch_size: int, seed: int,
                loader_kw: Optional[dict[str, Any]] = None) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """``(input_ids, labels)`` of the first ``max_rows`` validation rows (0: all), each row once
    (the val loader wraps its last batch around to the first rows: that tail is cut), cut to
    ``seq_len`` positions."""
    from data_pipeline.loader import build_loader

    kw = dict(loader_kw or {}, num_workers=0)
    loader = build_loader(manifest, rank=0, world_size=1, micro_batch_size=batch_size, seed=seed, split="val", **kw)
    left = loader.num_rows if max_rows <= 0 else min(max_rows, loader.num_rows)
    for batch in loader:
        if left <= 0:
            break
        take = min(left, batch["input_ids"].shape[0])
        left -= take
        yield batch["input_ids"][:take, :seq_len], batch["labels"][:take, :seq_len]


def position_loss_sums(model: "torch.nn.Module", batches: Iterable[tuple["torch.Tensor", "torch.Tensor"]]
                       ) -> tuple[list[float], list[int], int]:
    """``(loss sum per position, target tokens per position, rows)`` over ``batches``; labels of
    -100 are not counted. One trunk forward per batch; the LM head runs LOGITS_CHUNK positions at
    a time, so long rows never hold all their logits at once."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = counts = None
    rows = 0
    with torch.no_grad():
        for input_ids, labels in batches:
            x, y = input_ids.to(device), labels.to(device)
            b, n = x.shape
            if sums is None:
                sums = torch.zeros(n, dtype=torch.float64, device=device)
                counts = torch.zeros(n, dtype=torch.int64, device=device)
            h = model.features(x)  # [b, n, D]: what the LM head reads (forward = lm_head(features))
            for s in range(0, n, LOGITS_CHUNK):
                logits = model.lm_head(h[:, s:s + LOGITS_CHUNK]).float()
                tgt = y[:, s:s + LOGITS_CHUNK]
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                       reduction="none").view(tgt.shape)
                keep = tgt != -100
                sums[s:s + tgt.shape[1]] += (loss.double() * keep).sum(0)
                counts[s:s + tgt.shape[1]] += keep.sum(0)
            rows += b
    if sums is None:
        raise UserError("the validation split has no rows to evaluate")
    return sums.cpu().tolist(), counts.cpu().tolist(), rows
