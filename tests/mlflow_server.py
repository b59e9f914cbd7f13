"""A real ``mlflow server`` on 127.0.0.1 for tests (tracking tests, SLURM tests).

    server = MlflowServer(tmp_path / "mlflow")   # sqlite backend + artifacts under that dir
    server.start()                               # free port, waits until /health answers
    server.uri                                   # "http://127.0.0.1:PORT"
    server.stop(); server.start()                # outage: same port, same database
    server.close()                               # or use it as a context manager

The server runs in its own process group (killed as a group: ``mlflow server`` spawns uvicorn).
Its job runner (huey consumers, 7 processes) is switched off with
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: tracking does not need it and the CI box has 2 cores.
Startup takes ~5-10 s on 2 cores (two Python imports of mlflow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from dist_utils import free_port


def _mlflow_exe() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """``mlflow server`` with a SQLite backend under ``root``; restartable on the same port."""

    def __init__(self, root: os.PathLike | str, port: Optional[int] = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.db = self.root / "mlflow.db"
        self.log_path = self.root / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.db.resolve()}"

    def answers(self) -> bool:
        """True when GET /health returns 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        """Start the server and wait until it answers; raises RuntimeError with the log tail."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = _mlflow_exe() + [
            "server", "--host", self.host, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str((self.root / "artifacts").resolve()),
        ]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.root, env=env, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mlflow server on port {self.port} did not come up within {timeout:.0f} s:\n{tail}")

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server's whole process group (SIGTERM, or SIGKILL with ``kill``); waits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # uvicorn may outlive the parent for a moment: wait until the port stops answering.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + timeout
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.proc = None

    def restart(self, timeout: float = 90.0) -> "MlflowServer":
        self.stop()
        return self.start(timeout)

    close = stop

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
