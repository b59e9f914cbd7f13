"""MLflow tracking on rank 0: MLflow's own asynchronous logging plus a small outage buffer.

Rank 0 gets an ``MLflowTracker``, other ranks a ``NullTracker`` with the same methods: one job
makes one MLflow run. What the trainer relies on:
- ``log_metrics`` never blocks and never raises. While the server answers, values go out with
  ``MlflowClient.log_batch(..., synchronous=False)``. What MLflow could not deliver (server down,
  timeout, 5xx, a locked SQLite file), and what is logged before the run exists, during a known
  outage or while ``MAX_IN_FLIGHT`` batches are pending, waits in the outage buffer (at most
  ``max_buffered`` values; then new ones are dropped with one warning; metrics.jsonl has all).
- One daemon thread opens the run, re-sends the buffer (1000 values a request), uploads artifacts
  and sets the final status, retrying with backoff (1 s doubling to 30 s): one line when an outage
  starts, one when it ends. A value re-sent after all arrived is harmless (its timestamp is fixed
  when logged; the store drops exact duplicates). A refusal (HTTP 4xx but 429) drops that item.
- ``flush`` (before checkpoints) waits until all is sent; in an outage it tries once more and
  returns False. ``finish`` waits up to ``timeout`` for a server that answered earlier in the run,
  else one last try (``UNREACHABLE_EXIT_WAIT_S``); one line says what was not sent.
- ``start`` waits for the first attempt to open the run only; with the server down it returns None
  and the run is created when the server is back (read ``run_id`` at checkpoints). A resumed job
  passes the checkpoint's run id: that run is set RUNNING, params it lacks are added, changed
  ones become ``param_changed/<key>`` tags (MLflow refuses to change a param).
- ``<out_dir>/mlflow_run.json`` names the run the out_dir last logged to; a run left RUNNING there
  by a job killed before its first checkpoint is marked KILLED by the next start.
- No log line shows credentials: ours go through ``slam_pretrain.redact``; MLflow's line per failed
  async batch (with the URL) is filtered out, as those values go into the buffer.

MLflow takes its HTTP retry count and timeout only from the environment (its REST store passes
none per request: ``mlflow.utils.rest_utils.call_endpoint``). Its defaults retry a failing request
for ~4 minutes and wait 120 s per silent attempt, inside async worker threads that the interpreter
joins at exit: an outage would go unseen for minutes and hold the exit as long. So ``start``
against an http(s) URI sets the ``HTTP_ENV`` variables that are unset; nothing else.
"""

from __future__ import annotations

import atexit
import itertools
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
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional, Union

from slam_pretrain.redact import redact_text, redact_uri

if TYPE_CHECKING:  # mlflow is imported lazily: ranks > 0 never pay its ~2 s import
    from slam_pretrain.config import Config

MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 1000, 6000, 8000  # MLflow's limits
MAX_IN_FLIGHT = 8  # async batches pending in MLflow at once: all a frozen server can hold
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
UNREACHABLE_EXIT_WAIT_S = 5.0
RUN_STATE_FILE = "mlflow_run.json"
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # the outage buffer is the one retry policy
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # seconds per request (default 120)
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # set_terminated() prints the URI, credentials too
}
_OPEN = "create the run"
_KEY_RE = re.compile(r"^[/\w.\- :]+$")  # what MLflow accepts in metric/param/tag keys


def _warn(msg: str) -> None:
    print(f"tracking: {redact_text(msg)}", file=sys.stderr, flush=True)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    return _truncate((str(e).strip() or type(e).__name__).splitlines()[0], 200)


def valid_key(key: Any) -> bool:
    """True when MLflow accepts ``key`` as a metric/param/tag name."""
    if not isinstance(key, str) or not key or len(key) > 250 or not _KEY_RE.match(key):
        return False
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith(("..", "/"))


def resolve_tracking_uri(uri: Optional[str], out_dir: Union[str, os.PathLike]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs out_dir>/mlflow.db``; a
    relative SQLite path is made absolute so a requeued job started elsewhere finds the same DB."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return "sqlite:///" + str((Path(out_dir) / "mlflow.db").resolve())
    rel = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") else ""
    return "sqlite:///" + str(Path(rel).resolve()) if rel and rel != ":memory:" else uri


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI, else None."""
    rest = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(rest) if rest and rest != ":memory:" else None


def ui_command(uri: str) -> str:
    """The command that shows this store's runs in a browser."""
    uri = redact_uri(uri)
    return f"open {uri} in a browser" if uri.startswith(("http://", "https://")) else \
        f"mlflow ui --backend-store-uri {uri}"


def _param_str(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, tuple, dict)) else str(value)


def run_params(cfg: "Config") -> dict[str, str]:
    """The flattened config as MLflow params, values truncated to MLflow's 6000 characters."""
    return {k: _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH) for k, v in cfg.flat().items()}


def git_commit(path: Union[str, os.PathLike, None] = None) -> Optional[tuple[str, bool]]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package), or None."""
    git = ["git", "-C", str(path or Path(__file__).resolve().parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (head.stdout.strip(), bool(status.stdout.strip())) if head.returncode == 0 else None


def run_tags(cfg: "Config", world_size: int, extra: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """Tags of the job: git commit, engine, world size, SLURM job id when present, host."""
    tags: dict[str, Any] = {"engine": cfg.engine.name, "engine.zero_stage": cfg.engine.zero_stage,
                            "engine.precision": cfg.engine.precision, "world_size": world_size,
                            "host": socket.gethostname(), "mlflow.source.name": "slam-pretrain"}
    git = git_commit()
    if git is not None:  # mlflow.source.git.commit is what the MLflow UI shows
        tags.update({"git_commit": git[0], "mlflow.source.git.commit": git[0], "git_dirty": str(git[1]).lower()})
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_RESTART_COUNT", "slurm_restart_count"), ("SLURM_JOB_NUM_NODES", "slurm_nodes")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in {**tags, **(extra or {})}.items()}


class Tracker:
    """The interface, and the no-op behaviour of ranks > 0."""

    run_id: Optional[str] = None
    uri: Optional[str] = None

    def start(self, run_id: Optional[str] = None, params: Optional[dict[str, Any]] = None,
              tags: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Open the job's run (``run_id``: continue that run); returns the run id if known."""
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``{name: value}`` at ``step``; never blocks, never raises."""

    def log_artifact(self, path: Union[str, os.PathLike], artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory in the background."""

    def flush(self, timeout: float = 30.0, wait_for_server: bool = False) -> bool:
        """Wait up to ``timeout`` s until everything logged is sent; True when it was."""
        return True

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Flush, mark the run ``status`` (FINISHED, FAILED or KILLED) and stop."""
        return True


class NullTracker(Tracker):
    """Ranks other than 0, or ``tracking.enabled: false``."""


def _quiet_resends(record: logging.LogRecord) -> bool:
    """A logging filter for MLflow's line per failed async batch (see the module doc)."""
    return "Failed to log run data" not in record.getMessage()


def _metrics(values: list[tuple]) -> list:
    from mlflow.entities import Metric

    return [Metric(*v) for v in values]


class MLflowTracker(Tracker):
    """Rank 0's tracker (see the module doc)."""

    def __init__(self, uri: str, experiment: str = "slam-pretrain", run_name: Optional[str] = None, *,
                 max_buffered: int = 200_000, retry_min_s: float = 1.0, retry_max_s: float = 30.0,
                 state_file: Union[str, os.PathLike, None] = None) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.state_file = Path(state_file) if state_file is not None else None
        self.max_buffered, self.retry_min_s, self.retry_max_s = max_buffered, retry_min_s, retry_max_s
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.stats = SimpleNamespace(failed_sends=0, dropped_metrics=0, rejected_metrics=0)
        self._client: Any = None  # set once the run exists
        self._buffer: deque = deque()  # (key, value, ms, step): the outage buffer
        self._in_flight: deque = deque()  # (RunOperations, values) handed to MLflow's async logging
        self._ops: deque = deque()  # (description, fn) in order: open the run, params, uploads, status
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._tried = threading.Event()  # the first attempt to open the run is over
        self._outage_since: Optional[float] = None
        self._warned: set = set()
        self._reached = self._retry_now = self._overflowing = self._disabled = self._finished = self._stop = False

    @property
    def run_url(self) -> Optional[str]:
        """The run's page on a tracking server (None for a local store or before the run exists)."""
        if self.run_id is None or self.experiment_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{redact_uri(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def unreachable(self) -> bool:
        """True while the last attempt failed for a transient reason (an outage is under way)."""
        return self._outage_since is not None

    def pending(self) -> int:
        """Metric values and operations not yet sent."""
        with self._cv:
            return len(self._buffer) + sum(len(v) for _, v in self._in_flight) + len(self._ops)

    def start(self, run_id: Optional[str] = None, params: Optional[dict[str, Any]] = None,
              tags: Optional[dict[str, Any]] = None, wait_s: float = 30.0) -> Optional[str]:
        if self._thread is not None:
            raise RuntimeError("MLflowTracker.start() called twice")
        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_ENV.items():  # why: the module doc
                os.environ.setdefault(name, value)
        self.run_id = run_id
        params = {k: _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH) for k, v in (params or {}).items()}
        tags = {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        self._ops.extend([(_OPEN, self._open_run), ("log params and tags", lambda: self._log_params(params, tags))])
        self._thread = threading.Thread(target=self._loop, name="mlflow-outage-buffer", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self._tried.wait(wait_s)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._disabled or self._finished:
            return
        try:
            ts, values = int(time.time() * 1000), []  # ts fixed here: a re-sent value is an exact duplicate
            for key, value in metrics.items():
                try:
                    v = float(value) if valid_key(key) else None
                except (TypeError, ValueError):
                    v = None
                if v is None:
                    self.stats.rejected_metrics += 1
                    self._warn_once(("bad-metric", key), f"metric {key!r}={value!r} is not a valid MLflow metric "
                                    "(numeric value; letters, digits, _ - . / : space in the name); skipped")
                else:
                    values.append((key, v, ts, int(step)))
            with self._cv:
                if not values:
                    return
                if (self._client is None or self._buffer or self._outage_since is not None
                        or len(self._in_flight) >= MAX_IN_FLIGHT):
                    self._hold(values)
                else:
                    ops = self._client.log_batch(self.run_id, metrics=_metrics(values), synchronous=False)
                    self._in_flight.append((ops, values))
                self._cv.notify_all()
        except Exception as e:  # noqa: BLE001 - a tracking bug must not end a training run
            self._warn_once(("log_metrics", type(e).__name__), f"log_metrics failed ({_first_line(e)}); skipped")

    def _hold(self, values: list[tuple]) -> None:
        """Into the outage buffer (under the lock), dropping what does not fit."""
        room = max(self.max_buffered - len(self._buffer) - sum(len(v) for _, v in self._in_flight), 0)
        if room < len(values):
            self.stats.dropped_metrics += len(values) - room
            if not self._overflowing:
                _warn(f"buffer full ({self.max_buffered} metric values not yet sent to {self.uri}); dropping "
                      "new values until MLflow catches up (metrics.jsonl still has them)")
            self._overflowing = True
        self._buffer.extend(values[:room])

    def log_artifact(self, path: Union[str, os.PathLike], artifact_path: Optional[str] = None) -> None:
        def upload() -> None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} no longer exists")
            (self._client.log_artifacts if os.path.isdir(path) else self._client.log_artifact)(
                self.run_id, str(path), artifact_path)

        if self._thread is not None and not (self._disabled or self._finished):
            with self._cv:
                self._ops.append((f"upload {path}", upload))
                self._cv.notify_all()

    def flush(self, timeout: float = 30.0, wait_for_server: bool = False) -> bool:
        """Send everything; True when nothing is left. In an outage one more try, then False (a
        checkpoint is not delayed by ``timeout``), unless ``wait_for_server``."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        with self._cv:
            failures = self.stats.failed_sends
            while self._buffer or self._in_flight or self._ops:
                if (self._disabled or not self._thread.is_alive() or time.monotonic() >= deadline
                        or (not wait_for_server and self.stats.failed_sends > failures)):
                    return False
                self._retry_now = True  # cut a backoff sleep short
                self._cv.notify_all()
                self._cv.wait(min(deadline - time.monotonic(), 0.5))
            return True

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        if self._thread is None or self._finished:
            return True
        if status not in RUN_STATUSES:
            _warn(f"finish(status={status!r}) is not one of {', '.join(RUN_STATUSES)}; using FAILED")
            status = "FAILED"
        with self._cv:
            self._finished = True
            self._ops.append((f"mark the run {status}", lambda: self._client.set_terminated(self.run_id, status)))
        # A server that never answered gets one bounded last try: nothing suggests it will return.
        reached = self._reached
        ok = self.flush(timeout if reached else min(timeout, UNREACHABLE_EXIT_WAIT_S), wait_for_server=reached)
        with self._cv:
            values, ops = len(self._buffer) + sum(len(v) for _, v in self._in_flight), len(self._ops)
            self._stop = True
            self._cv.notify_all()
        if not ok and not self._disabled:
            what = (f"{values} metric values and {ops} other operations (creating the run, its params and tags, "
                    "artifacts, its final status) were not sent")
            _warn(f"MLflow at {self.uri} did not take everything within {timeout:.0f} s: {what} and are lost "
                  "(metrics.jsonl has every metric)" if self._reached else
                  f"MLflow at {self.uri} was unreachable for the whole run: {what} (metrics.jsonl has every metric)")
        self._thread.join(timeout=5)
        atexit.unregister(self._atexit)
        return ok

    def _atexit(self) -> None:
        if not self._finished:  # the trainer calls finish(); a process exiting without it failed
            self.finish("FAILED", timeout=10)

    def _warn_once(self, key: Any, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _warn(msg)

    # -- the background thread --------------------------------------------------------------

    def _loop(self) -> None:
        backoff = self.retry_min_s
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._in_flight or self._ops
                                  or (self._buffer and self._client is not None))
                if self._stop:
                    return
                if self._in_flight:
                    (ops, values), fn = self._in_flight[0], None
                elif self._buffer and self._client is not None:  # before the final status
                    queue, values = self._buffer, list(itertools.islice(self._buffer, MAX_METRICS_PER_BATCH))
                    what, fn = "send metrics", lambda: self._client.log_batch(self.run_id, metrics=_metrics(values))
                else:
                    queue, values, (what, fn) = self._ops, [], self._ops[0]
            if fn is None:  # MLflow's async send: done, or its values go into the buffer
                try:
                    if ops is not None:
                        ops.wait()
                    failed = []
                except Exception:  # noqa: BLE001 - classified when re-sent from the buffer
                    failed = values
                with self._cv:
                    self._in_flight.popleft()
                    self._buffer.extendleft(reversed(failed))
                    self._cv.notify_all()
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - anything from the store/network must not escape
                if self._transient(e):
                    if not self._backoff(e, backoff):
                        return
                    backoff = min(backoff * 2, self.retry_max_s)
                    continue
                self._warn_once(("rejected", what, getattr(e, "error_code", type(e).__name__)),
                                f"MLflow at {self.uri} refused to {what} ({_first_line(e)}); skipped")
                if what == _OPEN:
                    return self._disable("no run to log to (a deleted run or experiment can be restored with "
                                         "`mlflow runs restore` or `mlflow experiments restore`)")
                self.stats.rejected_metrics += len(values)
            backoff, self._reached = self.retry_min_s, True
            with self._cv:  # sent, or refused for good: done with it
                for _ in range(len(values) or 1):
                    queue.popleft()
                self._overflowing = self._overflowing and len(self._buffer) >= self.max_buffered // 2
                self._cv.notify_all()
            self._tried.set()
            if self._outage_since is not None:
                _warn(f"MLflow at {self.uri} is reachable again after {time.monotonic() - self._outage_since:.0f} s; "
                      "sending the buffered metrics" + (f" ({self.stats.dropped_metrics} values were dropped on "
                                                        "overflow)" if self.stats.dropped_metrics else ""))
                self._outage_since = None

    def _backoff(self, e: BaseException, seconds: float) -> bool:
        """After a transient failure: one line per outage, then sleep; False once finish() gave up."""
        self._tried.set()
        with self._cv:
            self._retry_now = False  # a wake-up asked for during this attempt was this attempt
            self.stats.failed_sends += 1
            self._cv.notify_all()
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                _warn(f"MLflow at {self.uri} is unreachable ({_first_line(e)}); training continues, "
                      "metrics are buffered and retried in the background")
            self._cv.wait_for(lambda: self._retry_now or self._stop, timeout=seconds)
            self._retry_now = False
            return not self._stop

    def _disable(self, why: str) -> None:
        with self._cv:
            self._disabled = True
            self._buffer.clear()
            self._ops.clear()
            self._cv.notify_all()
        self._tried.set()
        _warn(f"MLflow tracking disabled for this job: {why}")

    @staticmethod
    def _transient(e: BaseException) -> bool:
        """Worth retrying: no HTTP status (network, DB lock, ...), 429 or 5xx."""
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):
            return e.get_http_status_code() == 429 or e.get_http_status_code() >= 500
        return not isinstance(e, (TypeError, ValueError, FileNotFoundError))

    # -- the run (in the background thread) -------------------------------------------------

    def _open_run(self) -> None:
        """Continue ``run_id`` or create the run; MLflow refuses a deleted run or experiment."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        for name in ("mlflow", "alembic"):  # their INFO lines (DB migrations, ...) stay out of the log
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("mlflow.utils.async_logging.async_logging_queue").addFilter(_quiet_resends)
        db = sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        self._close_orphan(client)
        run = self._get_run(client, self.run_id) if self.run_id else None
        if run is None and self.run_id:
            _warn(f"run {self.run_id} from the checkpoint is not in {self.uri}; starting a new run")
        if run is None:
            exp = client.get_experiment_by_name(self.experiment)
            try:  # with SQLite, artifacts go next to the database
                exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment, artifact_location=(
                    (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None))
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it meanwhile
                    raise
                exp_id = client.get_experiment_by_name(self.experiment).experiment_id
            run = client.create_run(exp_id, run_name=self.run_name)
        else:
            client.update_run(self.run_id, status="RUNNING")
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._write_state()
        with self._cv:
            self._client = client  # from now on log_metrics hands values to MLflow
            self._cv.notify_all()

    def _log_params(self, params: dict[str, str], tags: dict[str, str]) -> None:
        """New params; a changed one becomes a ``param_changed/<key>`` tag (MLflow refuses to
        change a logged param). MLflow splits the batch into requests of 100."""
        from mlflow.entities import Param, RunTag

        logged = self._client.get_run(self.run_id).data.params
        tags = {**tags, **{f"param_changed/{k}": _truncate(v, MAX_TAG_VAL_LENGTH)
                           for k, v in params.items() if k in logged and logged[k] != v}}
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in sorted(params.items())
                                                    if k not in logged and valid_key(k)],
                               tags=[RunTag(k, v) for k, v in sorted(tags.items()) if valid_key(k)])

    @staticmethod
    def _get_run(client: Any, run_id: str) -> Any:
        """The run, or None when the store has none of that id."""
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id)
        except MlflowException as e:
            if e.get_http_status_code() in (400, 404):  # 400: not even a valid run id
                return None
            raise

    def _write_state(self) -> None:
        """Record the run this out_dir logs to, for ``_close_orphan`` next time."""
        from data_pipeline.storage import atomic_write

        if self.state_file is None:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_file, json.dumps({"uri": redact_uri(self.uri), "experiment_id": self.experiment_id,
                                                      "run_id": self.run_id}) + "\n")
        except OSError as e:
            self._warn_once("state-file", f"cannot write {self.state_file} ({e}); a run killed before its "
                            "first checkpoint will stay RUNNING in MLflow")

    def _close_orphan(self, client: Any) -> None:
        """A job killed before its first checkpoint (SIGKILL, OOM, node loss) never called finish()
        and no checkpoint names its run: the state file does. Mark it KILLED if still RUNNING
        (unless it is the run being continued)."""
        try:
            old = json.loads(self.state_file.read_text()) if self.state_file is not None else {}
            old_id = old["run_id"] if old.get("uri") == redact_uri(self.uri) else None
        except (OSError, ValueError, KeyError, AttributeError):
            return
        run = self._get_run(client, old_id) if old_id and old_id != self.run_id else None
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(old_id, status="KILLED")
            _warn(f"run {old_id} was left RUNNING by an earlier attempt in this out_dir that ended without "
                  "finishing (killed before its first checkpoint): marked KILLED")


def make_tracker(cfg: "Config", is_main: bool, out_dir: Union[str, os.PathLike, None] = None) -> Tracker:
    """Rank 0 (``is_main``) with tracking enabled gets an ``MLflowTracker``, others a ``NullTracker``;
    ``out_dir`` (default ``run.out_dir``) holds the default SQLite store and ``mlflow_run.json``."""
    if not is_main or not cfg.tracking.enabled:
        return NullTracker()
    out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
    return MLflowTracker(resolve_tracking_uri(cfg.tracking.uri, out), cfg.tracking.experiment,
                         cfg.tracking.run_name or cfg.run.name, state_file=out / RUN_STATE_FILE)
