"""The launch scripts on a real SLURM cluster: two slurmd "nodes" on this host (see
launch/slurm/testcluster/), the tiny config on CPU with gloo.

1. train.sbatch (torchrun) on 2 nodes completes; checkpoints; one MLflow run with rank 0's metrics.
2. The same with train_deepspeed.sbatch (the deepspeed launcher, --launcher slurm).
3. Preemption: USR1 to the batch shell mid-run -> checkpoint, requeue, resume, complete; the
   per-step losses equal those of the uninterrupted run of test 1.
4. A rank killed mid-run fails the job within a bound; a resubmission resumes from the last
   complete checkpoint (and again reproduces the uninterrupted losses).

The cluster is started by tests/setup_services.sh (`make test`) or by this module; where it cannot
start (not root, no apt-get) the tests skip and say why, except under CI=true, where they fail.
Both nodes are this host, so every job shares the test's filesystem.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTCLUSTER = REPO / "launch" / "slurm" / "testcluster"
SLURM_DIR = Path(os.environ.get("SLAM_SLURM_DIR", "/var/lib/slam-testcluster"))
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"
IN_CI = os.environ.get("CI", "").lower() == "true"

# One run shape for every job, so every run can be compared with the uninterrupted one.
MAX_STEPS = 40
CKPT_INTERVAL = 10
JOB_TIMEOUT_S = 240  # a whole job, including a first-time DeepSpeed op build
KILL_BOUND_S = 60  # a lost rank must end the job within this
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 30, check: bool = True) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def _slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: sqlite in run.out_dir
    env.update({
        "SLURM_CONF": str(SLURM_CONF),
        "SLAM_PYTHON": sys.executable,
        "SLAM_HOME": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",  # both nodes are this host; loopback is the only network
        "OMP_NUM_THREADS": "1",  # two ranks share 2 cores
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _cluster_ready(env: dict[str, str]) -> bool:
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return all(states.get(n) in ("idle", "mix", "alloc") for n in ("node1", "node2"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A running test cluster (started here when missing); the env for sbatch & co."""
    env = _slurm_env()
    if not _cluster_ready(env):
        why = None
        if os.geteuid() != 0:
            why = "the SLURM test cluster needs root (it installs slurm-wlm/munge and runs slurmd)"
        else:
            p = subprocess.run(["bash", str(TESTCLUSTER / "up.sh")], env={**env, "SLAM_SLURM_AUTOSTOP": "1"},
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0 or not _cluster_ready(env):
                why = f"the SLURM test cluster did not start: {(p.stderr or p.stdout).strip()[-500:]}"
        if why:
            print(why)
            if IN_CI:
                pytest.fail(f"CI=true: {why}")
            pytest.skip(why)
    yield env
    # Stop the cluster when this session (setup_services.sh or the lines above) started it.
    if (SLURM_DIR / "run" / "autostop").exists():
        subprocess.run(["bash", str(TESTCLUSTER / "down.sh")], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_assets import build_tiny_dataset

    manifest = Path(build_tiny_dataset(tmp_path_factory.mktemp("slurm_data")))
    return manifest.parent


# ---------------------------------------------------------------------------------------------
# Jobs


class Job:
    """One submitted batch job: its id, log, state, and cleanup."""

    def __init__(self, script: str, out_dir: Path, dataset: Path, env: dict[str, str],
                 extra: tuple[str, ...] = ()) -> None:
        self.env, self.out_dir = env, out_dir
        args = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"),
                "--set", f"data.dataset_dir={dataset}", "--set", f"run.out_dir={out_dir}",
                "--set", f"train.max_steps={MAX_STEPS}", "--set", "train.log_interval=1",
                "--set", f"train.eval_interval={10 * MAX_STEPS}", "--set", f"checkpoint.interval={CKPT_INTERVAL}",
                "--set", "data.num_workers=0", *extra]
        log = out_dir.parent / f"{out_dir.name}-%j.slurm.log"
        out = _run(["sbatch", "--parsable", "-N", "2", f"--output={log}", f"--chdir={REPO}",
                    "--job-name", out_dir.name, str(REPO / "launch" / "slurm" / script), *args], env)
        self.id = out.strip().split(";")[0]
        self.log = Path(str(log).replace("%j", self.id))

    def info(self) -> dict[str, str]:
        out = _run(["scontrol", "-o", "show", "job", self.id], self.env, check=False)
        if "JobState=" not in out:  # forgotten by slurmctld: the completion log has it
            comp = SLURM_DIR / "log" / "jobcomp.txt"
            lines = [ln for ln in comp.read_text().splitlines() if f"JobId={self.id} " in ln] if comp.exists() else []
            out = lines[-1] if lines else ""
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def fail(self, msg: str) -> None:
        pytest.fail(f"job {self.id}: {msg}\n{self.info()}\n----- job log {self.log} -----\n{self.text()[-8000:]}")

    def wait(self, cond: Callable[[dict[str, str]], bool], timeout: float, what: str,
             failure_ok: bool = False) -> dict[str, str]:
        """Poll until cond(info); a job ending in failure meanwhile fails the test (unless failure_ok)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if cond(info):
                return info
            if not failure_ok and info.get("JobState") in FAILED_STATES:
                self.fail(f"ended {info.get('JobState')} while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    def wait_done(self, timeout: float = JOB_TIMEOUT_S) -> None:
        info = self.wait(lambda i: i.get("JobState") == "COMPLETED", timeout, "COMPLETED")
        if info.get("ExitCode") != "0:0":
            self.fail(f"completed with ExitCode={info.get('ExitCode')}")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)


@pytest.fixture
def jobs(cluster: dict[str, str]) -> Iterator[list[Job]]:
    """Jobs a test submits; any still queued or running at its end are cancelled."""
    made: list[Job] = []
    yield made
    for job in made:
        job.cancel()


# ---------------------------------------------------------------------------------------------
# Run outputs


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return [r for r in recs if r.get("split", "train") == "train" and "loss" in r]


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a resume keeps its last value."""
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(out_dir)}


def last_step(out_dir: Path) -> int:
    recs = read_metrics(out_dir)
    return max((int(r["step"]) for r in recs), default=0)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    latest = out_dir / "checkpoints" / "latest"
    return out_dir / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def assert_checkpoints(job: Job, final_step: int) -> None:
    ckpts = job.out_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.exists() else []
    latest = latest_checkpoint(job.out_dir)
    if latest is None or latest.name != f"step_{final_step:08d}":
        job.fail(f"latest checkpoint is {latest}, expected step_{final_step:08d} (have {names})")
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == final_step, state
    assert (latest / "engine.json").exists() and (latest / "engine").is_dir(), sorted(os.listdir(latest))
    assert json.loads((latest / "engine.json").read_text())["world_size"] == 2


def mlflow_runs(out_dir: Path) -> tuple:
    """(client, runs) of the run's default SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exp_ids) if exp_ids else []


def assert_one_mlflow_run_with(job: Job, expect: dict[int, float]) -> None:
    """Exactly one run; its loss history is rank 0's metrics.jsonl, each step once."""
    client, runs = mlflow_runs(job.out_dir)
    if len(runs) != 1:
        job.fail(f"expected exactly one MLflow run, found {len(runs)}")
    run = runs[0]
    key = next((k for k in ("train/loss", "loss", "train_loss") if k in run.data.metrics), None)
    assert key, f"no loss metric in the MLflow run: {sorted(run.data.metrics)}"
    hist = client.get_metric_history(run.info.run_id, key)
    by_step: dict[int, list[float]] = {}
    for m in hist:
        by_step.setdefault(m.step, []).append(m.value)
    assert sorted(by_step) == sorted(expect), f"MLflow steps {sorted(by_step)} != metrics.jsonl {sorted(expect)}"
    for step, value in expect.items():
        # A step re-run after a resume may be logged twice; its last value is metrics.jsonl's.
        assert by_step[step][-1] == pytest.approx(value, rel=1e-6), (step, by_step[step], value)
    assert run.info.status == "FINISHED", run.info.status


def assert_same_losses(got: dict[int, float], ref: dict[int, float], what: str) -> None:
    assert sorted(got) == sorted(ref), f"{what}: steps {sorted(got)} != reference steps {sorted(ref)}"
    bad = {s: (got[s], ref[s]) for s in ref if abs(got[s] - ref[s]) > 1e-6 * max(1.0, abs(ref[s]))}
    assert not bad, f"{what}: losses differ from the uninterrupted run at steps {sorted(bad)[:10]}: {bad}"


def rank_pids(job_id: str, rank: int) -> list[int]:
    """Training processes of a job with the given global rank (both nodes are this host)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
            cmd = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") != job_id or "train_entry.py" not in " ".join(cmd):
            continue
        if "torch.distributed.run" in cmd or "deepspeed.launcher.runner" in cmd:
            continue  # a launcher, not a training process
        if env.get("RANK", env.get("SLURM_PROCID")) == str(rank):
            pids.append(int(d.name))
    return pids


def job_processes(job_id: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"\0SLURM_JOB_ID={job_id}\0".encode() in b"\0" + (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def reference(cluster: dict[str, str], dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The uninterrupted 2-node torchrun run (test 1, and the loss reference for tests 3-4)."""
    job = Job("train.sbatch", tmp_path_factory.mktemp("slurm_ref") / "ref", dataset_dir, cluster)
    try:
        job.wait_done()
    finally:
        job.cancel()
    return job


@pytest.mark.timeout(600)
def test_torchrun_sbatch_two_nodes(reference: Job) -> None:
    job = reference
    log = job.text()
    assert "[slam] command: srun" in log and "torch.distributed.run" in log, log[-3000:]
    ref = losses(job.out_dir)
    assert sorted(ref) == list(range(1, MAX_STEPS + 1)), f"logged steps {sorted(ref)}"
    # Only rank 0 writes metrics.jsonl: every step appears once.
    steps = [int(r["step"]) for r in read_metrics(job.out_dir)]
    assert len(steps) == len(set(steps)), "metrics.jsonl has duplicate steps (more than one writer?)"
    assert_checkpoints(job, MAX_STEPS)
    assert_one_mlflow_run_with(job, ref)


@pytest.mark.timeout(600)
def test_deepspeed_sbatch_two_nodes(cluster, dataset_dir: Path, reference: Job, tmp_path: Path, jobs) -> None:
    job = Job("train_deepspeed.sbatch", tmp_path / "ds", dataset_dir, cluster)
    jobs.append(job)
    job.wait_done()
    log = job.text()
    assert "deepspeed.launcher.runner" in log and "--launcher slurm" in log, log[-3000:]
    got = losses(job.out_dir)
    steps = [int(r["step"]) for r in read_metrics(job.out_dir)]
    assert len(steps) == len(set(steps)), "metrics.jsonl has duplicate steps (more than one writer?)"
    assert_checkpoints(job, MAX_STEPS)
    assert_one_mlflow_run_with(job, got)
    # Same ranks, same data, same engine: the launcher must not change the numbers.
    assert_same_losses(got, losses(reference.out_dir), "deepspeed launcher run")


@pytest.mark.timeout(600)
def test_preempt_requeue_resume(cluster, dataset_dir: Path, reference: Job, tmp_path: Path, jobs) -> None:
    job = Job("train.sbatch", tmp_path / "pre", dataset_dir, cluster)
    jobs.append(job)
    # Mid-run: past the first checkpoint, well before the end.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while last_step(job.out_dir) < CKPT_INTERVAL + 2:
        if job.info().get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            job.fail("ended before it could be preempted")
        if time.monotonic() > deadline:
            job.fail("no training progress")
        time.sleep(0.2)
    _run(["scancel", "--batch", "--signal=USR1", job.id], cluster)
    # The job checkpoints, requeues itself and waits (BeginTime); start it at once.
    job.wait(lambda i: int(i.get("Restarts", 0)) >= 1 and i.get("JobState") == "PENDING", 120, "requeue")
    stopped = int(latest_checkpoint(job.out_dir).name.split("_")[1])
    assert CKPT_INTERVAL + 2 <= stopped < MAX_STEPS, f"checkpoint after the stop is at step {stopped}"
    # Starting the requeued job before the nodes have finished tearing down the first attempt gets
    # it killed by slurmctld ("Job credential revoked"); SLURM's own ~2 min BeginTime delay avoids
    # that in production, so wait for the teardown here before skipping the delay.
    wait_until = time.monotonic() + 60
    while time.monotonic() < wait_until:
        steps = _run(["squeue", "-h", "-s", "-j", job.id], cluster, check=False).strip()
        states = _run(["sinfo", "-h", "-N", "-o", "%T"], cluster, check=False).split()
        if not steps and states and all(st.rstrip("*~#") == "idle" for st in states):
            break
        time.sleep(0.5)
    time.sleep(2)
    _run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], cluster)
    job.wait_done()
    log = job.text()
    if "batch shell got SIGUSR1" not in log or "requeueing job" not in log:
        job.fail("the log does not show the stop and the requeue")
    if f"resumed from step {stopped}" not in log:
        job.fail(f"the requeued job did not say 'resumed from step {stopped}'")
    assert int(job.info().get("Restarts", 0)) == 1
    assert_checkpoints(job, MAX_STEPS)
    got = losses(job.out_dir)
    assert_same_losses(got, losses(reference.out_dir), "preempted + requeued run")
    assert_one_mlflow_run_with(job, got)  # the requeued attempt continued the same run


@pytest.mark.timeout(600)
def test_lost_rank_fails_job_then_resubmission_resumes(cluster, dataset_dir: Path, reference: Job,
                                                       tmp_path: Path, jobs) -> None:
    out = tmp_path / "kill"
    job = Job("train.sbatch", out, dataset_dir, cluster)
    jobs.append(job)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while latest_checkpoint(out) is None or last_step(out) < CKPT_INTERVAL + 2:
        if job.info().get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            job.fail("ended before a rank could be killed")
        if time.monotonic() > deadline:
            job.fail("no checkpoint / progress")
        time.sleep(0.2)
    pids = rank_pids(job.id, 1)
    if not pids:
        job.fail("cannot find the rank 1 training process")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    info = job.wait(lambda i: i.get("JobState") in FAILED_STATES + ("COMPLETED",),
                    KILL_BOUND_S, "the job to end after a lost rank", failure_ok=True)
    took = time.monotonic() - t0
    if info.get("JobState") != "FAILED" or info.get("ExitCode") == "0:0":
        job.fail(f"expected FAILED with a non-zero exit code, got {info.get('JobState')} {info.get('ExitCode')}")
    assert int(info.get("Restarts", 0)) == 0, "a lost rank must not requeue"
    # Nothing of the job is left running (no hung rank).
    end = time.monotonic() + 20
    while job_processes(job.id) and time.monotonic() < end:
        time.sleep(0.5)
    assert not job_processes(job.id), f"processes of job {job.id} still running: {job_processes(job.id)}"
    print(f"lost rank -> job FAILED in {took:.1f}s")

    ckpt = latest_checkpoint(out)
    assert ckpt is not None and (ckpt / "trainer_state.json").exists(), f"latest checkpoint {ckpt} not complete"
    resume_step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    again = Job("train.sbatch", out, dataset_dir, cluster)
    jobs.append(again)
    again.wait_done()
    if f"resumed from step {resume_step}" not in again.text():
        again.fail(f"the resubmission did not say 'resumed from step {resume_step}'")
    assert_checkpoints(again, MAX_STEPS)
    assert_same_losses(losses(out), losses(reference.out_dir), "killed + resubmitted run")
