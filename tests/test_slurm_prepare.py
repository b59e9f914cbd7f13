"""launch/slurm/prepare.sbatch on the local 2-node SLURM test cluster (see tests/test_slurm.py):

1. an array job of 2 parts (one on each node) then a dependent merge job write shards
   byte-identical to a one-process `prepare` of the same config;
2. a part SIGKILLed mid-encode fails alone; the merge names it; rerun alone (``--array=1`` with
   SLAM_PREPARE_PARTS=2), then merged, the dataset is again identical.

Under CI=true the cluster must run (the fixture fails instead of skipping).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from test_slurm import REPO, SLURM_DIR, _run, cluster  # noqa: F401  (cluster: the shared fixture)

SCRIPT = REPO / "launch" / "slurm" / "prepare.sbatch"
JOB_TIMEOUT_S = 150
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def prepare_args(dataset: Path) -> list[str]:
    """~5 MB of stdlib text, one encoder process per part (each node has one CPU)."""
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", f"data.dataset_dir={dataset}",
            "--set", "data.max_corpus_mb=5", "--set", "data.tokenizer_sample_mb=0.3", "--set", "model.vocab_size=1024",
            "--set", "data.shard_size_mb=0.5", "--set", "data.encode_procs=1", "--set", "data.encode_threads=1"]


def submit(env: dict[str, str], tmp: Path, name: str, args: list[str], sbatch: tuple[str, ...] = ()) -> str:
    out = _run(["sbatch", "--parsable", f"--output={tmp / (name + '-%A_%a.log')}", f"--chdir={REPO}", "--job-name", name,
                *sbatch, str(SCRIPT), *args], env)
    return out.strip().split(";")[0]


def state(env: dict[str, str], job: str) -> dict[str, str]:
    out = _run(["scontrol", "-o", "show", "job", job], env, check=False)
    if "JobState=" not in out:  # forgotten by slurmctld: the completion log has it
        comp = SLURM_DIR / "log" / "jobcomp.txt"
        lines = [ln for ln in comp.read_text().splitlines() if f"JobId={job} " in ln] if comp.exists() else []
        out = lines[-1] if lines else ""
    return dict(re.findall(r"(\w+)=(\S*)", out))


def logs(tmp: Path, name: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(tmp.glob(f"{name}-*.log")))


def wait(env: dict[str, str], job: str, tmp: Path, name: str, want: Optional[str] = "COMPLETED") -> dict[str, str]:
    """Until the job (or array task ``JID_I``) ends; it must end in ``want`` (None: any end)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        info = state(env, job)
        if info.get("JobState") in DONE:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} did not end within {JOB_TIMEOUT_S}s: {info}\n{logs(tmp, name)[-6000:]}")
        time.sleep(0.5)
    if want is not None and (info.get("JobState") != want or (want == "COMPLETED" and info.get("ExitCode") != "0:0")):
        pytest.fail(f"job {job} ended {info.get('JobState')} {info.get('ExitCode')}, expected {want}\n{logs(tmp, name)[-6000:]}")
    return info


def shards(dataset: Path) -> dict[str, bytes]:
    from data_pipeline import load_manifest

    m = load_manifest(dataset)
    return {s.url: Path(s.location).read_bytes() for s in m.shards}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same config prepared by one process, here."""
    out = tmp_path_factory.mktemp("prep_ref") / "ds"
    exe = Path(sys.executable).with_name("slam-pretrain")
    p = subprocess.run([str(exe), "prepare", *prepare_args(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.timeout(600)
def test_prepare_array_job_then_merge_equals_one_process(cluster, reference: Path, tmp_path: Path) -> None:  # noqa: F811
    env = cluster
    ds = tmp_path / "ds"
    jid = submit(env, tmp_path, "prep", prepare_args(ds), ("--array=0-1",))
    merge = submit(env, tmp_path, "merge", ["--merge", *prepare_args(ds)], (f"--dependency=afterok:{jid}",))
    try:
        parts = [wait(env, f"{jid}_{i}", tmp_path, "prep") for i in (0, 1)]
        wait(env, merge, tmp_path, "merge")
    finally:
        subprocess.run(["scancel", jid, merge], env=env, capture_output=True, timeout=30)
    text = logs(tmp_path, "prep")
    assert "--part 0/2" in text and "--part 1/2" in text and "[prepare] part 1/2 done" in text, text[-3000:]
    assert {p.get("NodeList") for p in parts} == {"node1", "node2"}, [p.get("NodeList") for p in parts]
    assert "merged 2 parts" in logs(tmp_path, "merge")
    assert shards(ds) == shards(reference)
    assert not (ds / "parts").exists()


def _part_pid(job: str, task: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"\0SLURM_ARRAY_JOB_ID={job}\0".encode() in b"\0" + env and f"\0SLURM_ARRAY_TASK_ID={task}\0".encode() in env
                and b"slam_pretrain\0prepare" in cmd):
            pids.append(int(d.name))
    return pids


@pytest.mark.timeout(600)
def test_a_killed_part_is_named_by_merge_and_rerun_alone(cluster, reference: Path, tmp_path: Path) -> None:  # noqa: F811
    env = cluster
    ds = tmp_path / "ds"
    jid = submit(env, tmp_path, "prep", prepare_args(ds), ("--array=0-1",))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not list((ds / "parts").glob("part-00001-of-00002.*.tmp*")):  # part 1 is encoding
            if time.monotonic() > deadline or state(env, f"{jid}_1").get("JobState") in DONE:
                pytest.fail(f"part 1 never seen encoding: {state(env, f'{jid}_1')}\n{logs(tmp_path, 'prep')[-4000:]}")
            time.sleep(0.05)
        pids = _part_pid(jid, 1)
        assert pids, "cannot find part 1's process"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait(env, f"{jid}_1", tmp_path, "prep", want="FAILED")
        wait(env, f"{jid}_0", tmp_path, "prep")
    finally:
        subprocess.run(["scancel", jid], env=env, capture_output=True, timeout=30)
    assert not (ds / "parts" / "part-00001-of-00002.json").exists() and not (ds / "manifest.json").exists()

    merge = submit(env, tmp_path, "merge1", ["--merge", *prepare_args(ds)])
    wait(env, merge, tmp_path, "merge1", want="FAILED")
    assert "1 of 2 parts are missing or unfinished: 1;" in logs(tmp_path, "merge1")
    assert "Traceback" not in logs(tmp_path, "merge1")

    again = submit(env | {"SLAM_PREPARE_PARTS": "2"}, tmp_path, "rerun", prepare_args(ds), ("--array=1",))
    wait(env, f"{again}_1", tmp_path, "rerun")
    assert "--part 1/2" in logs(tmp_path, "rerun")
    merge = submit(env, tmp_path, "merge2", ["--merge", *prepare_args(ds)])
    wait(env, merge, tmp_path, "merge2")
    assert shards(ds) == shards(reference)
