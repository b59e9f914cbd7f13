"""Long-context evaluation (``slam-pretrain eval-long``): does the model use its context?

Two measurements on a checkpoint or an export:

- **Loss by position.** Validation rows of the run's prepared dataset (or ``--manifest``), read
  with the real loader (``split="val"``, the run's seed: the rows training validated on, each
  once), cut to ``--seq-len`` tokens. Every target token's cross-entropy is added to its position's
  sum; positions are then grouped into buckets (``pow2``: 0, 1, 2-3, 4-7, ...; ``width:W``; or
  explicit starts ``0,64,512``) and each bucket reports its mean loss over the tokens in it
  (padding, labelled -100, is not counted). A model that uses its context has a loss that keeps
  falling with the position.
- **Passkey retrieval.** Synthetic prompts: EOS, an instruction, filler text with
  "The pass key is NNNNN. Remember it. NNNNN is the pass key." placed at depth d (0 = right after
  the instruction, 1 = right before the question), then "What is the pass key? The pass key is".
  A length L means the prompt and the room for the answer fill exactly L tokens, so L can be at
  most ``model.max_seq_len``. Scored by greedy generation with the KV cache (correct when the first
  number in the continuation is the key) or by log-likelihood (correct when the right key's
  continuation scores higher than every one of ``--candidates - 1`` distractor keys). The same
  keys are used in every (L, d) cell, so cells differ only by length and depth.

Output: a table on stdout, a JSON record and two PNG plots (written with ``atomic_write``, the
plots first and the JSON last, so a JSON means a complete evaluation), and with the config's
``tracking.enabled`` the numbers as ``eval_long/...`` metrics at the checkpoint's step plus the files
as artifacts, in the checkpoint's MLflow run (its ``trainer_state.json``) or a new run. MLflow is
used through its client only: the run's status is never changed (training may still be running).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from slam_pretrain.errors import UserError

if TYPE_CHECKING:  # torch, matplotlib and mlflow are imported where used: cli.py builds this parser always
    import torch

FORMAT = "slam-pretrain-eval-long-v1"
JSON_NAME, LOSS_PNG, PASSKEY_PNG = "eval_long.json", "loss_by_position.png", "passkey.png"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and remember it. I will ask you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"
LOGITS_CHUNK = 1024  # positions per LM-head call: logits stay [B, 1024, V], not [B, N, V]


def _say(line: str) -> None:
    print(f"[eval-long] {line}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------
# Passkey retrieval.

@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # prompt + answer room, in tokens
    depth: float  # where the needle sits in the filler, 0..1
    trial: int  # index into the keys: the same key in every (length, depth) cell
    key: str
    ids: list[int]  # the prompt (EOS, instruction, filler + needle, question)
    room: int  # tokens generated (the longest answer's tokens + 1, to see where the number ends)
    needle_at: int  # index in ids of the needle's first token


def make_keys(trials: int, seed: int) -> list[str]:
    """``trials`` distinct five-digit keys, seeded."""
    rng, keys = random.Random(seed), []
    while len(keys) < trials:
        k = str(rng.randint(10000, 99999))
        if k not in keys:
            keys.append(k)
    return keys


def answer_room(tokenizer: Any, keys: list[str]) -> int:
    return max(len(tokenizer.encode(ANSWER.format(key=k))) for k in keys) + 1


def min_passkey_length(tokenizer: Any, keys: list[str]) -> int:
    """The shortest L that fits a prompt without filler and the answer room."""
    fixed = 1 + len(tokenizer.encode(INTRO)) + len(tokenizer.encode(QUESTION))
    return fixed + max(len(tokenizer.encode(NEEDLE.format(key=k))) for k in keys) + answer_room(tokenizer, keys)


def check_lengths(lengths: list[int], max_seq_len: int, shortest: int) -> None:
    """UserError naming ``--lengths`` for a length beyond the model's window or below the prompt's minimum."""
    for n in lengths:
        if n > max_seq_len:
            raise UserError(f"--lengths {n} is longer than model.max_seq_len={max_seq_len} (the model cannot "
                            f"attend that far): use lengths between {shortest} and {max_seq_len}")
        if n < shortest:
            raise UserError(f"--lengths {n} is too short: a passkey prompt and its answer need at least "
                            f"{shortest} tokens with this tokenizer; use lengths between {shortest} and {max_seq_len}")


def default_lengths(max_seq_len: int, shortest: int) -> list[int]:
    """Powers of two from the first that fits a prompt up to max_seq_len, and max_seq_len itself."""
    out, n = [], 1 << max(shortest - 1, 1).bit_length()
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len] if max_seq_len >= shortest else []


def passkey_trials(tokenizer: Any, lengths: list[int], depths: list[float], keys: list[str]) -> list[PasskeyTrial]:
    """One prompt per (length, depth, key), in that order. The prompt has ``length - room`` tokens:
    the filler (FILLER repeated, cut to the token) takes what the fixed parts leave."""
    room = answer_room(tokenizer, keys)
    intro, question, filler_unit = (tokenizer.encode(s) for s in (INTRO, QUESTION, FILLER))
    out = []
    for length in lengths:
        for depth in depths:
            for t, key in enumerate(keys):
                needle = tokenizer.encode(NEEDLE.format(key=key))
                n_fill = length - room - (1 + len(intro) + len(needle) + len(question))
                if n_fill < 0:
                    raise UserError(f"--lengths {length} is too short for the passkey prompt "
                                    f"({-n_fill} tokens missing)")
                filler = (filler_unit * (n_fill // len(filler_unit) + 1))[:n_fill]
                before = int(round(depth * n_fill))
                ids = [tokenizer.eos_id] + intro + filler[:before] + needle + filler[before:] + question
                out.append(PasskeyTrial(length, depth, t, key, ids, room, 1 + len(intro) + before))
    return out


def first_number(text: str) -> Optional[str]:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def score_by_generation(model: "torch.nn.Module", tokenizer: Any, trials: list[PasskeyTrial],
                        batch_size: int) -> list[dict[str, Any]]:
    """Greedy continuations (KV cache; recompute for fractional layouts) of ``room`` tokens; a trial
    is correct when the first number in its continuation is the key."""
    from slam_pretrain.downstream.generate import generate_batch

    records = []
    for start in range(0, len(trials), batch_size):
        chunk = trials[start:start + batch_size]
        new = generate_batch(model, [t.ids for t in chunk], chunk[0].room, temperature=0.0,
                             eos_id=tokenizer.eos_id, notify=None)
        for t, ids in zip(chunk, new):
            text = tokenizer.decode(ids)
            records.append({"length": t.length, "depth": t.depth, "trial": t.trial, "key": t.key,
                            "needle_at": t.needle_at, "output_ids": list(ids), "output": text,
                            "correct": first_number(text) == t.key})
    return records


def distractors(keys: list[str], candidates: int, seed: int) -> list[list[str]]:
    """For each key, ``candidates - 1`` other distinct five-digit keys (seeded, the same in every cell)."""
    rng, out = random.Random(seed + 1), []
    for key in keys:
        others: list[str] = []
        while len(others) < candidates - 1:
            k = str(rng.randint(10000, 99999))
            if k != key and k not in others:
                others.append(k)
        out.append(others)
    return out


def score_by_loglik(model: "torch.nn.Module", tokenizer: Any, trials: list[PasskeyTrial], candidates: int,
                    seed: int, batch_size: int) -> list[dict[str, Any]]:
    """Sum of the log-probabilities of ``" " + key`` after the prompt, for the right key and the
    distractors; correct when the right key scores strictly highest."""
    import torch
    import torch.nn.functional as F

    by_trial = {t.trial: t.key for t in trials}
    keys = [by_trial[i] for i in sorted(by_trial)]
    others = dict(zip(keys, distractors(keys, candidates, seed)))
    device = next(model.parameters()).device
    # The rows share each prompt's list (no copies: many long prompts times the candidates).
    rows = [(i, cand, t.ids, tokenizer.encode(ANSWER.format(key=cand)))
            for i, t in enumerate(trials) for cand in [t.key] + others[t.key]]
    # Right padding never changes a prefix-consistent model's logits; a fractional layout moves
    # with the length, so it scores one row at a time.
    step = batch_size if model.config.prefix_consistent else 1
    scores: list[dict[str, float]] = [{} for _ in trials]
    with torch.no_grad():
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            inputs = [ids + ans[:-1] for _, _, ids, ans in chunk]
            width = max(len(x) for x in inputs)
            x = torch.tensor([r + [0] * (width - len(r)) for r in inputs], device=device)
            h = model.features(x)  # the LM head runs on the answer positions only, not [b, width, V]
            for r, (i, cand, ids, ans) in enumerate(chunk):
                pos = torch.arange(len(ids) - 1, len(ids) - 1 + len(ans), device=device)
                logp = F.log_softmax(model.lm_head(h[r, pos]).float(), dim=-1)  # [len(ans), V]
                scores[i][cand] = float(logp[torch.arange(len(ans), device=device),
                                             torch.tensor(ans, device=device)].sum())
    records = []
    for t, sc in zip(trials, scores):
        best_other = max((v for k, v in sc.items() if k != t.key), default=-math.inf)
        records.append({"length": t.length, "depth": t.depth, "trial": t.trial, "key": t.key,
                        "needle_at": t.needle_at, "scores": sc, "chosen": max(sc, key=sc.get),
                        "correct": sc[t.key] > best_other})
    return records


def accuracy_cells(records: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> list[dict[str, Any]]:
    """One cell per (length, depth): correct trials, trials and their ratio."""
    cells = []
    for n in lengths:
        for d in depths:
            hits = [r["correct"] for r in records if r["length"] == n and r["depth"] == d]
            cells.append({"length": n, "depth": d, "correct": sum(hits), "trials": len(hits),
                          "accuracy": sum(hits) / len(hits) if hits else None})
    return cells


# ---------------------------------------------------------------------------------------------
# Table, plots, MLflow.

def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(record: dict[str, Any]) -> str:
    lines = []
    loss = record.get("loss_by_position")
    if loss:
        lines.append(f"loss by position: {loss['rows']} validation rows x {loss['seq_len']} tokens "
                     f"({loss['dataset']}), mean {_fmt(loss['mean_loss'])}")
        lines.append(f"{'positions':>15}  {'tokens':>10}  {'mean loss':>9}")
        lines += [f"{bucket_name(b):>15}  {b['tokens']:>10,}  {_fmt(b['mean_loss']):>9}" for b in loss["buckets"]]
    pk = record.get("passkey")
    if pk:
        if lines:
            lines.append("")
        lines.append(f"passkey retrieval accuracy ({pk['scoring']}, {pk['trials']} trials per cell), "
                     f"mean {_fmt(pk['mean_accuracy'], '.3f')}")
        lines.append(f"{'length / depth':>15}" + "".join(f"{d:>7.2f}" for d in pk["depths"]) + f"{'mean':>7}")
        for n in pk["lengths"]:
            accs = [c["accuracy"] for c in pk["cells"] if c["length"] == n]
            lines.append(f"{n:>15}" + "".join(f"{_fmt(a, '.2f'):>7}" for a in accs)
                         + f"{_fmt(pk['accuracy_by_length'][str(n)], '.2f'):>7}")
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    # The object API with an Agg canvas: no pyplot, no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def loss_figure(loss: dict[str, Any], title: str) -> Any:
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    buckets = [b for b in loss["buckets"] if b["mean_loss"] is not None]
    ends = [b["end"] for b in buckets]  # tokens of context up to the bucket's end: > 0, fits a log axis
    ax.plot(ends, [b["mean_loss"] for b in buckets], marker="o")
    if loss["buckets_spec"] == "pow2":
        ax.set_xscale("log", base=2)
    ax.set_xticks(ends, [bucket_name(b) for b in buckets], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("position bucket (first-last)")
    ax.set_ylabel("mean validation loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def passkey_figure(pk: dict[str, Any], title: str) -> Any:
    lengths, depths = pk["lengths"], pk["depths"]
    fig = _figure(1.6 + 0.9 * len(depths), 1.4 + 0.45 * len(lengths))
    ax = fig.add_subplot()
    grid = [[math.nan if c["accuracy"] is None else c["accuracy"] for c in pk["cells"] if c["length"] == n]
            for n in lengths]
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (0 = start of the context, 1 = end)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    return fig


def write_outputs(record: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """The plots, then the JSON record (its presence means a complete evaluation); each file
    published with ``atomic_write``. Returns what was written."""
    from data_pipeline.storage import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    ck = record["checkpoint"]
    where = f"{Path(ck['source']).name} (step {ck['step']})"
    written = {}
    figures = []
    if record.get("loss_by_position"):
        figures.append(("loss_by_position", LOSS_PNG,
                        loss_figure(record["loss_by_position"], f"loss by position, {where}")))
    if record.get("passkey"):
        pk = record["passkey"]
        figures.append(("passkey", PASSKEY_PNG, passkey_figure(pk, f"passkey accuracy ({pk['scoring']}), {where}")))
    for name, file, fig in figures:
        written[name] = atomic_write(out_dir / file, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
    record["plots"] = {name: path.name for name, path in written.items()}
    written["json"] = atomic_write(out_dir / JSON_NAME, json.dumps(record, indent=1) + "\n")
    return written


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as ``eval_long/...`` MLflow metric names."""
    out: dict[str, float] = {}
    loss = record.get("loss_by_position")
    if loss:
        if loss["mean_loss"] is not None:
            out["eval_long/loss/mean"] = loss["mean_loss"]
        for b in loss["buckets"]:
            if b["mean_loss"] is not None:
                out[f"eval_long/loss/pos_{bucket_name(b)}"] = b["mean_loss"]
    pk = record.get("passkey")
    if pk:
        for c in pk["cells"]:
            if c["accuracy"] is not None:
                out[f"eval_long/passkey/len_{c['length']}/depth_{c['depth']:.2f}"] = c["accuracy"]
        for n, acc in pk["accuracy_by_length"].items():
            if acc is not None:
                out[f"eval_long/passkey/len_{n}"] = acc
        if pk["mean_accuracy"] is not None:
            out["eval_long/passkey/mean"] = pk["mean_accuracy"]
    return out


@dataclass
class MlflowTarget:
    uri: str
    run_id: Optional[str]  # None: a new run of ``experiment``
    experiment: str


def open_mlflow(target: MlflowTarget, explicit_run: bool) -> MlflowTarget:
    """Reach the store before the (slow) evaluation: a wrong URI or run id is a UserError now,
    not after the work. A run named only by the checkpoint that the store lacks gets a new run."""
    import logging

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from slam_pretrain.redact import redact_uri
    from slam_pretrain.training.tracking import sqlite_path

    def run_exists(client: Any, run_id: str) -> bool:
        try:
            client.get_run(run_id)
            return True
        except MlflowException as e:
            if e.get_http_status_code() in (400, 404):  # 400: not even a valid run id
                return False
            raise

    for name in ("mlflow", "alembic"):  # their INFO lines (DB migrations, ...) stay out of the output
        logging.getLogger(name).setLevel(logging.WARNING)
    db = sqlite_path(target.uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=target.uri)
        if target.run_id and not run_exists(client, target.run_id):
            if explicit_run:
                raise UserError(f"--mlflow-run-id {target.run_id}: no such run in {redact_uri(target.uri)}")
            _say(f"run {target.run_id} named by the checkpoint is not in {redact_uri(target.uri)}: "
                 "logging to a new run")
            target.run_id = None
        if target.run_id is None:
            client.get_experiment_by_name(target.experiment)
    except UserError:
        raise
    except Exception as e:  # MlflowException, connection errors: the user's URI
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise UserError(f"MLflow at {redact_uri(target.uri)}: {first} (pass --mlflow-uri URI or --no-mlflow)") from None
    return target


def log_to_mlflow(target: MlflowTarget, record: dict[str, Any], files: list[Path], step: int) -> str:
    """Metrics at ``step`` and the files as artifacts under ``eval_long/step_XXXXXXXX``; a new run
    gets params and is marked FINISHED, an existing one keeps its status. Returns the run id."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from slam_pretrain.training.tracking import MAX_METRICS_PER_BATCH, sqlite_path

    client = MlflowClient(tracking_uri=target.uri)
    run_id, new = target.run_id, target.run_id is None
    if new:
        exp = client.get_experiment_by_name(target.experiment)
        db = sqlite_path(target.uri)  # with SQLite, artifacts go next to the database (as the tracker does)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            target.experiment, artifact_location=(db.parent / "mlartifacts").resolve().as_uri() if db else None)
        run_id = client.create_run(exp_id, run_name=f"eval-long-step{step}").info.run_id
        pk = record.get("passkey") or {}
        params = {"checkpoint": record["checkpoint"]["source"], "step": step,
                  "buckets": (record.get("loss_by_position") or {}).get("buckets_spec"),
                  "passkey_scoring": pk.get("scoring"), "passkey_lengths": pk.get("lengths"),
                  "passkey_depths": pk.get("depths"), "passkey_trials": pk.get("trials")}
        client.log_batch(run_id, params=[Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                                         for k, v in params.items()])
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, max(step, 0)) for k, v in metrics_of(record).items()]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path=f"eval_long/step_{max(step, 0):08d}")
    if new:
        client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# The command.

def _parse_list(flag: str, text: Optional[str], kind: type, valid: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        raise UserError(f"{flag} {text!r} is invalid: {valid}")
    return values


def _check_args(args: argparse.Namespace) -> tuple[Optional[list[int]], list[float]]:
    """Everything checkable before the model loads; returns (lengths or None, depths)."""
    if args.no_loss and args.no_passkey:
        raise UserError("--no-loss and --no-passkey together leave nothing to evaluate: drop one")
    check_buckets(args.buckets)
    lengths = _parse_list("--lengths", args.lengths, int, "comma-separated token counts, e.g. 1024,4096")
    depths = _parse_list("--depths", args.depths, float, "comma-separated fractions in [0, 1], e.g. 0,0.5,1")
    if depths is None:
        depths = list(DEFAULT_DEPTHS)
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"--depths {args.depths!r} is invalid: every depth must be in [0, 1] (0 = start, 1 = end)")
    for flag, value, low in (("--trials", args.trials, 1), ("--candidates", args.candidates, 2),
                             ("--batch-size", args.batch_size, 1), ("--val-rows", args.val_rows, 0)):
        if value < low:
            raise UserError(f"{flag} {value} is invalid: must be >= {low}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len {args.seq_len} is invalid: must be >= 1")
    return lengths, sorted(depths)


def _run_config(meta: dict[str, Any]) -> Any:
    """The run's Config (checkpoint: its config.yaml; export: <stem>.config.yaml), or None for an
    export that has lost it."""
    import yaml

    from slam_pretrain.config import config_from_dict
    from slam_pretrain.errors import ConfigError

    path = Path(meta.get("config_path") or "")
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read the run's config {path}: {e}") from None


def _step_dir(meta: dict[str, Any]) -> Optional[Path]:
    """The checkpoint step directory behind ``meta`` (an export records it as ``source``)."""
    if meta["kind"] == "checkpoint":
        return Path(meta["source"])
    from safetensors import safe_open

    with safe_open(meta["source"], framework="pt", device="cpu") as f:
        src = (f.metadata() or {}).get("source")
    return Path(src) if src and Path(src).is_dir() else None


def _default_output(meta: dict[str, Any], step_dir: Optional[Path]) -> Path:
    if meta["kind"] == "checkpoint" and step_dir is not None and step_dir.parent.name == "checkpoints":
        return step_dir.parent.parent / "eval_long" / step_dir.name
    src = Path(meta["source"])
    return src.with_name(src.name[: -len(".safetensors")] + ".eval_long")


def _mlflow_target(args: argparse.Namespace, cfg: Any, meta: dict[str, Any],
                   step_dir: Optional[Path]) -> Optional[MlflowTarget]:
    from slam_pretrain.training.tracking import resolve_tracking_uri

    if args.no_mlflow or (not args.mlflow_uri and (cfg is None or not cfg.tracking.enabled)):
        return None
    out_dir = step_dir.parent.parent if step_dir is not None and step_dir.parent.name == "checkpoints" else \
        Path(cfg.run.out_dir if cfg is not None else ".")
    uri = args.mlflow_uri or resolve_tracking_uri(cfg.tracking.uri, out_dir)
    if "***" in uri:  # config.yaml stores URIs with their credentials masked
        raise UserError(f"tracking.uri {uri} in {meta.get('config_path')} has its credentials masked: pass "
                        "--mlflow-uri with the real URI (or set MLFLOW_TRACKING_URI and drop tracking.uri), "
                        "or --no-mlflow")
    run_id = args.mlflow_run_id
    if run_id is None and step_dir is not None and (step_dir / "trainer_state.json").is_file():
        try:
            run_id = json.loads((step_dir / "trainer_state.json").read_text()).get("tracking_run_id")
        except (OSError, ValueError):
            run_id = None
    experiment = cfg.tracking.experiment if cfg is not None else "slam-eval"
    return open_mlflow(MlflowTarget(uri, run_id, experiment), explicit_run=args.mlflow_run_id is not None)


def _manifest(args: argparse.Namespace, cfg: Any, meta: dict[str, Any], model_vocab: int) -> Any:
    from data_pipeline.manifest import load_manifest

    loc = args.manifest
    if loc is None:
        if cfg is None:
            raise UserError(f"{meta['source']} has no run config next to it to find its dataset: pass --manifest "
                            "DATASET_DIR/manifest.json, or --no-loss")
        loc = cfg.data.dataset_dir
        if not loc.startswith(("http://", "https://")) and not Path(loc).exists():
            raise UserError(f"no dataset at data.dataset_dir={loc!r} (from {meta.get('config_path')}; a relative "
                            "path is read from the current folder): pass --manifest DATASET_DIR/manifest.json, "
                            "or --no-loss")
    m = load_manifest(loc)
    tok_sha = meta.get("tokenizer_sha256")
    if m.vocab_size != model_vocab or (tok_sha and tok_sha != m.tokenizer_sha256):
        raise UserError(f"dataset {m.location} was tokenized with another tokenizer than the model's (vocab "
                        f"{m.vocab_size} vs model.vocab_size={model_vocab}, sha256 {m.tokenizer_sha256[:12]}... vs "
                        f"{(tok_sha or '?')[:12]}...): pass --manifest of the dataset the run trained on")
    return m


def eval_long(model: "torch.nn.Module", tokenizer: Any, meta: dict[str, Any], *, manifest: Any = None,
              seq_len: Optional[int] = None, val_rows: int = 256, buckets: str = "pow2", data_seed: int = 0,
              loader_kw: Optional[dict[str, Any]] = None, lengths: Optional[list[int]] = None,
              depths: Optional[list[float]] = None, trials: int = 5, scoring: str = "generate",
              candidates: int = 10, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """The evaluation record (see the module doc): loss by position when ``manifest`` is given,
    passkey retrieval when ``lengths`` is not an empty list (None: powers of two up to
    ``max_seq_len``). Every argument is checked before any work."""
    max_len = model.config.max_seq_len
    depths = sorted(depths if depths is not None else DEFAULT_DEPTHS)
    keys = make_keys(trials, seed)
    shortest = min_passkey_length(tokenizer, keys)
    capped = lengths is None
    if capped:
        lengths = default_lengths(max_len, shortest)
        if not lengths:
            raise UserError(f"model.max_seq_len={max_len} is too short for a passkey prompt ({shortest} tokens): "
                            "pass --no-passkey")
    lengths = sorted(lengths)
    check_lengths(lengths, max_len, shortest)
    if scoring not in ("generate", "loglik"):
        raise UserError(f"--scoring {scoring!r} is invalid: generate or loglik")
    n = 0
    if manifest is not None:
        n = seq_len if seq_len is not None else min(manifest.seq_len, max_len)
        if n > max_len or n > manifest.seq_len:
            raise UserError(f"--seq-len {n} is invalid: at most the dataset's rows ({manifest.seq_len} tokens, "
                            f"{manifest.location}) and model.max_seq_len={max_len}")
        starts = bucket_starts(buckets, n)
    # Checked: from here on only work.
    _say(f"{meta.get('kind')} {meta.get('source')} (step {meta.get('step')})")
    if capped and lengths:
        _say(f"passkey lengths {', '.join(map(str, lengths))} (capped at model.max_seq_len={max_len})")
    record: dict[str, Any] = {"format": FORMAT, "checkpoint": {k: meta.get(k) for k in ("kind", "source", "step")},
                              "model": {"max_seq_len": max_len, "prefix_consistent": model.config.prefix_consistent}}
    if manifest is not None:
        _say(f"loss by position: validation rows of {manifest.location}, {n} tokens each")
        sums, counts, rows = position_loss_sums(model, val_batches(manifest, seq_len=n, max_rows=val_rows,
                                                                   batch_size=batch_size, seed=data_seed,
                                                                   loader_kw=loader_kw))
        total = sum(counts)
        record["loss_by_position"] = {
            "dataset": manifest.location, "dataset_id": manifest.dataset_id, "split": "val", "rows": rows,
            "seq_len": n, "buckets_spec": buckets, "tokens": total,
            "mean_loss": sum(sums) / total if total else None, "buckets": bucket_losses(sums, counts, starts)}
    if lengths:
        tr = passkey_trials(tokenizer, lengths, depths, keys)
        _say(f"passkey: {len(tr)} prompts ({len(lengths)} lengths x {len(depths)} depths x {trials} keys), "
             f"scored by {scoring}")
        if scoring == "generate":
            if not model.config.prefix_consistent:
                _say("fractional segment layout: generation recomputes the context for every token (no KV cache)")
            recs = score_by_generation(model, tokenizer, tr, batch_size)
        else:
            recs = score_by_loglik(model, tokenizer, tr, candidates, seed, batch_size)
        cells = accuracy_cells(recs, lengths, depths)
        by_len = {}
        for length in lengths:
            hits = [r["correct"] for r in recs if r["length"] == length]
            by_len[str(length)] = sum(hits) / len(hits)
        record["passkey"] = {
            "scoring": scoring, "trials": trials, "seed": seed,
            "candidates": candidates if scoring == "loglik" else None,
            "lengths": lengths, "depths": depths, "answer_room": tr[0].room, "cells": cells,
            "accuracy_by_length": by_len, "mean_accuracy": sum(r["correct"] for r in recs) / len(recs),
            "records": recs}
    return record


def _check_writable(out_dir: Path) -> None:
    """UserError before the work when the results could not be written (nothing is created here)."""
    import os

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {str(out_dir)!r} is a file: pass a directory for {JSON_NAME} and the plots")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {str(out_dir)!r} cannot be written ({parent} is not a writable folder): "
                        "pass another --output")


def eval_long_cli(args: argparse.Namespace) -> int:
    """``slam-pretrain eval-long``: evaluate, print the table, write JSON + plots, log to MLflow."""
    from data_pipeline.loader import loader_kwargs
    from slam_pretrain.downstream.export import load_model

    lengths, depths = _check_args(args)
    model, tokenizer, meta = load_model(args.checkpoint, device=args.device)
    cfg = _run_config(meta)
    step_dir = _step_dir(meta)
    manifest = None if args.no_loss else _manifest(args, cfg, meta, model.config.vocab_size)
    target = _mlflow_target(args, cfg, meta, step_dir)
    out_dir = Path(args.output) if args.output else _default_output(meta, step_dir)
    _check_writable(out_dir)
    record = eval_long(model, tokenizer, meta, manifest=manifest, seq_len=args.seq_len, val_rows=args.val_rows,
                       buckets=args.buckets, data_seed=cfg.run.seed if cfg is not None else args.seed,
                       loader_kw={k: v for k, v in loader_kwargs(cfg.data).items()
                                  if k in ("verify", "skip_corrupt", "cache_dir")} if cfg is not None else None,
                       lengths=[] if args.no_passkey else lengths, depths=depths, trials=args.trials,
                       scoring=args.scoring, candidates=args.candidates, seed=args.seed, batch_size=args.batch_size)
    print(format_table(record), flush=True)
    written = write_outputs(record, out_dir)
    _say(f"wrote {written['json']} and {', '.join(p.name for k, p in written.items() if k != 'json')}")
    if target is not None:
        files = [written[k] for k in ("json", "loss_by_position", "passkey") if k in written]
        try:
            run_id = log_to_mlflow(target, record, files, int(meta["step"]))
        except Exception as e:  # the store went away since open_mlflow: the results are safe on disk
            from slam_pretrain.redact import redact_uri

            first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            raise UserError(f"the results are in {out_dir}, but logging them to MLflow at {redact_uri(target.uri)} "
                            f"failed: {first}") from None
        _say(f"logged {len(metrics_of(record))} metrics at step {meta['step']} to MLflow run {run_id}")
    return 0


def add_eval_long_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``eval-long`` subcommand's arguments (cli.py calls this)."""
    p = sub.add_parser("eval-long", help="long-context evaluation: loss by position, passkey retrieval")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run out_dir, or .safetensors export")
    p.add_argument("--output", default=None,
                   help=f"folder for {JSON_NAME}, {LOSS_PNG} and {PASSKEY_PNG} (default: <out_dir>/eval_long/"
                        "step_XXXXXXXX, or <export stem>.eval_long next to an export)")
    p.add_argument("--manifest", default=None,
                   help="dataset manifest.json (or its folder / URL) for the validation rows (default: the run's "
                        "data.dataset_dir)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="positions per validation row (default: the dataset's rows, at most model.max_seq_len)")
    p.add_argument("--val-rows", type=int, default=256, help="validation rows to score (0 = all)")
    p.add_argument("--buckets", default="pow2",
                   help="position buckets: pow2 (0, 1, 2-3, 4-7, ...), width:W, or starts such as 0,64,512")
    p.add_argument("--lengths", default=None,
                   help="passkey context lengths in tokens, e.g. 1024,4096 (default: powers of two up to "
                        "model.max_seq_len)")
    p.add_argument("--depths", default=None, help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=int, default=5, help="passkeys per (length, depth) cell")
    p.add_argument("--scoring", choices=("generate", "loglik"), default="generate",
                   help="generate: the first number of the greedy answer must be the key; loglik: the key's "
                        "log-likelihood must beat those of --candidates - 1 distractor keys")
    p.add_argument("--candidates", type=int, default=10, help="keys compared per trial with --scoring loglik")
    p.add_argument("--no-loss", action="store_true", help="skip the loss by position")
    p.add_argument("--no-passkey", action="store_true", help="skip passkey retrieval")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds the passkeys (and the row order without a run config)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow even when tracking is on")
    p.add_argument("--mlflow-uri", default=None, help="log to this tracking URI (default: the run's)")
    p.add_argument("--mlflow-run-id", default=None,
                   help="log into this run (default: the checkpoint's training run, else a new run)")
    return p
