"""Long-context evaluation (``slam-pretrain eval-long``): does the model use its context?

Two measurements on a checkpoint or an export:

- **Loss by position** (position_loss.py): validation rows of the run's prepared dataset (or
  ``--manifest``), cut to ``--seq-len`` tokens, give a mean loss per position bucket
  (``--buckets``). A model that uses its context has a loss that keeps falling with the position.
- **Passkey retrieval** (passkey.py): a five-digit key hidden at depth d (``--depths``) in prompts
  of L tokens (``--lengths``, at most ``model.max_seq_len``), scored by greedy generation or by
  log-likelihood against ``--candidates - 1`` distractor keys.

This module loads the model and its run config, checks every argument before any work, builds the
record (``eval_long``) and runs the command (``add_eval_long_parser`` / ``eval_long_cli``, for
cli.py). Output (long_eval_report.py): a table on stdout, a JSON record and two PNG plots (the
plots first and the JSON last, so a JSON means a complete evaluation), and with the config's
``tracking.enabled`` the numbers as ``eval_long/...`` metrics at the checkpoint's step plus the files
as artifacts, in the checkpoint's MLflow run (its ``trainer_state.json``) or a new run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from slam_pretrain.downstream.long_eval_report import (JSON_NAME, LOSS_PNG, PASSKEY_PNG, MlflowTarget, format_table,
                                                       log_to_mlflow, metrics_of, open_mlflow, say, write_outputs)
from slam_pretrain.downstream.passkey import (accuracy_cells, check_lengths, default_lengths, make_keys,
                                              min_passkey_length, passkey_trials, score_by_generation,
                                              score_by_loglik)
from slam_pretrain.downstream.position_loss import (bucket_losses, bucket_starts, check_buckets, position_loss_sums,
                                                    val_batches)
from slam_pretrain.errors import UserError

if TYPE_CHECKING:  # torch, matplotlib and mlflow are imported where used (here and in the modules above):
    import torch  # cli.py builds this parser always, so importing this module must stay cheap

FORMAT = "slam-pretrain-eval-long-v1"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


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
    say(f"{meta.get('kind')} {meta.get('source')} (step {meta.get('step')})")
    if capped and lengths:
        say(f"passkey lengths {', '.join(map(str, lengths))} (capped at model.max_seq_len={max_len})")
    record: dict[str, Any] = {"format": FORMAT, "checkpoint": {k: meta.get(k) for k in ("kind", "source", "step")},
                              "model": {"max_seq_len": max_len, "prefix_consistent": model.config.prefix_consistent}}
    if manifest is not None:
        say(f"loss by position: validation rows of {manifest.location}, {n} tokens each")
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
        say(f"passkey: {len(tr)} prompts ({len(lengths)} lengths x {len(depths)} depths x {trials} keys), "
             f"scored by {scoring}")
        if scoring == "generate":
            if not model.config.prefix_consistent:
                say("fractional segment layout: generation recomputes the context for every token (no KV cache)")
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
    say(f"wrote {written['json']} and {', '.join(p.name for k, p in written.items() if k != 'json')}")
    if target is not None:
        files = [written[k] for k in ("json", "loss_by_position", "passkey") if k in written]
        try:
            run_id = log_to_mlflow(target, record, files, int(meta["step"]))
        except Exception as e:  # the store went away since open_mlflow: the results are safe on disk
            from slam_pretrain.redact import redact_uri

            first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            raise UserError(f"the results are in {out_dir}, but logging them to MLflow at {redact_uri(target.uri)} "
                            f"failed: {first}") from None
        say(f"logged {len(metrics_of(record))} metrics at step {meta['step']} to MLflow run {run_id}")
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
