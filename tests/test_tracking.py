"""MLflow tracking against a real ``mlflow server`` on loopback and the default SQLite store.

Every value is read back with ``MlflowClient``; the outage case stops the server mid-run (first
frozen with SIGSTOP, so MLflow's asynchronous requests hang; then killed), keeps logging, restarts
it on the same port and checks that every step arrives exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from mlflow_server import MlflowServer, free_port
from slam_pretrain.config import Config
from slam_pretrain.training.tracking import (HTTP_ENV, MLflowTracker, NullTracker, make_tracker, resolve_tracking_uri,
                                    run_params, run_tags)

KEYS = ("train/loss", "perf/tokens_per_s")
# MLflow's SQLAlchemy store trips a SQLAlchemy deprecation warning (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch):
    """Each test starts without the HTTP settings a tracker sets, and leaves none behind."""
    for name in HTTP_ENV:
        monkeypatch.setenv(name, "")  # records the original value, restored at teardown
        monkeypatch.delenv(name)


def _env_changes(before: dict[str, str]) -> dict[str, object]:
    return {k: os.environ.get(k) for k in set(before) | set(os.environ) if os.environ.get(k) != before.get(k)}


def _log_steps(tracker: MLflowTracker, steps: range) -> float:
    """Log KEYS at each step; returns the slowest log_metrics call in seconds."""
    worst = 0.0
    for s in steps:
        t0 = time.perf_counter()
        tracker.log_metrics({"train/loss": 10.0 / (s + 1), "perf/tokens_per_s": 1000.0 + s}, step=s)
        worst = max(worst, time.perf_counter() - t0)
    return worst


def _assert_steps_once(client, run_id: str, steps: range) -> None:
    for key in KEYS:
        hist = client.get_metric_history(run_id, key)
        counts = Counter(m.step for m in hist)
        assert sorted(counts) == list(steps), f"{key}: steps {sorted(set(steps) - set(counts))[:10]} missing"
        dup = {s: c for s, c in counts.items() if c != 1}
        assert not dup, f"{key}: steps logged more than once: {dup}"
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert loss[steps[-1]] == pytest.approx(10.0 / (steps[-1] + 1))


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_server_lifecycle_outage_and_resume(tmp_path: Path, capfd, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = Config()
    params, tags = run_params(cfg), run_tags(cfg, world_size=2)
    server = MlflowServer(tmp_path / "server")
    # Credentials in the URI (the server ignores them): no line on stdout or stderr may show them,
    # neither ours nor MLflow's (its line per failed async batch, set_terminated's run URL).
    secret = "pw-" + os.urandom(6).hex()
    uri = f"http://trainer:{secret}@127.0.0.1:{server.port}"
    printed = []
    try:
        # 1. The server is not up yet: start() returns quickly without a run, training goes on.
        tracker = MLflowTracker(uri, "slam-test", "lifecycle", retry_min_s=0.2, retry_max_s=1.0)
        t0 = time.monotonic()
        assert tracker.start(None, params, tags, wait_s=20) is None
        assert time.monotonic() - t0 < 10
        assert _log_steps(tracker, range(0, 20)) < 0.25
        server.start()
        assert tracker.flush(60), "queue not drained after the server came up"
        run_id = tracker.run_id
        assert run_id
        client = MlflowClient(tracking_uri=server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and run.info.run_name == "lifecycle"
        assert tracker.run_url == f"http://***@127.0.0.1:{server.port}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        assert run.data.params == params
        assert run.data.params["model.d_model"] == str(cfg.model.d_model)
        for key in ("engine", "world_size", "slurm_job_id", "git_commit", "host"):
            assert key in run.data.tags, key
        assert run.data.tags["world_size"] == "2" and run.data.tags["slurm_job_id"] == "4242"
        assert run.data.tags["engine"] == cfg.engine.name
        _assert_steps_once(client, run_id, range(0, 20))
        art = tmp_path / "resolved.yaml"
        art.write_text(cfg.to_yaml())
        tracker.log_artifact(art)
        _log_steps(tracker, range(20, 40))
        assert tracker.flush(30)
        assert [a.path for a in client.list_artifacts(run_id)] == ["resolved.yaml"]

        # 2. Outage, first a frozen server (requests hang), then a dead one: logging never blocks;
        # the values of MLflow's asynchronous batches that fail go into the outage buffer.
        printed.append(capfd.readouterr())
        os.killpg(server.proc.pid, signal.SIGSTOP)
        worst = _log_steps(tracker, range(40, 140))
        time.sleep(1.0)  # the sender is now stuck in a request to the frozen server
        worst = max(worst, _log_steps(tracker, range(140, 160)))
        os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop(kill=True)
        _wait(lambda: tracker.unreachable, 40, "the sender to notice the outage")
        worst = max(worst, _log_steps(tracker, range(160, 400)))
        assert worst < 0.25, f"log_metrics blocked for {worst:.3f} s during the outage"
        assert tracker.pending() > 0
        t0 = time.monotonic()  # a checkpoint's flush during an outage: one retry, False, no stall
        assert not tracker.flush(30)
        assert time.monotonic() - t0 < 5

        # 3. The server comes back on the same port: everything arrives, exactly once, in order.
        server.start()
        assert tracker.flush(60)
        _assert_steps_once(client, run_id, range(0, 400))
        printed.append(capfd.readouterr())
        err = printed[-1].err
        assert err.count("is unreachable") == 1, err
        assert "reachable again" in err
        assert tracker.finish("FINISHED", timeout=30)
        assert client.get_run(run_id).info.status == "FINISHED"

        # 4. A resumed job continues the same run; a changed param becomes a tag.
        resumed = dict(params, **{"train.max_steps": "999", "extra.new_key": "1"})
        tracker2 = MLflowTracker(uri, "slam-test", "lifecycle", retry_min_s=0.2, retry_max_s=1.0)
        assert tracker2.start(run_id, resumed, dict(tags, slurm_job_id="4243")) == run_id
        _log_steps(tracker2, range(400, 410))
        assert tracker2.flush(30)
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
        assert run.data.params["train.max_steps"] == params["train.max_steps"]
        assert run.data.params["extra.new_key"] == "1"
        assert run.data.tags["param_changed/train.max_steps"] == "999"
        assert run.data.tags["slurm_job_id"] == "4243"
        assert tracker2.finish("KILLED", timeout=30)
        _assert_steps_once(client, run_id, range(0, 410))
        assert client.get_run(run_id).info.status == "KILLED"
        assert len(client.search_runs([run.info.experiment_id])) == 1  # one run for the whole job
        printed.append(capfd.readouterr())
        shown = "".join(c.out + c.err for c in printed)
        assert secret not in shown and "Failed to log run data" not in shown and "View run" not in shown, shown
    finally:
        server.stop(kill=True)


def test_default_sqlite_store(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    cfg.run.out_dir = str(tmp_path / "run")
    assert isinstance(make_tracker(cfg, is_main=False), NullTracker)
    tracker = make_tracker(cfg, is_main=True)
    assert isinstance(tracker, MLflowTracker)
    assert tracker.uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    before = dict(os.environ)
    run_id = tracker.start(None, run_params(cfg), run_tags(cfg, world_size=1))
    assert run_id
    _log_steps(tracker, range(1500))  # more than one 1000-metric batch
    tracker.log_metrics({"bad key!": 1.0, "train/text": "not a number"}, step=0)  # skipped, no raise
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt")
    assert tracker.finish("FINISHED", timeout=60)
    assert _env_changes(before) == {}  # a local store needs no process-wide setting
    assert tracker.stats.rejected_metrics == 2
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run.name
    assert run.data.params["run.out_dir"] == cfg.run.out_dir
    _assert_steps_once(client, run_id, range(1500))
    assert (tmp_path / "run" / "mlflow.db").is_file()
    # Artifacts sit next to the database, not in the current directory.
    assert list((tmp_path / "run" / "mlartifacts").rglob("note.txt"))


def test_uri_resolution_and_overflow(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, "rel/out") == f"sqlite:///{Path('rel/out/mlflow.db').resolve()}"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == f"sqlite:///{Path('x.db').resolve()}"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"

    # Nothing listens on this port: the buffer fills, new values are dropped with one warning.
    tracker = MLflowTracker(f"http://127.0.0.1:{free_port()}", "x", max_buffered=50,
                            retry_min_s=0.2, retry_max_s=0.5)
    assert tracker.start(None, {"a": 1}, {"b": "2"}, wait_s=10) is None
    _log_steps(tracker, range(40))
    assert tracker.stats.dropped_metrics == 30
    assert not tracker.finish("FINISHED", timeout=1)
    err = capfd.readouterr().err
    assert err.count("buffer full") == 1 and err.count("is unreachable") == 1, err
    assert "unreachable for the whole run: 50 metric values and 3 other operations" in err
    NullTracker().log_metrics({"x": 1.0}, step=0)  # the other ranks' tracker: a no-op


def test_unreachable_throughout_exits_without_stall_and_hides_credentials(tmp_path: Path, capfd, monkeypatch) -> None:
    """Issue 10.12 and 10.3: a server that never answered gets one last try at exit (it used to be
    retried for the whole 60 s exit timeout), the not-sent count is one line, and no warning shows
    the password in the URI. Asserted on counts, not on time."""
    secret = "pw-" + os.urandom(6).hex()
    uri = f"http://trainer:{secret}@127.0.0.1:{free_port()}"
    # Long backoff: the sender retries only when flush()/finish() wake it, so the count below is
    # what finish() itself caused.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting
    before = dict(os.environ)
    tracker = MLflowTracker(uri, "x", retry_min_s=600, retry_max_s=600)
    assert _env_changes(before) == {}  # constructing a tracker changes nothing
    assert tracker.start(None, {"a": 1}, {"b": "2"}, wait_s=20) is None
    # Only the HTTP settings MLflow reads from nowhere else, only those unset (see tracking.py).
    assert _env_changes(before) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    _log_steps(tracker, range(12))
    tracker.log_artifact(tmp_path)
    assert not tracker.flush(30)  # a checkpoint's flush: one retry, then False
    failed = tracker.stats.failed_sends
    assert not tracker.finish("FINISHED", timeout=60)
    assert tracker.stats.failed_sends - failed <= 1  # one last try, not a minute of retries
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tracking:")]
    assert sum("is unreachable" in line for line in lines) == 1, err
    done = [line for line in lines if "unreachable for the whole run" in line]
    assert len(done) == 1 and "24 metric values and 4 other operations (creating the run, its params and tags, " \
        "artifacts, its final status) were not sent" in done[0], err
    assert secret not in err and "http://***@127.0.0.1:" in err


def test_redaction_of_uris_configs_and_messages() -> None:
    from slam_pretrain.redact import redact, redact_text, redact_uri

    assert redact_uri("http://user:pw@host:5000/x?token=abc&page=2") == "http://***@host:5000/x?token=***&page=2"
    assert redact_uri("https://ghp_TOKEN@host") == "https://***@host"
    signed = "https://b.s3.amazonaws.com/d/?X-Amz-Signature=abc&X-Amz-Credential=k1&X-Amz-Date=2026"
    assert redact_uri(signed) == "https://b.s3.amazonaws.com/d/?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Date=2026"
    for name in ("key", "secret", "password", "sig", "access_token", "api_key", "client_secret"):
        assert redact_uri(f"https://h/p?{name}=s3cr3t&n=1") == f"https://h/p?{name}=***&n=1"
    for plain in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "data/stdlib", "https://h/d?page=2"):
        assert redact_uri(plain) == plain
    assert redact_text("API request to http://u:s3cr3t@h:1/api failed") == "API request to http://***@h:1/api failed"
    cfg = Config()
    cfg.tracking.uri = "http://u:s3cr3t@h:5000"
    cfg.data.dataset_dir = "https://h/ds/?token=s3cr3t"
    assert "s3cr3t" not in cfg.to_yaml() and "s3cr3t" not in str(run_params(cfg))
    assert run_params(cfg)["tracking.uri"] == "http://***@h:5000"
    assert cfg.tracking.uri == "http://u:s3cr3t@h:5000"  # the value used to connect is unchanged
    assert redact({"a": ["http://u:p@h", 1]}) == {"a": ["http://***@h", 1]}
