"""Faults and bad input through the real CLI (issue 10): every failure is one clear line, nothing
is silently wrong, nothing leaks.

Real runs of ``slam-pretrain`` (DeepSpeed on the CPU), a real ``mlflow server`` on loopback, real
SIGKILLs. Assertions are on exit codes, messages, files, run states and counts, never on
wall-clock time (timeouts below only guard against hangs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from mlflow_server import MlflowServer, free_port
from train_utils import REPO, base_overrides, env_for_tests, kill_tree, run_train, train_cmd

# MLflow's SQLAlchemy store trips a SQLAlchemy deprecation warning (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _with(args: list[str], *sets: str) -> list[str]:
    out = list(args)
    for s in sets:
        out += ["--set", s]
    return out


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _one_line_error(r: subprocess.CompletedProcess, command: str) -> str:
    """The single ``slam-pretrain CMD: error: ...`` line of a user error (exit 2, no traceback)."""
    assert r.returncode == 2, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"slam-pretrain {command}: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout  # a hang guard only
    while not cond():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_faults"))
    srv.start()
    yield srv
    srv.stop(kill=True)


def _copy_dataset(manifest: Path, dst: Path) -> Path:
    shutil.copytree(manifest.parent, dst)
    return dst / "manifest.json"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.

def test_damaged_tokenizer_stops_training_at_start_naming_the_file(tiny_manifest, tmp_path):
    """10.2: noticed only when the final export read a checkpoint's copy (blaming the checkpoint)."""
    manifest = _copy_dataset(tiny_manifest, tmp_path / "ds")
    tok = manifest.parent / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[len(data) // 3] ^= 0x5A
    tok.write_bytes(bytes(data))
    out = tmp_path / "run"
    line = _one_line_error(run_train(1, base_overrides(manifest, out, steps=2, interval=2)), "train")
    assert f"dataset file {tok} is damaged or was replaced" in line and "re-run `slam-pretrain prepare`" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_binary_file_as_txt_is_one_line_from_prepare(tmp_path):
    """10.9: was "lower model.vocab_size"."""
    blob = tmp_path / "scan.txt"
    blob.write_bytes(os.urandom(200_000))
    ds = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "slam_pretrain", "prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
                        "--set", f"data.sources=[{{path: {blob}}}]", "--set", f"data.dataset_dir={ds}"],
                       cwd=REPO, env=env_for_tests(), capture_output=True, text=True, timeout=300)
    line = _one_line_error(r, "prepare")
    assert f"data.sources[0]: {blob} is not text" in line and "vocab_size" not in line
    assert not (ds / "manifest.json").exists() and not list(ds.glob("*.tar"))


# ---------------------------------------------------------------------------------------------
# MLflow: credentials, an unreachable server, a run killed before its first checkpoint.

def test_credentials_in_tracking_uri_are_written_and_logged_nowhere(tiny_manifest, tmp_path, server):
    """10.3: the password of ``http://user:password@host`` was in the MLflow params, the uploaded
    config.yaml, every checkpoint's config.yaml, the export's model.config.yaml and warnings."""
    from mlflow.tracking import MlflowClient

    secret = "s3cr3t-" + uuid.uuid4().hex
    uri = f"http://trainer:{secret}@127.0.0.1:{server.port}"
    out = tmp_path / "run"
    args = _with(base_overrides(tiny_manifest, out, steps=4, interval=2), "tracking.enabled=true",
                 f"tracking.uri={uri}", "tracking.experiment=faults-credentials")
    r = run_train(1, args)
    _ok(r)
    assert secret not in r.stdout + r.stderr
    assert (out / "export" / "model.config.yaml").is_file() and len(list(out.glob("checkpoints/step_*"))) == 2
    assert _files_holding(out, secret) == []  # config.yaml, checkpoints, export, metrics.jsonl, ...
    assert _files_holding(server.root, secret) == []  # the server's database, artifacts and log
    assert f"uri: http://***@127.0.0.1:{server.port}" in (out / "config.yaml").read_text()

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("faults-credentials")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"  # the credentials did reach the server: the run is complete
    assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{server.port}"
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer.model", "export"} <= logged


def test_unreachable_tracking_server_no_exit_stall_and_one_count_line(tiny_manifest, tmp_path):
    """10.12: with nothing listening, training finishes (metrics.jsonl complete), the exit makes one
    last try instead of retrying for 60 s, and one line gives the exact count not sent."""
    from slam_pretrain.training.callbacks import _MLFLOW_NAMES

    secret = "pw-" + uuid.uuid4().hex
    out = tmp_path / "run"
    args = _with(base_overrides(tiny_manifest, out, steps=6, interval=3), "tracking.enabled=true",
                 f"tracking.uri=http://trainer:{secret}@127.0.0.1:{free_port()}")
    r = run_train(1, args)
    _ok(r)
    records = _records(out)
    assert [rec["step"] for rec in records if rec.get("split") != "val"] == list(range(1, 7))
    expected = sum(1 for rec in records for k, v in rec.items() if k in _MLFLOW_NAMES and v is not None)
    lines = [line for line in r.stderr.splitlines() if line.startswith("tracking:")]
    assert sum("is unreachable" in line for line in lines) == 1, r.stderr
    final = [line for line in lines if "unreachable for the whole run" in line]
    assert len(final) == 1 and f": {expected} metric values and " in final[0], r.stderr
    assert "within" not in r.stderr  # not the end of a long wait
    assert secret not in r.stdout + r.stderr and _files_holding(out, secret) == []


def test_run_killed_before_first_checkpoint_is_marked_killed_on_next_start(tiny_manifest, tmp_path, server):
    """10.12: a SIGKILL before the first checkpoint left the MLflow run RUNNING for ever."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    out = tmp_path / "run"
    tracking = ("tracking.enabled=true", f"tracking.uri={server.uri}", "tracking.experiment=faults-orphan")

    def first_run_logging() -> bool:
        exp = client.get_experiment_by_name("faults-orphan")
        if exp is None:
            return False
        runs = client.search_runs([exp.experiment_id])
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train/loss"))

    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(train_cmd(1, _with(base_overrides(tiny_manifest, out, steps=5000, interval=100000),
                                                *tracking)),
                             cwd=REPO, env=env_for_tests(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(first_run_logging, 300, "the first run's metrics in MLflow", p, log)
            assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))
        finally:
            kill_tree(p.pid)
            p.wait(30)
    exp = client.get_experiment_by_name("faults-orphan")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING"  # what the SIGKILL left

    r = run_train(1, _with(base_overrides(tiny_manifest, out, steps=2, interval=2), *tracking))
    _ok(r)
    assert r.stderr.count(f"run {killed.info.run_id} was left RUNNING") == 1, r.stderr
    runs = {run.info.run_id: run.info.status for run in client.search_runs([exp.experiment_id])}
    assert len(runs) == 2 and runs.pop(killed.info.run_id) == "KILLED"
    assert list(runs.values()) == ["FINISHED"]


# ---------------------------------------------------------------------------------------------
# Processes: nothing of a SIGKILLed trainer stays behind.

def _processes_with(marker: str) -> dict[int, str]:
    """Live processes whose environment holds ``SLAM_TEST_MARKER=marker``: {pid: command line}."""
    want = f"SLAM_TEST_MARKER={marker}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()  # empty for a zombie
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if want in env.split(b"\0"):
            found[int(entry)] = cmd
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_trainer_leaves_no_loader_worker(tiny_manifest, tmp_path):
    """10.13: the trainer alone (not its process group) gets SIGKILL mid-run; its data-loader
    workers used to stay alive, blocked writing into the dead parent's queue."""
    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    args = _with(base_overrides(tiny_manifest, out, steps=5000, interval=100000), "data.num_workers=2",
                 "data.prefetch=8")
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(train_cmd(1, args), cwd=REPO, env=env_for_tests({"SLAM_TEST_MARKER": marker}),
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(_records(out)) >= 3 and len(_processes_with(marker)) >= 3, 300,
                  "training steps with two loader workers", p, log)
        workers = set(_processes_with(marker)) - {p.pid}
        os.kill(p.pid, signal.SIGKILL)  # the trainer only: the workers get no signal from us
        p.wait(30)
        deadline = time.monotonic() + 30  # a hang guard: they should go at once
        left = _processes_with(marker)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _processes_with(marker)
        assert workers and not left, f"left running after the trainer was killed: {left}"
    finally:
        for pid in _processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
            p.wait(30)
