"""MLflow tracking on rank 0: one run per job, asynchronous, outage-tolerant, resumable.

Only rank 0 gets an ``MLflowTracker``; every other rank gets a ``NullTracker`` with the same
methods, so the trainer calls them unconditionally and one job makes exactly one MLflow run.

How it behaves (the trainer relies on all of this):
- Every call from the training loop only appends to an in-memory queue (``log_metrics`` never
  blocks on the network and never raises). One background thread sends the queue in order:
  metrics go out with ``MlflowClient.log_batch`` in batches of at most 1000.
- When a send fails for a transient reason (server down, timeout, 5xx, a locked SQLite file),
  the thread keeps the batch at the head of the queue, prints ONE line on stderr for the whole
  outage, and retries with exponential backoff (1 s doubling to 30 s). When the server is back
  everything goes out in the original order. Retrying a batch that did reach the server is
  harmless: the timestamp of each value is fixed when it is queued, and the MLflow store drops
  exact duplicates (key, step, timestamp, value).
- ``flush(timeout)`` (before checkpoints) waits for the queue to drain; during an outage it
  retries once and returns False at once instead of stalling every checkpoint for ``timeout``.
  ``finish(status, timeout)`` (at exit) keeps retrying for the whole ``timeout`` when the server
  answered earlier in the run (an outage it may recover from); when it never answered, one last
  try (at most ``UNREACHABLE_EXIT_WAIT_S``) and no stall. Either way one line reports how many
  metric values and other operations were not sent.
- The queue holds at most ``max_buffered`` metric values (default 200,000, a few tens of MB);
  beyond that new values are dropped with one warning (``metrics.jsonl`` still has them).
- Startup against an unreachable server does not stop training: ``start`` waits only for the
  first attempt to create (or reopen) the run, then returns; the thread keeps retrying and
  metrics logged meanwhile wait in the queue behind the run creation. ``start`` then returns
  None for a new run, and ``tracker.run_id`` holds the id once the run exists: read it when
  writing a checkpoint, not once at startup.
- A resumed job passes the run id from the checkpoint: the same run is set back to RUNNING,
  params it lacks are added, params whose value changed are recorded as ``param_changed/<key>``
  tags (MLflow refuses to change a logged param), and tags are refreshed (new SLURM job id).
- Errors the server will never accept (HTTP 4xx other than 429) drop that one operation with a
  warning instead of blocking the queue forever.
- MLflow's own HTTP retries are turned off in this process (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``,
  ``MLFLOW_HTTP_REQUEST_TIMEOUT=30`` unless the user set them): this thread is the single retry
  policy, so a failing call returns in seconds instead of after MLflow's ~4 minute backoff.
- MLflow's and alembic's INFO logging is silenced so it stays out of the training log.
- Credentials in the URI (``http://user:password@host``, ``?token=...``) never reach a log line:
  every warning goes through ``slam_pretrain.redact`` (params and config files are redacted by
  ``Config.flat`` / ``Config.to_yaml``).
- ``<run.out_dir>/mlflow_run.json`` names the run the out_dir last logged to. A job killed before
  its first checkpoint leaves its run RUNNING and no checkpoint naming it: the next start in the
  same out_dir marks that run KILLED (unless it is the run being continued).

URI: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<abs run.out_dir>/mlflow.db``. With a SQLite store, new experiments put their
artifacts next to the database (``<db dir>/mlartifacts``); a server decides for itself.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import posixpath
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from slam_pretrain.redact import redact_text, redact_uri

if TYPE_CHECKING:  # mlflow is imported lazily: ranks > 0 never pay its ~2 s import
    from slam_pretrain.config import Config

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# finish() against a server that never answered during the whole run: one last try, bounded by
# this, instead of the full exit timeout (nothing suggests it is about to come back).
UNREACHABLE_EXIT_WAIT_S = 5.0
RUN_STATE_FILE = "mlflow_run.json"  # in run.out_dir: the run this out_dir logs to (see _close_orphan)
_KEY_RE = re.compile(r"^[/\w.\- :]+$")  # what MLflow accepts in metric/param/tag keys (POSIX)


def _warn(msg: str) -> None:
    """One line on stderr (the tracker never raises into training); credentials in URLs masked."""
    print(f"tracking: {redact_text(msg)}", file=sys.stderr, flush=True)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def valid_key(key: Any) -> bool:
    """True when MLflow accepts ``key`` as a metric/param/tag name."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
        return False
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith(("..", "/"))


# ---------------------------------------------------------------------------------------------
# Configuration helpers the trainer calls.

def resolve_tracking_uri(uri: Optional[str], out_dir: Union[str, os.PathLike]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs out_dir>/mlflow.db``.

    A relative SQLite path is made absolute (against the current directory) so a requeued job
    started elsewhere still finds the same database.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return "sqlite:///" + str((Path(out_dir) / "mlflow.db").resolve())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return "sqlite:///" + str(Path(rel).resolve())
    return uri


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI, else None."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):].split("?", 1)[0]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


def ui_command(uri: str) -> str:
    """The command that shows this store's runs in a browser."""
    uri = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _param_str(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def run_params(cfg: "Config") -> dict[str, str]:
    """The flattened config as MLflow params, values truncated to MLflow's 6000 characters."""
    return {k: _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH) for k, v in cfg.flat().items()}


def git_commit(path: Union[str, os.PathLike, None] = None) -> Optional[tuple[str, bool]]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package), or None."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(cfg: "Config", world_size: int, extra: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """Tags of the job: git commit, engine, world size, SLURM job id when present, host."""
    tags: dict[str, Any] = {
        "engine": cfg.engine.name,
        "engine.zero_stage": cfg.engine.zero_stage,
        "engine.precision": cfg.engine.precision,
        "world_size": world_size,
        "host": socket.gethostname(),
        "mlflow.source.name": "slam-pretrain",
    }
    git = git_commit()
    if git is not None:
        tags["git_commit"] = git[0]
        tags["mlflow.source.git.commit"] = git[0]  # shown by the MLflow UI
        tags["git_dirty"] = str(git[1]).lower()
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_RESTART_COUNT", "slurm_restart_count"), ("SLURM_JOB_NUM_NODES", "slurm_nodes")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update(extra or {})
    return {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


# ---------------------------------------------------------------------------------------------
# The trackers.

class Tracker:
    """The interface (and the no-op behaviour) shared by every rank's tracker."""

    run_id: Optional[str] = None
    uri: Optional[str] = None

    def start(self, run_id: Optional[str] = None, params: Optional[dict[str, Any]] = None,
              tags: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Open the job's run (``run_id``: continue that run); returns the run id if known."""
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``{name: value}`` at ``step``; never blocks, never raises."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags."""

    def log_artifact(self, path: Union[str, os.PathLike], artifact_path: Optional[str] = None) -> None:
        """Queue a file or directory upload."""

    def flush(self, timeout: float = 30.0, wait_for_server: bool = False) -> bool:
        """Wait up to ``timeout`` s until everything queued is sent; True when it was."""
        return True

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Flush, mark the run ``status`` (FINISHED, FAILED or KILLED) and stop the thread."""
        return True


class NullTracker(Tracker):
    """Ranks other than 0, or ``tracking.enabled: false``: every method does nothing."""


class _Disabled(Exception):
    """The run cannot be opened at all (e.g. a deleted experiment): stop tracking."""


@dataclass
class _Op:
    kind: str  # "ensure_run" | "params" | "tags" | "artifact" | "terminate"
    payload: Any = None
    description: str = ""


@dataclass
class _Stats:
    sent_metrics: int = 0
    failed_sends: int = 0  # attempts that failed for a transient reason (outage)
    dropped_metrics: int = 0  # buffer overflow
    rejected_metrics: int = 0  # invalid key/value, or refused by the server
    warned: set = field(default_factory=set)


_MetricItem = tuple  # (key, value, timestamp_ms, step): plain tuples keep log_metrics cheap


class MLflowTracker(Tracker):
    """Rank 0's tracker: a queue and one sender thread around ``MlflowClient`` (see module doc)."""

    def __init__(self, uri: str, experiment: str = "slam-pretrain", run_name: Optional[str] = None,
                 *, max_buffered: int = 200_000, retry_min_s: float = 1.0, retry_max_s: float = 30.0,
                 state_file: Union[str, os.PathLike, None] = None) -> None:
        self.uri = uri
        self.state_file = Path(state_file) if state_file is not None else None
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: Optional[str] = None
        self.max_buffered = max_buffered
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._items: deque[Union[_MetricItem, _Op]] = deque()
        self._n_metrics = 0  # metric tuples in _items
        self._cv = threading.Condition()
        self._wake = threading.Event()  # cuts a backoff sleep short (flush, finish)
        self._first_attempt = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._disabled = False
        self._finished = False
        self._resume = False
        self._client: Any = None
        self._outage_since: Optional[float] = None
        self._reached = False  # some operation has succeeded (the server answered at least once)
        self._overflowing = False
        self._failures = 0  # failed sends so far (flush watches it)
        self.stats = _Stats()
        self.experiment_id: Optional[str] = None
        # This thread is the only retry policy (see module doc); a user's explicit setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # set_terminated() would print "View run ... at: URL" on stdout; run_url has it instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    @property
    def run_url(self) -> Optional[str]:
        """The run's page on a tracking server (None for a local store or before the run exists)."""
        if self.run_id is None or self.experiment_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{redact_uri(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def unreachable(self) -> bool:
        """True while the last send failed for a transient reason (an outage is under way)."""
        return self._outage_since is not None

    # -- the training side: cheap, non-blocking ---------------------------------------------

    def start(self, run_id: Optional[str] = None, params: Optional[dict[str, Any]] = None,
              tags: Optional[dict[str, Any]] = None, wait_s: float = 30.0) -> Optional[str]:
        """Create the run (or continue ``run_id``) in the background; wait for the first try only.

        Returns the run id, or None when a new run could not be created yet (the sender keeps
        retrying; ``self.run_id`` holds the id once it exists).
        """
        if self._thread is not None:
            raise RuntimeError("MLflowTracker.start() called twice")
        self.run_id = run_id
        self._resume = run_id is not None
        params = {k: _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH) for k, v in (params or {}).items()}
        self._push(_Op("ensure_run", description="open the run"))
        if params:
            self._push(_Op("params", params, "log params"))
        if tags:
            self._push(_Op("tags", {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
                           "set tags"))
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self._first_attempt.wait(wait_s)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._disabled or self._finished:
            return
        try:
            self._enqueue_metrics(metrics, int(step))
        except Exception as e:  # noqa: BLE001 - a tracking bug must not end a training run
            self._warn_once(("log_metrics", type(e).__name__), f"log_metrics failed ({_first_line(e)}); skipped")

    def _enqueue_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)  # fixed here: a retried batch is then an exact duplicate
        items = []
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                v = None
            if v is None or not valid_key(key):
                self.stats.rejected_metrics += 1
                self._warn_once(("bad-metric", key), f"metric {key!r}={value!r} is not a valid MLflow "
                                "metric (numeric value; letters, digits, _ - . / : space in the name); skipped")
                continue
            items.append((key, v, ts, step))
        if not items:
            return
        with self._cv:
            room = self.max_buffered - self._n_metrics
            if room < len(items):
                self.stats.dropped_metrics += len(items) - max(room, 0)
                items = items[: max(room, 0)]
                if not self._overflowing:
                    self._overflowing = True
                    _warn(f"buffer full ({self.max_buffered} metric values not yet sent to {self.uri}); "
                          "dropping new values until MLflow catches up (metrics.jsonl still has them)")
            self._items.extend(items)
            self._n_metrics += len(items)
            self._cv.notify_all()

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags and not (self._disabled or self._finished):
            self._push(_Op("tags", {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
                           "set tags"))

    def log_artifact(self, path: Union[str, os.PathLike], artifact_path: Optional[str] = None) -> None:
        if not (self._disabled or self._finished):
            self._push(_Op("artifact", (str(path), artifact_path), f"upload {path}"))

    def pending(self) -> int:
        """Operations and metric values not yet sent."""
        with self._cv:
            return len(self._items)

    def flush(self, timeout: float = 30.0, wait_for_server: bool = False) -> bool:
        """Send everything queued; True when the queue is empty.

        During a known outage this tries once more and returns False at the first failure, so a
        checkpoint is not delayed by ``timeout`` every time; ``wait_for_server`` keeps retrying
        until ``timeout`` instead (``finish`` does that).
        """
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        with self._cv:
            failures0 = self._failures
            while self._items:
                if self._disabled or not self._thread.is_alive():
                    return False
                if not wait_for_server and self._failures > failures0:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()  # retry now instead of finishing a backoff sleep
                self._cv.wait(min(left, 0.5))
            return True

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        if self._thread is None or self._finished:
            return True
        if status not in RUN_STATUSES:
            _warn(f"finish(status={status!r}) is not one of {', '.join(RUN_STATUSES)}; using FAILED")
            status = "FAILED"
        self._push(_Op("terminate", status, f"mark the run {status}"))
        self._finished = True
        # A server that never answered gets one more try (bounded), not the whole timeout: the
        # exit of a run with an unreachable tracking URI must not stall. One that answered before
        # is in an outage it may recover from: keep retrying for ``timeout``.
        never_reached = not self._reached
        if never_reached:
            ok = self.flush(min(timeout, UNREACHABLE_EXIT_WAIT_S), wait_for_server=False)
        else:
            ok = self.flush(timeout, wait_for_server=True)
        with self._cv:
            left_metrics, left_ops = self._n_metrics, len(self._items) - self._n_metrics
            self._stop = True
            self._cv.notify_all()
        self._wake.set()
        if not ok and not self._disabled:
            what = (f"{left_metrics} metric values and {left_ops} other operations (creating the run, params, "
                    "tags, artifacts, its final status) were not sent")
            if never_reached and not self._reached:
                _warn(f"MLflow at {self.uri} was unreachable for the whole run: {what} "
                      "(metrics.jsonl has every metric)")
            else:
                _warn(f"MLflow at {self.uri} did not take everything within {timeout:.0f} s: {what} "
                      "and are lost (metrics.jsonl has every metric)")
        self._thread.join(timeout=5)
        atexit.unregister(self._atexit)
        return ok

    def _atexit(self) -> None:
        # The trainer normally calls finish(); a process that exits without it ended abnormally.
        if not self._finished:
            self.finish("FAILED", timeout=10)

    # -- the sender thread ------------------------------------------------------------------

    def _push(self, op: _Op) -> None:
        with self._cv:
            self._items.append(op)
            self._cv.notify_all()

    def _warn_once(self, key: Any, msg: str) -> None:
        if key not in self.stats.warned:
            self.stats.warned.add(key)
            _warn(msg)

    def _next(self) -> Optional[Union[list[_MetricItem], _Op]]:
        """The head of the queue (a run of up to 1000 metric values, or one op), not removed."""
        with self._cv:
            while not self._items and not self._stop:
                self._cv.wait()
            if not self._items:
                return None
            head = self._items[0]
            if isinstance(head, _Op):
                return head
            batch = []
            for item in self._items:
                if isinstance(item, _Op) or len(batch) == MAX_METRICS_PER_BATCH:
                    break
                batch.append(item)
            return batch

    def _pop(self, n: int, metrics: int) -> None:
        with self._cv:
            for _ in range(n):
                self._items.popleft()
            self._n_metrics -= metrics
            if self._overflowing and self._n_metrics < self.max_buffered // 2:
                self._overflowing = False
            self._cv.notify_all()

    def _loop(self) -> None:
        backoff = self.retry_min_s
        while True:
            work = self._next()
            if work is None:
                return
            n_metrics = len(work) if isinstance(work, list) else 0
            try:
                self._execute(work)
            except _Disabled as e:
                self._disable(str(e))
                return
            except Exception as e:  # noqa: BLE001 - anything from the store/network must not escape
                self._first_attempt.set()
                if not self._transient(e):
                    self._reached = True  # the server answered (with a refusal)
                    what = "send metrics" if isinstance(work, list) else work.description
                    self.stats.rejected_metrics += n_metrics
                    self._warn_once(("rejected", what, getattr(e, "error_code", type(e).__name__)),
                                    f"MLflow at {self.uri} refused to {what} ({_first_line(e)}); skipped")
                    self._pop(len(work) if isinstance(work, list) else 1, n_metrics)
                    if isinstance(work, _Op) and work.kind == "ensure_run":
                        self._disable("no run to log to")
                        return
                    continue
                with self._cv:
                    self._wake.clear()  # a wake-up asked for during this attempt was this attempt
                    self._failures += 1
                    self.stats.failed_sends += 1
                    self._cv.notify_all()
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    _warn(f"MLflow at {self.uri} is unreachable ({_first_line(e)}); training continues, "
                          "metrics are buffered and retried in the background")
                with self._cv:
                    if self._stop:  # finish() gave up waiting
                        return
                self._wake.wait(backoff)
                self._wake.clear()
                with self._cv:
                    if self._stop:  # woken by finish() giving up: no further attempt
                        return
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            self._first_attempt.set()
            self._reached = True
            backoff = self.retry_min_s
            self._pop(len(work) if isinstance(work, list) else 1, n_metrics)
            self.stats.sent_metrics += n_metrics
            if self._outage_since is not None:
                _warn(f"MLflow at {self.uri} is reachable again after {time.monotonic() - self._outage_since:.0f} s; "
                      "sending the buffered metrics"
                      + (f" ({self.stats.dropped_metrics} values were dropped on overflow)"
                         if self.stats.dropped_metrics else ""))
                self._outage_since = None

    def _disable(self, why: str) -> None:
        self._disabled = True
        self._first_attempt.set()
        with self._cv:
            self._items.clear()
            self._n_metrics = 0
            self._cv.notify_all()
        _warn(f"MLflow tracking disabled for this job: {why}")

    @staticmethod
    def _transient(e: BaseException) -> bool:
        """Worth retrying: no HTTP status (network, DB lock, ...), 429 or 5xx."""
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):
            code = e.get_http_status_code()
            return code == 429 or code >= 500
        return not isinstance(e, (TypeError, ValueError, FileNotFoundError))

    # -- the operations (run in the sender thread only) -------------------------------------

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # MLflow configures its loggers at import; its INFO lines (DB migrations, ...) stay
            # out of the training log.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            db = sqlite_path(self.uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _execute(self, work: Union[list[_MetricItem], _Op]) -> None:
        from mlflow.entities import Metric, Param

        client = self._get_client()
        if isinstance(work, list):
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in work])
            return
        if work.kind == "ensure_run":
            self._ensure_run(client)
        elif work.kind == "params":
            existing = client.get_run(self.run_id).data.params
            new = {k: v for k, v in work.payload.items() if k not in existing and valid_key(k)}
            changed = {f"param_changed/{k}": _truncate(v, MAX_TAG_VAL_LENGTH)
                       for k, v in work.payload.items() if k in existing and existing[k] != v}
            items = sorted(new.items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_TAGS_PER_BATCH]])
            if changed:
                self._log_tags(client, changed)
        elif work.kind == "tags":
            self._log_tags(client, {k: v for k, v in work.payload.items() if valid_key(k)})
        elif work.kind == "artifact":
            path, artifact_path = work.payload
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} no longer exists")
            if os.path.isdir(path):
                client.log_artifacts(self.run_id, path, artifact_path)
            else:
                client.log_artifact(self.run_id, path, artifact_path)
        elif work.kind == "terminate":
            if self.run_id is not None:
                client.set_terminated(self.run_id, status=work.payload)

    def _log_tags(self, client: Any, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = sorted(tags.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items[i:i + MAX_PARAMS_TAGS_PER_BATCH]])

    def _ensure_run(self, client: Any) -> None:
        self._close_orphan(client)
        self._open_run(client)
        self._write_state()

    def _open_run(self, client: Any) -> None:
        from mlflow.exceptions import MlflowException

        if self.run_id is not None and self._resume:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as e:
                if e.get_http_status_code() not in (400, 404):  # 400: not even a valid run id
                    raise
                _warn(f"run {self.run_id} from the checkpoint is not in {self.uri} ({_first_line(e)}); "
                      "starting a new run")
                run = None
            if run is not None:
                if run.info.lifecycle_stage != "active":
                    raise _Disabled(f"run {self.run_id} is deleted in {self.uri}; restore it "
                                    "(mlflow runs restore) or delete the checkpoint's run id")
                client.update_run(self.run_id, status="RUNNING")
                self.experiment_id = run.info.experiment_id
                return
            self._resume = False
            self.run_id = None
        if self.run_id is not None:  # created by an earlier attempt of this op
            return
        exp_id = self._experiment_id(client)
        run = client.create_run(exp_id, run_name=self.run_name)
        self.experiment_id = exp_id
        self.run_id = run.info.run_id

    def _read_state(self) -> dict[str, Any]:
        if self.state_file is None:
            return {}
        try:
            d = json.loads(self.state_file.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        """Record the run this out_dir logs to (tmp + rename), for ``_close_orphan`` next time."""
        if self.state_file is None or self.run_id is None:
            return
        data = {"uri": redact_uri(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id}
        if self._read_state() == data:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, self.state_file)
        except OSError as e:
            self._warn_once(("state-file", type(e).__name__), f"cannot write {self.state_file} ({e}); a run "
                            "killed before its first checkpoint will stay RUNNING in MLflow")

    def _close_orphan(self, client: Any) -> None:
        """Mark KILLED the run an earlier attempt in this out_dir left RUNNING.

        A job killed before its first checkpoint (SIGKILL, OOM, node loss) never calls finish(),
        and no checkpoint names its run, so the next start opens a new run and the old one would
        stay RUNNING forever. The state file names it; a run being continued is left alone.
        """
        from mlflow.exceptions import MlflowException

        old = self._read_state()
        old_id = old.get("run_id")
        if not old_id or old_id == self.run_id or old.get("uri") != redact_uri(self.uri):
            return
        try:
            run = client.get_run(old_id)
        except MlflowException as e:
            if e.get_http_status_code() in (400, 404):  # deleted meanwhile: nothing to close
                return
            raise
        if run.info.status == "RUNNING":
            client.set_terminated(old_id, status="KILLED")
            _warn(f"run {old_id} was left RUNNING by an earlier attempt in this out_dir that ended without "
                  "finishing (killed before its first checkpoint): marked KILLED")

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            db = sqlite_path(self.uri)
            location = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it meanwhile
                    raise
                exp = client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage != "active":
            raise _Disabled(f"experiment {self.experiment!r} is deleted in {self.uri}; restore it "
                            "(mlflow experiments restore) or set tracking.experiment to another name")
        return exp.experiment_id


def make_tracker(cfg: "Config", is_main: bool, out_dir: Union[str, os.PathLike, None] = None) -> Tracker:
    """Rank 0 (``is_main``) with tracking enabled gets an ``MLflowTracker``, others a ``NullTracker``.

    ``out_dir`` (default ``run.out_dir``) holds the default SQLite store.
    """
    if not is_main or not cfg.tracking.enabled:
        return NullTracker()
    out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
    uri = resolve_tracking_uri(cfg.tracking.uri, out)
    return MLflowTracker(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                         state_file=out / RUN_STATE_FILE)
