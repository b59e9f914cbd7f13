"""Faults and bad input through the real CLI (issue 10): every failure is one clear line, nothing
is silently wrong, nothing leaks.

Real runs of ``slam-pretrain`` (DeepSpeed on the CPU) and real SIGKILLs. Assertions are on exit codes, messages, files, run states and counts, never on
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

from train_utils import REPO, base_overrides, env_for_tests, kill_tree, run_train, train_cmd

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
