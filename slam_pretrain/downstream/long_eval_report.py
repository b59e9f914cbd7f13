"""What ``slam-pretrain eval-long`` shows and keeps of an evaluation record.

A table on stdout, the ``[eval-long]`` progress lines on stderr, two PNG plots and the JSON record
(written with ``atomic_write``, the plots first and the JSON last, so a JSON means a complete
evaluation), and the numbers as ``eval_long/...`` MLflow metrics at the checkpoint's step plus the
files as artifacts. MLflow is used through its client only: an existing run's status is never
changed (training may still be running). matplotlib and mlflow are imported where used.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from slam_pretrain.downstream.position_loss import bucket_name
from slam_pretrain.errors import UserError

JSON_NAME, LOSS_PNG, PASSKEY_PNG = "eval_long.json", "loss_by_position.png", "passkey.png"


def say(line: str) -> None:
    """A progress line of the command, on stderr."""
    print(f"[eval-long] {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Table, plots, JSON.

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


# ---------------------------------------------------------------------------------------------
# MLflow.

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
            say(f"run {target.run_id} named by the checkpoint is not in {redact_uri(target.uri)}: "
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
