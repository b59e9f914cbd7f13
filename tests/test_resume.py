"""Exact and elastic resume of the whole trainer, through the real CLI, engines and loader.

1. A run of 2N steps equals N steps + SIGKILL + resume: identical per-step losses in
   metrics.jsonl, bitwise (DeepSpeed ZeRO 1/2/3 and FSDP2, 1 and 2 processes, grad accum 2).
2. SIGKILL during a checkpoint write: the previous checkpoint is the one found, and resuming from
   it still reproduces the uninterrupted run.
3. Elastic: 2 processes -> 1 process with the same global batch continues with losses close to
   the uninterrupted run (FSDP via DCP resharding, DeepSpeed via universal checkpoints).
4. K consecutive non-finite steps stop the run (exit 3) with the last good checkpoint intact.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from train_utils import base_overrides, latest_step, losses, run_and_kill, run_train

N = 4  # checkpoint at N, run to 2N

ENGINES = [("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0)]


def _ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _baseline(tmp_path: Path, manifest: Path, nproc: int, engine: str, zero: int, **kw) -> dict[int, float]:
    out = tmp_path / "straight"
    r = run_train(nproc, base_overrides(manifest, out, engine=engine, zero=zero, steps=2 * N, interval=N, **kw))
    _ok(r)
    got = losses(out)
    assert sorted(got) == list(range(1, 2 * N + 1))
    assert all(math.isfinite(v) for v in got.values())
    return got


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("engine,zero", ENGINES, ids=[f"{e}-z{z}" if e == "deepspeed" else e for e, z in ENGINES])
def test_kill_and_resume_is_bitwise_identical(tmp_path, tiny_manifest, engine, zero, nproc):
    micro = 8 // nproc  # global batch 16 = micro x nproc x grad_accum 2
    straight = _baseline(tmp_path, tiny_manifest, nproc, engine, zero, micro=micro)

    out = tmp_path / "killed"
    args = base_overrides(tiny_manifest, out, engine=engine, zero=zero, steps=2 * N, interval=N, micro=micro)
    rc, log = run_and_kill(nproc, args, out, when=lambda d: latest_step(d) == N)
    assert rc == -9, f"the run was not killed mid-way (exit {rc}):\n{log[-3000:]}"

    r = run_train(nproc, args)  # --resume auto
    _ok(r)
    assert f"resumed from step {N} (" in r.stdout
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 2 * N + 1))
    assert resumed == straight  # bitwise: float equality of every step's loss


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, tiny_manifest):
    straight = _baseline(tmp_path, tiny_manifest, 1, "deepspeed", 2)
    out = tmp_path / "killed"
    args = base_overrides(tiny_manifest, out, engine="deepspeed", zero=2, steps=2 * N, interval=N // 2)
    # The test hook pauses every save after the engine state is written, before it is published
    # (the save at step N/2 too, which then publishes): long enough for the 10 ms poll to kill the
    # run inside the pause of step N, short enough not to idle the suite.
    rc, log = run_and_kill(1, args, out, env={"SLAM_TEST_PAUSE_BEFORE_PUBLISH_S": "10"},
                           when=lambda d: (d / "checkpoints" / f".tmp_step_{N:08d}").is_dir()
                           and any((d / "checkpoints" / f".tmp_step_{N:08d}").glob("rank_*.pt")))
    assert rc == -9, log[-3000:]
    assert latest_step(out) == N // 2  # the half-written step N is not what resume finds
    r = run_train(1, args)
    _ok(r)
    assert f"resumed from step {N // 2} (" in r.stdout
    assert losses(out) == straight
    assert not list((out / "checkpoints").glob(".tmp_*")), "a stale temporary checkpoint was left behind"


@pytest.mark.parametrize("engine,zero", [("fsdp", 0), ("deepspeed", 2)], ids=["fsdp", "deepspeed-z2"])
def test_elastic_resume_two_to_one_process(tmp_path, tiny_manifest, engine, zero):
    straight = _baseline(tmp_path, tiny_manifest, 2, engine, zero, micro=4)
    out = tmp_path / "elastic"
    args2 = base_overrides(tiny_manifest, out, engine=engine, zero=zero, steps=2 * N, interval=N, micro=4)
    rc, log = run_and_kill(2, args2, out, when=lambda d: latest_step(d) == N)
    assert rc == -9, log[-3000:]
    # Same global batch (16) on one process: micro 8 x grad_accum 2.
    args1 = base_overrides(tiny_manifest, out, engine=engine, zero=zero, steps=2 * N, interval=N, micro=8)
    r = run_train(1, args1)
    _ok(r)
    assert f"resumed from step {N} (" in r.stdout
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 2 * N + 1))
    for s in range(1, N + 1):
        assert resumed[s] == straight[s]
    for s in range(N + 1, 2 * N + 1):  # same data, same weights; only reduction order differs
        assert resumed[s] == pytest.approx(straight[s], rel=1e-4), (s, resumed[s], straight[s])


def test_non_finite_steps_stop_with_last_good_checkpoint(tmp_path, tiny_manifest):
    out = tmp_path / "blowup"
    args = base_overrides(tiny_manifest, out, engine="deepspeed", zero=1, steps=20, interval=1)
    # An absurd learning rate with no warmup and no clipping: step 1 is finite and sends the weights
    # to ~1e30, every later loss is non-finite and skipped; 3 in a row stop the run.
    args += ["--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.grad_clip=0",
             "--set", "train.max_bad_steps=3"]
    r = run_train(1, args)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 consecutive non-finite steps" in r.stderr
    assert latest_step(out) == 1
