"""The loss-spike monitor (``stability``) through the real CLI, engines, loader and checkpoints.

The spike is injected with ``SLAM_TEST_SPIKE_AT_STEP=N`` (training/stability.py,
``_test_spike_factor``): the loss the monitor sees is x10 for the step consuming the samples the
uninterrupted run consumes at step N, like a poisoned batch (a rollback that skips those samples
does not meet it again).

1. rollback: detected, rolled back to the newest checkpoint, the skipped samples reported exactly,
   the LR lowered for the configured steps, the final loss close to a clean run's; a SIGKILL
   during recovery and a resume give the same per-step losses as the uninterrupted rollback run.
2. skip: the update of the spiking step is not applied (the next loss differs from the clean run's).
3. stop: exit 4 with the last good checkpoint kept; also when a second spike exceeds max_rollbacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slam_pretrain.config import StabilityConfig
from slam_pretrain.errors import ConfigError
from slam_pretrain.training.stability import RunningStats
from train_utils import base_overrides, latest_step, losses, run_and_kill, run_train

STEPS, INTERVAL, SPIKE, G = 24, 8, 13, 16  # G: samples per step (global batch)
MONITOR = ["stability.enabled=true", "stability.window=10", "stability.min_steps=5", "stability.z_threshold=6"]


def _args(manifest: Path, out: Path, *sets: str, engine: str = "deepspeed", zero: int = 1) -> list[str]:
    args = base_overrides(manifest, out, engine=engine, zero=zero, steps=STEPS, interval=INTERVAL, micro=8,
                          global_batch=G)
    for s in sets:
        args += ["--set", s]
    return args


def _ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _events(out: Path) -> list[dict]:
    return [r for r in _records(out) if r.get("event") == "loss_spike"]


def _lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in _records(out) if "event" not in r and r.get("split") != "val"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_manifest) -> Path:
    """The same run, monitor on, no spike: it must never fire on ordinary training noise."""
    out = tmp_path_factory.mktemp("stability") / "clean"
    r = run_train(1, _args(tiny_manifest, out, *MONITOR, "stability.policy=rollback"))
    _ok(r)
    assert _events(out) == [] and "loss spike" not in r.stderr
    return out


def test_config_is_checked() -> None:
    StabilityConfig().validate()
    for kw, key in [({"min_steps": 50, "window": 10}, "stability.min_steps=50"), ({"lr_factor": 0.0}, "lr_factor"),
                    ({"z_threshold": -1.0}, "z_threshold"), ({"max_rollbacks": 0}, "max_rollbacks")]:
        with pytest.raises(ConfigError, match=key):
            StabilityConfig(**kw).validate()


def test_running_stats_z() -> None:
    s = RunningStats(4, [1.0, 2.0, 3.0, 4.0])
    assert s.z(2.5) == 0.0
    s.add(5.0)  # the window drops 1.0: mean 3.5, std sqrt(5/3)
    assert list(s.values) == [2.0, 3.0, 4.0, 5.0]
    assert math.isclose(s.z(3.5 + math.sqrt(5 / 3) * 6), 6.0)


def test_rollback_skips_the_window_and_survives_a_kill(tmp_path, tiny_manifest, clean) -> None:
    sets = [*MONITOR, "stability.policy=rollback", "stability.lr_factor=0.5", "stability.lr_factor_steps=3"]
    env = {"SLAM_TEST_SPIKE_AT_STEP": str(SPIKE)}
    out = tmp_path / "rollback"
    r = run_train(1, _args(tiny_manifest, out, *sets), env=env)
    _ok(r)
    (ev,) = _events(out)
    assert ev["step"] == SPIKE and ev["action"] == "rollback" and ev["loss_z"] > 6
    assert ev["to_step"] == INTERVAL and ev["checkpoint"].endswith(f"step_{INTERVAL:08d}")
    assert ev["skipped_samples"] == [INTERVAL * G, SPIKE * G] and ev["skipped_steps"] == [INTERVAL + 1, SPIKE]
    assert f"loss spike at step {SPIKE}" in r.stderr and f"rolled back to step {INTERVAL}" in r.stderr
    print([line for line in r.stderr.splitlines() if line.startswith("loss spike")], ev)  # the cost, for the record
    base, got = losses(clean), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == base[s] for s in range(1, INTERVAL + 1))  # before the checkpoint: the same run
    assert got[INTERVAL + 1] != base[INTERVAL + 1]  # after it: other data (the window was skipped)
    assert abs(got[STEPS] - base[STEPS]) < 0.25, (got[STEPS], base[STEPS])
    lr, base_lr = _lrs(out), _lrs(clean)
    assert [lr[s] / base_lr[s] for s in range(INTERVAL + 1, INTERVAL + 5)] == pytest.approx([0.5, 0.5, 0.5, 1.0])
    state = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["stability"]["rollbacks"] == [SPIKE] and state["stability"]["samples_skipped"] == (SPIKE - INTERVAL) * G

    # SIGKILL once the rollback happened (before or after the next checkpoint: either must resume alike).
    killed = tmp_path / "killed"
    args = _args(tiny_manifest, killed, *sets)
    rc, log = run_and_kill(1, args, killed, env=env,
                           when=lambda d: (d / "metrics.jsonl").is_file() and '"loss_spike"' in (d / "metrics.jsonl").read_text())
    assert rc == -9, f"not killed mid-run (exit {rc}):\n{log[-3000:]}"
    print(f"killed after the rollback; newest checkpoint: step {latest_step(killed)}")
    r = run_train(1, args, env=env)
    _ok(r)
    assert losses(killed) == got  # bitwise, every step
    (again,) = _events(killed)  # the same spike and rollback (out_dir and the recovery's wall time aside)
    again.pop("recovery_s"), ev.pop("recovery_s")
    assert again.pop("checkpoint").endswith(f"killed/checkpoints/step_{INTERVAL:08d}")
    assert again == {k: v for k, v in ev.items() if k != "checkpoint"}


def test_skip_holds_the_update(tmp_path, tiny_manifest, clean) -> None:
    out = tmp_path / "skip"
    r = run_train(1, _args(tiny_manifest, out, *MONITOR, "stability.policy=skip", engine="fsdp", zero=0),
                  env={"SLAM_TEST_SPIKE_AT_STEP": str(SPIKE)})
    _ok(r)
    (ev,) = _events(out)
    assert ev["step"] == SPIKE and ev["action"] == "skip" and ev["samples"] == [(SPIKE - 1) * G, SPIKE * G]
    assert f"loss spike at step {SPIKE}" in r.stderr and "update skipped" in r.stderr
    straight = tmp_path / "straight"
    _ok(run_train(1, _args(tiny_manifest, straight, engine="fsdp", zero=0)))
    base, got = losses(straight), losses(out)
    assert all(got[s] == base[s] for s in range(1, SPIKE + 1))  # the loss is read before the update
    assert got[SPIKE + 1] != base[SPIKE + 1]  # the update of step SPIKE was not applied
    assert abs(got[STEPS] - base[STEPS]) < 0.1
    last = [r for r in _records(out) if r.get("step") == STEPS and "loss" in r][-1]
    assert last["skipped_steps"] == 1


@pytest.mark.parametrize("case", ["stop", "too_many_rollbacks"])
def test_stop_keeps_the_last_good_checkpoint(tmp_path, tiny_manifest, case) -> None:
    out = tmp_path / case
    if case == "stop":
        sets, spikes, at = [*MONITOR, "stability.policy=stop"], str(SPIKE), SPIKE
    else:  # after the rollback to step 8, new step 10 consumes the data of the first run's step 15
        sets, spikes, at = [*MONITOR, "stability.policy=rollback", "stability.max_rollbacks=1"], f"{SPIKE},15", 10
    r = run_train(1, _args(tiny_manifest, out, *sets), env={"SLAM_TEST_SPIKE_AT_STEP": spikes})
    assert r.returncode == 4, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert f"stopped: loss spike at step {at}; the last good checkpoint is" in r.stderr
    assert f"the last good checkpoint is {out / 'checkpoints' / f'step_{INTERVAL:08d}'}" in r.stderr
    assert latest_step(out) == INTERVAL
    assert sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*")) == [INTERVAL]
    ev = _events(out)[-1]
    assert ev["step"] == at and ev["action"] == "stop"
    if case == "too_many_rollbacks":
        assert "stability.max_rollbacks=1" in ev["reason"] and len(_events(out)) == 2
