"""Run the real ``slam-pretrain train`` in subprocesses (1 process, or torchrun with N) for tests.

Nothing is faked: the CLI, the engine, the loader and the checkpoint code are the shipped ones;
SIGKILL goes to the whole process group, as a node failure would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a step takes tens of milliseconds on one CPU core.
TINY_MODEL = ["model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
              "model.ef_cycles=2", "model.segment_len=48", "model.overlap=8"]


def train_cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "slam_pretrain", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "slam_pretrain", "train", *args]


def base_overrides(manifest: Path, out_dir: Path, *, engine: str = "deepspeed", zero: int = 1,
                   steps: int = 8, micro: int = 4, global_batch: int = 16, interval: int = 4) -> list[str]:
    sets = [*TINY_MODEL, f"data.dataset_dir={manifest.parent}", "data.num_workers=1",
            f"run.out_dir={out_dir}", f"engine.name={engine}", f"engine.zero_stage={zero}",
            "engine.precision=fp32", "engine.device=cpu", f"train.max_steps={steps}",
            f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}", "train.warmup_steps=2",
            "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=2",
            f"checkpoint.interval={interval}", "checkpoint.keep_last=3", "tracking.enabled=false"]
    out = ["--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    for s in sets:
        out += ["--set", s]
    return out


def env_for_tests(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "SLAM_DIST_TIMEOUT_S": "120"})
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]  # a test run inside a SLURM job must not pick the job's layout up
    env.update(extra or {})
    return env


def run_train(nproc: int, args: list[str], *, timeout: float = 300, env: Optional[dict[str, str]] = None,
              resume: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd = train_cmd(nproc, args + (["--resume", resume] if resume else []))
    r = subprocess.run(cmd, cwd=REPO, env=env_for_tests(env), capture_output=True, text=True, timeout=timeout)
    return r


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant: torchrun starts its workers in their own sessions,
    so killing its process group alone would leave them running."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)  # the launcher first: it must not see the workers die
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # Reap only the descendants here: waiting on the root through psutil would steal its exit
    # status from Popen (which then reports 0).
    psutil.wait_procs(procs[1:], timeout=30)


def run_and_kill(nproc: int, args: list[str], out_dir: Path, *, when, timeout: float = 300,
                 env: Optional[dict[str, str]] = None) -> tuple[int, str]:
    """Start a run, SIGKILL all its processes as soon as ``when(out_dir)`` is true; (returncode, log)."""
    log = out_dir.parent / f"{out_dir.name}.killed.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(train_cmd(nproc, args), cwd=REPO, env=env_for_tests(env), stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while p.poll() is None and time.monotonic() < deadline:
                if when(out_dir):
                    kill_tree(p.pid)
                    break
                time.sleep(0.01)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait()
    return p.returncode, log.read_text()


def latest_step(out_dir: Path) -> Optional[int]:
    try:
        return int((out_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    except (FileNotFoundError, ValueError):
        return None


def losses(out_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (validation records left out)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") != "val" and "event" not in rec:  # events: branch, context phase
            out[rec["step"]] = rec["loss"]
    return out
