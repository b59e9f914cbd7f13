"""launch/slurm/train_elastic.sbatch on the local 2-node SLURM test cluster (see tests/test_slurm.py):
a job that loses a trainer, then a whole node, finishes by itself.

One job, two faults, after checkpoints:
1. the training process on node2 is SIGKILLed: both agents restart their workers at world 2 from
   the last checkpoint (a rank that dies, its node still there);
2. later every process of the job on node2 (its torchrun agent and its trainer) is SIGKILLed, as
   when a node is lost: node1's agent restarts alone, at world 1, from the last checkpoint, with
   gradient accumulation 2 for the same global batch.
The job completes with exit code 0 and no requeue; the losses up to the node loss equal the
uninterrupted run's (test_slurm's reference, train.sbatch at world 2) and the rest match it within
the elastic-resume tolerance; the loader's position says every sample was consumed exactly once.
The seconds from each kill to the first step after the restart, and the steps redone, are printed.

Both "nodes" are this host, so a node is lost by killing its processes (not slurmd, which the
other tests share); the rendezvous host, node1, survives (losing it ends the job: see the README).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from test_slurm import (  # noqa: F401  (cluster, dataset_dir, jobs, reference: the shared fixtures)
    CKPT_INTERVAL, JOB_TIMEOUT_S, MAX_STEPS, Job, assert_one_mlflow_run_with, assert_same_losses, cluster,
    dataset_dir, job_processes, jobs, last_step, latest_checkpoint, losses, read_metrics, reference)

GLOBAL_BATCH = 16  # configs/tiny_cpu.yaml: micro 8 -> grad accumulation 1 at world 2, 2 at world 1
RESTART_BOUND_S = 240  # a restart (rendezvous, start-up, universal conversion) must finish in this
ELASTIC_REL_TOL = 1e-4  # losses after a world-size change (the README's elastic-resume guarantee)


def node_processes(job_id: str, node: str, trainers_only: bool) -> list[int]:
    """Processes of a job's step on ``node`` (SLURMD_NODENAME; both nodes are this host): its
    torchrun agent and training processes, or only the training processes."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "environ").read_bytes().decode(errors="replace").split("\0")
            cmd = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw if "=" in kv)
        if env.get("SLURM_JOB_ID") != job_id or env.get("SLURMD_NODENAME") != node:
            continue
        is_agent = "torch.distributed.run" in cmd
        if trainers_only and (is_agent or "train_entry.py" not in " ".join(cmd)):
            continue
        pids.append(int(d.name))
    return pids


def inode(path: Path) -> Optional[int]:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def run_to(job: Job, step: int, ckpt: int) -> None:
    """Until checkpoint ``ckpt`` is the newest and ``step`` is logged (the fault comes mid-interval)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        latest = latest_checkpoint(job.out_dir)
        if latest is not None and latest.name == f"step_{ckpt:08d}" and last_step(job.out_dir) >= step:
            return
        if job.info().get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            job.fail(f"ended before step {step} with checkpoint {ckpt}")
        if time.monotonic() > deadline:
            job.fail(f"no step {step} with checkpoint step_{ckpt:08d} as the newest (newest: {latest})")
        time.sleep(0.2)


def kill_and_time_restart(job: Job, pids: list[int], what: str) -> tuple[int, float, int]:
    """SIGKILL ``pids``; wait for the restarted trainer's first step. Returns (the checkpoint it
    resumed from, seconds from the kill to that step, steps redone)."""
    if not pids:
        job.fail(f"found no process to kill for {what}")
    metrics = job.out_dir / "metrics.jsonl"
    before, done = inode(metrics), last_step(job.out_dir)
    resume = int(latest_checkpoint(job.out_dir).name.split("_")[1])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    # The resumed trainer rewrites metrics.jsonl without the steps past its checkpoint (a new
    # file: atomic replace), then appends its first step.
    deadline = t0 + RESTART_BOUND_S
    while inode(metrics) == before or last_step(job.out_dir) <= resume:
        if job.info().get("JobState") not in ("RUNNING", "CONFIGURING"):
            job.fail(f"ended after {what} instead of restarting")
        if time.monotonic() > deadline:
            job.fail(f"no step after {what} within {RESTART_BOUND_S}s")
        time.sleep(0.2)
    took = time.monotonic() - t0
    print(f"{what}: resumed from step {resume}, first step {took:.1f}s after the kill, "
          f"{done - resume} logged step(s) redone (killed at step {done})")
    return resume, took, done - resume


def loader_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "rank_00000.pt", map_location="cpu", weights_only=True)["loader"]


@pytest.mark.timeout(900)
def test_lost_trainer_then_lost_node_job_finishes_alone(cluster, dataset_dir: Path, reference: Job,
                                                        tmp_path: Path, jobs) -> None:
    job = Job("train_elastic.sbatch", tmp_path / "elastic", dataset_dir, cluster)
    jobs.append(job)
    out = job.out_dir

    # 1. A rank dies (its node stays): both agents restart their workers from checkpoint 10.
    run_to(job, CKPT_INTERVAL + 2, CKPT_INTERVAL)
    r1, _, _ = kill_and_time_restart(job, node_processes(job.id, "node2", trainers_only=True),
                                     "trainer on node2 killed")
    assert r1 == CKPT_INTERVAL

    # 2. A node is lost (agent and trainer): node1 goes on alone from checkpoint 20.
    run_to(job, 2 * CKPT_INTERVAL + 2, 2 * CKPT_INTERVAL)
    r2, _, _ = kill_and_time_restart(job, node_processes(job.id, "node2", trainers_only=False),
                                     "node2 lost")
    assert r2 == 2 * CKPT_INTERVAL
    job.wait_done()

    # One job, one attempt, finished by itself: no requeue, no resubmission.
    info = job.info()
    assert int(info.get("Restarts", 0)) == 0, info
    log = job.text()
    assert log.count(f"job {job.id} attempt ") == 1 and "requeueing" not in log, log[-3000:]
    for resumed in (r1, r2):
        if f"resumed from step {resumed} " not in log:
            job.fail(f"the log does not say 'resumed from step {resumed}'")
    # The trainer's world after each restart: 2 (the node stayed), then 1 (the node was lost).
    worlds = re.findall(r"\| world (\d+) \| grad_accum (\d+) \|", log)
    assert worlds == [("2", "1"), ("2", "1"), ("1", "2")], worlds
    assert re.search(r"node2: torchrun exited with code (?!0\b)\d+", log), "node2's step should have failed"
    assert "node1: torchrun exited with code 0" in log and "training step finished with exit code 0" in log
    end = time.monotonic() + 20
    while job_processes(job.id) and time.monotonic() < end:
        time.sleep(0.5)
    assert not job_processes(job.id), f"processes of job {job.id} still running: {job_processes(job.id)}"

    # Every step once; the same losses as the uninterrupted run: exactly while the world was 2
    # (steps 1..r2; the two after each checkpoint were trained twice), within the elastic
    # tolerance at world 1.
    got, ref = losses(out), losses(reference.out_dir)
    steps = [int(r["step"]) for r in read_metrics(out)]
    assert steps == list(range(1, MAX_STEPS + 1)), f"metrics.jsonl steps {steps}"
    assert_same_losses({s: got[s] for s in got if s <= r2}, {s: ref[s] for s in ref if s <= r2},
                       "steps up to the node loss")
    after = {s: (got[s], ref[s]) for s in ref if s > r2}
    worst = max(abs(g - r) / max(1.0, abs(r)) for g, r in after.values())
    print(f"steps {r2 + 1}..{MAX_STEPS} at world 1: largest relative loss difference {worst:.2e}")
    bad = {s: v for s, v in after.items() if v[0] != pytest.approx(v[1], rel=ELASTIC_REL_TOL)}
    assert not bad, f"losses at world 1 differ from the uninterrupted run: {bad}"
    tokens = {int(r["step"]): r["tokens"] for r in read_metrics(out)}
    ref_tokens = {int(r["step"]): r["tokens"] for r in read_metrics(reference.out_dir)}
    assert tokens == ref_tokens, "tokens seen per step differ from the uninterrupted run"
    assert_one_mlflow_run_with(job, got)  # the restarted trainers continued rank 0's MLflow run

    # No sample repeated or skipped: the loader's one-number state (samples consumed on all ranks)
    # at the checkpoints written at world 1 is the uninterrupted run's, one global batch per step.
    for step in (3 * CKPT_INTERVAL, MAX_STEPS):
        name = f"step_{step:08d}"
        mine, theirs = loader_state(out / "checkpoints" / name), loader_state(reference.out_dir / "checkpoints" / name)
        assert (mine["world_size"], theirs["world_size"]) == (1, 2), (mine, theirs)
        assert mine["position"] == theirs["position"] == step * GLOBAL_BATCH, (name, mine, theirs)
        assert (mine["epoch"], mine["seed"], mine["dataset_id"]) == (theirs["epoch"], theirs["seed"], theirs["dataset_id"])
    final = json.loads((latest_checkpoint(out) / "engine.json").read_text())
    assert latest_checkpoint(out).name == f"step_{MAX_STEPS:08d}" and final["world_size"] == 1, final
