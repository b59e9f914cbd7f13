"""Checkpoint branches through the real CLI (issue 12, part 1).

Rewinding (``--resume`` to an older checkpoint), starting over in a used out_dir (``--resume
never``) and resuming from a checkpoint of another out_dir each start a new branch: the abandoned
branch's later checkpoints are moved to ``out_dir/abandoned/<time>/`` (never deleted), the new
branch's checkpoints are kept by retention (``keep_last`` and ``keep_every``) and ``latest``
follows them, so ``--resume auto`` continues the new branch. Every checkpoint records its branch.

One chain of runs (DeepSpeed ZeRO-1, one process, checkpoints every step, ``keep_last=2``,
``keep_every=4``): 8 steps; a rewind to step 4 with another learning rate, SIGKILLed after step 6;
``--resume auto`` to step 8; ``--resume`` from the abandoned branch's step 8 to step 9. And
``--resume never`` in a copy of the first run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from slam_pretrain.training.checkpoint_files import find_latest, read_branch
from train_utils import base_overrides, latest_step, run_and_kill, run_train

RETAIN = ["--set", "checkpoint.keep_last=2", "--set", "checkpoint.keep_every=4"]


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


def _args(manifest: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return base_overrides(manifest, out, steps=steps, interval=1) + RETAIN + list(extra)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    """Training losses by step; a step logged twice (an attempt that was not cut back) fails."""
    got: dict[int, float] = {}
    for rec in _records(out):
        if "event" in rec or rec.get("split") == "val":
            continue
        assert rec["step"] not in got, f"step {rec['step']} logged twice in {out / 'metrics.jsonl'}"
        got[rec["step"]] = rec["loss"]
    return got


def _events(out: Path) -> list[dict[str, Any]]:
    return [rec for rec in _records(out) if rec.get("event") == "branch"]


def _steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*"))


def _state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _step(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_manifest) -> Path:
    """8 steps: checkpoints 4, 7, 8 kept (the last 2, and every 4th)."""
    out = tmp_path_factory.mktemp("branches") / "first"
    _ok(run_train(1, _args(tiny_manifest, out, 8)))
    assert _steps(out / "checkpoints") == [4, 7, 8] and latest_step(out) == 8
    return out


@pytest.fixture(scope="module")
def chain(first_run, tiny_manifest, tmp_path_factory) -> dict[str, Any]:
    """The rewind 8 -> 4 (killed after step 6), ``--resume auto`` to 8, then a resume from the
    abandoned branch's step 8 to 9; what each left behind."""
    out = tmp_path_factory.mktemp("chain") / "run"
    shutil.copytree(first_run, out)
    r: dict[str, Any] = {"out": out}
    # Another learning rate: the new branch's steps 5.. differ from the abandoned ones.
    args = _args(tiny_manifest, out, 8, "--set", "train.lr=1e-3")
    rc, log = run_and_kill(1, args + ["--resume", str(_step(out, 4))], out,
                           when=lambda d: latest_step(d) == 6)
    assert rc == -9, f"the rewound run was not killed mid-way (exit {rc}):\n{log[-3000:]}"
    r["killed_log"] = log
    r["after_kill"] = {"steps": _steps(out / "checkpoints"), "latest": latest_step(out),
                       "found": find_latest(out), "branch": read_branch(out),
                       "state6": _state(_step(out, 6)), "files6": json.loads((_step(out, 6) / "files.json").read_text()),
                       "files5": json.loads((_step(out, 5) / "files.json").read_text())}
    (aside,) = list((out / "abandoned").iterdir())
    r["aside"] = aside
    resumed = run_train(1, args)  # --resume auto
    _ok(resumed)
    r["resumed"] = resumed
    r["after_auto"] = {"steps": _steps(out / "checkpoints"), "latest": latest_step(out),
                       "states": {s: _state(_step(out, s)) for s in _steps(out / "checkpoints")},
                       "losses": _losses(out), "events": _events(out)}
    # A checkpoint of another out_dir (the abandoned branch's newest): a branch of its own here.
    origin = aside / "checkpoints" / "step_00000008"
    external = run_train(1, _args(tiny_manifest, out, 9), resume=str(origin))
    _ok(external)
    r["external"] = external
    r["origin"] = origin
    return r


def test_rewind_moves_the_abandoned_branch_aside_and_keeps_the_new_one(chain, first_run):
    out, aside, k = chain["out"], chain["aside"], chain["after_kill"]
    assert "resuming from step_00000004 starts branch 1: moved the newer checkpoints (steps 7, 8)" in \
        chain["killed_log"]
    # The abandoned branch, whole and resumable: its own out_dir with latest -> 8.
    assert _steps(aside / "checkpoints") == [7, 8] and find_latest(aside) == aside / "checkpoints" / "step_00000008"
    assert (aside / "metrics.jsonl").read_text() == (first_run / "metrics.jsonl").read_text()
    # Killed after step 6 of the new branch: its checkpoints kept, latest on its newest.
    assert k["steps"] == [4, 5, 6] and k["latest"] == 6 and k["found"] == _step(out, 6)
    assert k["branch"]["branch"] == 1 and k["branch"]["start_step"] == 4
    assert k["branch"]["from"] == str(_step(out, 4))
    assert k["state6"]["branch"] == 1 and k["state6"]["branch_start_step"] == 4
    assert k["files5"]["previous"] == "step_00000004" and k["files6"]["previous"] == "step_00000005"
    assert k["files6"]["branch"] == 1


def test_auto_continues_the_new_branch_and_retention_keeps_it(chain, first_run):
    a = chain["after_auto"]
    assert "resumed from step 6 (" in chain["resumed"].stdout
    assert "starts branch" not in chain["resumed"].stderr and "moved" not in chain["resumed"].stderr
    # keep_last=2 (7, 8 of the new branch) + keep_every=4 (4): the rewound branch's checkpoints survive.
    assert a["steps"] == [4, 7, 8] and a["latest"] == 8
    assert a["states"][7]["branch"] == a["states"][8]["branch"] == 1
    assert a["states"][4]["branch"] == 0  # the step the branch started from, saved on branch 0
    # metrics.jsonl reads as one run: the first run up to step 4, then the new branch (step 5's
    # loss is still computed with step 4's weights; the other learning rate shows from step 6).
    old = _losses(first_run)
    assert sorted(a["losses"]) == list(range(1, 9))
    assert all(a["losses"][s] == old[s] for s in range(1, 6))
    assert all(a["losses"][s] != old[s] for s in range(6, 9))


def test_metrics_say_where_the_branch_started(chain):
    """Needs the trainer's wiring: ``JsonlSink.write_event(ckpt.branch_event)`` after resume."""
    events = chain["after_auto"]["events"]
    assert len(events) == 1, events
    e = events[0]
    assert (e["branch"], e["step"], e["from"]) == (1, 4, str(_step(chain["out"], 4)))
    assert e["abandoned"] == str(chain["aside"]) and e["abandoned_steps"] == [7, 8]
    ext = _events(chain["out"])[-1]
    assert (ext["branch"], ext["step"], ext["from"]) == (2, 8, str(chain["origin"].resolve()))


def test_resume_from_another_out_dirs_checkpoint_starts_a_branch(chain, first_run):
    out, r = chain["out"], chain["external"]
    assert f"resuming from {chain['origin']} starts branch 2 of {out} at step 8" in r.stderr
    assert f"resumed from step 8 ({chain['origin']})" in r.stdout
    # The branch that was here (1) is set aside too; the new one holds its start's history.
    second = [p for p in (out / "abandoned").iterdir() if p != chain["aside"]]
    assert len(second) == 1 and _steps(second[0] / "checkpoints") == [4, 7, 8]
    assert _steps(out / "checkpoints") == [9] and latest_step(out) == 9
    assert _state(_step(out, 9))["branch"] == 2 and _state(_step(out, 9))["branch_start_step"] == 8
    assert json.loads((_step(out, 9) / "files.json").read_text())["previous"] is None
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 10))
    assert all(losses[s] == v for s, v in _losses(first_run).items())  # steps 1..8: the origin's run


@pytest.fixture(scope="module")
def never_run(first_run, tiny_manifest, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``--resume never`` for 3 steps in a copy of the first run."""
    out = tmp_path_factory.mktemp("never") / "run"
    shutil.copytree(first_run, out)
    r = run_train(1, _args(tiny_manifest, out, 3), resume="never")
    _ok(r)
    return out, r


def test_resume_never_in_a_used_out_dir_starts_a_branch(never_run):
    out, r = never_run
    assert "--resume never: moved the previous run" in r.stderr and "starting branch 1 at step 0" in r.stderr
    (aside,) = list((out / "abandoned").iterdir())
    assert _steps(aside / "checkpoints") == [4, 7, 8]
    assert _steps(out / "checkpoints") == [2, 3] and latest_step(out) == 3
    assert _state(_step(out, 3))["branch"] == 1 and _state(_step(out, 3))["branch_start_step"] == 0
    assert read_branch(out)["branch"] == 1 and read_branch(out)["start_step"] == 0
    assert sorted(_losses(out)) == [1, 2, 3]


def test_metrics_say_where_the_new_run_started(never_run):
    """Needs the trainer's wiring, as ``test_metrics_say_where_the_branch_started``."""
    out, _ = never_run
    (aside,) = list((out / "abandoned").iterdir())
    assert [(e["branch"], e["step"], e["from"], e["abandoned"], e["abandoned_steps"]) for e in _events(out)] == \
        [(1, 0, None, str(aside), [4, 7, 8])]


# ---------------------------------------------------------------------------------------------
# A kill in the middle of starting a branch, and the branch event record; no process needed.

def _planted(out: Path, step: int, branch: int) -> Path:
    """A checkpoint's required files (engine state empty: nothing here loads it)."""
    d = _step(out, step)
    (d / "engine").mkdir(parents=True)
    for f in ("engine.json", "config.yaml", "rank_00000.pt"):
        (d / f).write_text("{}")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "branch": branch}))
    return d


def _branch_record(out: Path, branch: int, start: int) -> None:
    (out / "checkpoints" / "branch.json").write_text(json.dumps({"branch": branch, "start_step": start}))


def test_a_kill_during_a_rewind_leaves_the_abandoned_branch_disowned(tmp_path):
    from slam_pretrain.training.checkpoint import CheckpointManager

    out = tmp_path / "run"
    for s in (2, 4, 6):
        _planted(out, s, branch=0)
    (out / "checkpoints" / "latest").write_text("step_00000006")
    _branch_record(out, 1, 2)  # written first; the kill came before 4 and 6 were moved
    assert find_latest(out) == _step(out, 2)
    mgr = CheckpointManager(out, keep_last=3)
    assert mgr.resume_point("auto") == _step(out, 2) and mgr.branch_event is None
    assert (mgr.branch, mgr.branch_start_step) == (1, 2)
    (aside,) = list((out / "abandoned").iterdir())
    assert _steps(aside / "checkpoints") == [4, 6] and _steps(out / "checkpoints") == [2]
    assert latest_step(out) == 2


def test_retention_counts_and_deletes_only_the_current_branch(tmp_path):
    from slam_pretrain.training.checkpoint import CheckpointManager

    out = tmp_path / "run"
    for s, b in ((2, 0), (3, 1), (4, 1), (5, 1), (9, 0)):  # 9: left by a kill, disowned
        _planted(out, s, branch=b)
    (out / "checkpoints" / "latest").write_text("step_00000005")
    _branch_record(out, 1, 2)
    mgr = CheckpointManager(out, keep_last=2, keep_every=3)
    mgr._retain()  # what runs after every publish
    assert _steps(out / "checkpoints") == [3, 4, 5, 9]  # last 2 (4, 5), every 3rd (3); 9 not this branch's


def test_a_kill_during_resume_never_leaves_nothing_to_resume(tmp_path):
    from slam_pretrain.training.checkpoint import CheckpointManager

    out = tmp_path / "run"
    for s in (4, 8):
        _planted(out, s, branch=0)
    (out / "metrics.jsonl").write_text('{"step": 8, "loss": 1.0}\n')
    _branch_record(out, 1, 0)  # --resume never wrote it, then died before moving anything
    assert find_latest(out) is None
    mgr = CheckpointManager(out)
    assert mgr.resume_point("auto") is None
    (aside,) = list((out / "abandoned").iterdir())
    assert _steps(aside / "checkpoints") == [4, 8] and (aside / "metrics.jsonl").is_file()
    assert _steps(out / "checkpoints") == [] and not (out / "metrics.jsonl").exists()


def test_the_branch_event_survives_a_resume_from_its_step(tmp_path):
    from slam_pretrain.training.metrics import JsonlSink

    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for s in (1, 2, 3):
        sink.write({"step": s, "loss": 1.0 / s})
    with pytest.raises(ValueError, match="'event'"):
        sink.write_event({"step": 2})
    sink.close()
    sink = JsonlSink(path, resume_step=2)  # a rewind to step 2: the record of step 3 goes
    sink.write_event({"event": "branch", "branch": 1, "step": 2, "from": "x/step_00000002"})
    sink.write({"step": 3, "loss": 0.5})
    sink.close()
    sink = JsonlSink(path, resume_step=2)  # killed before the next checkpoint, resumed from step 2 again
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
        {"event": "branch", "branch": 1, "step": 2, "from": "x/step_00000002"}]
