"""Faults around checkpoints, through the real CLI where the fault is the CLI's: every failure is
one clear line, nothing is silently wrong (issue 10).

1. ``--resume never`` in an out_dir that holds a run moves that run aside (nothing lost); the
   new run's done line, export and ``latest`` name its own checkpoint; ``--resume auto``
   continues the new run.
2. A truncated file in the newest checkpoint (model states, optimizer states, rank file,
   trainer_state.json, config.yaml): ``--resume auto`` skips it with a message and resumes from the
   previous one (bitwise as if nothing happened); an explicit ``--resume``, ``export`` and
   ``generate`` name the file in one line.
3. A full disk during a save (a real 8 MB tmpfs in a private mount namespace) and a read-only
   out_dir (fresh and resumed; a read-only mount, since root ignores chmod) are one line naming
   the path and the cause; nothing is published half-written.
"""

from __future__ import annotations

import errno
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from slam_pretrain.training.checkpoint import CheckpointManager
from slam_pretrain.training.checkpoint_files import check_compatible, find_latest, verify_checkpoint
from slam_pretrain.errors import UserError
from train_utils import REPO, base_overrides, env_for_tests, latest_step, losses, run_train, train_cmd

STEPS, INTERVAL = 8, 4  # the reference run: checkpoints at steps 4 and 8


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


def _one_line_error(r: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one error line naming every fragment; returns it."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith(f"slam-pretrain {command}: error: ")]
    assert len(errors) == 1, r.stderr[-4000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slam_pretrain", *args], cwd=REPO, env=env_for_tests(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_manifest) -> Path:
    """A finished 8-step DeepSpeed ZeRO-1 run (checkpoints 4 and 8); copy it before changing it."""
    out = tmp_path_factory.mktemp("ckpt_faults") / "run"
    _ok(run_train(1, base_overrides(tiny_manifest, out, steps=STEPS, interval=INTERVAL)))
    assert latest_step(out) == STEPS
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _step(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def _previous(checkpoint: Path) -> str:
    """The checkpoint ``checkpoint`` follows in its run, as its files.json records it."""
    return json.loads((checkpoint / "files.json").read_text())["previous"]


# The files of a checkpoint that a truncation used to turn into a long traceback.
DAMAGE = {
    "model_states": lambda d: next((d / "engine").rglob("*_model_states.pt")),
    "optim_states": lambda d: next((d / "engine").rglob("*_optim_states.pt")),
    "rank_file": lambda d: d / "rank_00000.pt",
    "trainer_state": lambda d: d / "trainer_state.json",
    "config_yaml": lambda d: d / "config.yaml",
}


# ---------------------------------------------------------------------------------------------
# 1. --resume never in a used out_dir.

def test_resume_never_sets_the_old_run_aside(finished_run, tiny_manifest, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    old_metrics = (out / "metrics.jsonl").read_text()
    # A new run, shorter and with another cadence: checkpoints 3 and 6.
    r = run_train(1, base_overrides(tiny_manifest, out, steps=6, interval=3), resume="never")
    _ok(r)
    assert "--resume never: moved the previous run" in r.stderr
    assert f"checkpoint {_step(out, 6)};" in r.stdout  # the done line names this run's checkpoint
    assert "resumed from" not in r.stdout
    assert latest_step(out) == 6 and find_latest(out) == _step(out, 6)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    assert _previous(_step(out, 3)) is None and _previous(_step(out, 6)) == "step_00000003"
    from safetensors import safe_open

    with safe_open(str(out / "export" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "6" and meta["source"] == str(_step(out, 6).resolve())
    assert sorted(losses(out)) == list(range(1, 7))
    # The old run, whole, in one folder laid out as an out_dir (export/generate/--resume accept it).
    (aside,) = list((out / "abandoned").iterdir())
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (aside / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    assert find_latest(aside) == aside / "checkpoints" / "step_00000008"
    assert (aside / "export" / "model.safetensors").is_file() and (aside / "reason.txt").is_file()
    # --resume auto continues the new run, not the old one.
    r = run_train(1, base_overrides(tiny_manifest, out, steps=7, interval=3))
    _ok(r)
    assert f"resumed from step 6 ({_step(out, 6)})" in r.stdout
    assert sorted(losses(out)) == list(range(1, 8)) and latest_step(out) == 7


# ---------------------------------------------------------------------------------------------
# 2. Damaged checkpoints.

@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_auto_skips_a_damaged_checkpoint(finished_run, tmp_path, capsys, kind):
    out = _copy(finished_run, tmp_path / "run")
    damaged = DAMAGE[kind](_step(out, 8))
    _truncate(damaged)
    problem = verify_checkpoint(_step(out, 8))
    assert problem is not None and str(damaged) in problem and "truncated" in problem
    assert verify_checkpoint(_step(out, 4)) is None
    mgr = CheckpointManager(out, keep_last=3)
    with pytest.raises(UserError, match=rf"checkpoint is damaged or incomplete: {re.escape(str(damaged))}"):
        mgr.resume_point(str(_step(out, 8)))
    assert mgr.resume_point("auto") == _step(out, 4)
    err = capsys.readouterr().err
    assert f"warning: skipping damaged checkpoint {_step(out, 8)}: {damaged}" in err
    # Nothing lost, nothing mixed: the damaged checkpoint is set aside, ``latest`` names step 4.
    (aside,) = list((out / "abandoned").iterdir())
    assert (aside / "checkpoints" / "step_00000008").is_dir() and not _step(out, 8).exists()
    assert latest_step(out) == 4 and (aside / "metrics.jsonl").is_file() and (out / "metrics.jsonl").is_file()


def test_full_verification_and_legacy_checkpoints(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    states = DAMAGE["optim_states"](_step(out, 8))
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 sees it
    states.write_bytes(bytes(data))
    assert verify_checkpoint(_step(out, 8)) is None
    assert "sha256" in verify_checkpoint(_step(out, 8), full=True)
    assert find_latest(out, verify="full") == _step(out, 4) and find_latest(out) == _step(out, 8)

    # A checkpoint written before files.json: damage is still one line when it is read.
    class StubEngine:  # the engine state itself is not what is damaged here
        name = "deepspeed"

        def load(self, d: Path) -> None:
            pass

    legacy = _step(out, 4)
    (legacy / "files.json").unlink()
    _truncate(legacy / "rank_00000.pt")
    assert verify_checkpoint(legacy) is None
    with pytest.raises(UserError, match=r"is damaged: reading .*rank_00000\.pt failed"):
        CheckpointManager(out).load(legacy, StubEngine())
    (legacy / "config.yaml").write_text("")
    with pytest.raises(UserError, match=r"config\.yaml holds no model section \(empty\)"):
        check_compatible(legacy, {"model": {}})


def test_resume_from_an_older_step_sets_newer_ones_aside(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    assert CheckpointManager(out).resume_point(str(_step(out, 4))) == _step(out, 4)
    (aside,) = list((out / "abandoned").iterdir())
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["latest", "step_00000008"]
    assert latest_step(out) == 4 and find_latest(out) == _step(out, 4)


def test_damaged_checkpoint_through_the_cli(finished_run, tiny_manifest, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    model_states = DAMAGE["model_states"](_step(out, 8))
    _truncate(model_states)
    args = base_overrides(tiny_manifest, out, steps=STEPS, interval=INTERVAL)
    # An explicit --resume to the damaged checkpoint: one line naming the file.
    r = run_train(1, args, resume=str(_step(out, 8)))
    _one_line_error(r, "train", str(model_states), "damaged")
    # export / generate from it, or from the run whose newest checkpoint it is.
    _one_line_error(_cli("export", "--checkpoint", str(_step(out, 8)), "--out", str(tmp_path / "m.safetensors")),
                    "export", str(model_states))
    _one_line_error(_cli("generate", "--checkpoint", str(out), "--input", "def "), "generate",
                    str(model_states), f"the newest intact one is {_step(out, 4)}")
    assert not (tmp_path / "m.safetensors").exists()
    # --resume auto falls back to step 4 and reproduces the original steps 5..8 bitwise.
    r = run_train(1, args)
    _ok(r)
    assert f"warning: skipping damaged checkpoint {_step(out, 8)}: {model_states}" in r.stderr
    assert f"resumed from step 4 ({_step(out, 4)})" in r.stdout
    assert losses(out) == losses(finished_run)
    assert verify_checkpoint(_step(out, 8)) is None and latest_step(out) == 8
    assert _previous(_step(finished_run, 8)) == "step_00000004" and _previous(_step(out, 8)) == "step_00000004"
    (aside,) = list((out / "abandoned").iterdir())
    assert (aside / "checkpoints" / "step_00000008").is_dir()  # the damaged one, kept for inspection


# ---------------------------------------------------------------------------------------------
# 3. Full disk and read-only out_dir.

def _namespace() -> Optional[list[str]]:
    """``unshare`` flags for a private mount namespace where tmpfs can be mounted, or None."""
    if shutil.which("unshare") is None:
        return None
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run(["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"],
                               capture_output=True)
            if r.returncode == 0:
                return ["unshare", *flags]
    return None


NAMESPACE = _namespace()
needs_mounts = pytest.mark.skipif(NAMESPACE is None, reason="no private mount namespace here (unshare/mount)")


def _train_in_namespace(setup: str, args: list[str], after: str = "", timeout: float = 300
                        ) -> subprocess.CompletedProcess:
    """The real CLI after ``setup`` (shell, e.g. mounts) in a private mount namespace; ``after``
    runs there before the mounts vanish (e.g. to list what was left)."""
    script = f"set -e; {setup}; set +e; {shlex.join(train_cmd(1, args))}; rc=$?; {after or 'true'}; exit $rc"
    return subprocess.run([*NAMESPACE, "sh", "-c", script], cwd=REPO, env=env_for_tests(), capture_output=True,
                          text=True, timeout=timeout)


@needs_mounts
def test_full_disk_during_save(tiny_manifest, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    listing = tmp_path / "left.txt"
    # 8 MB: the step-4 checkpoint (~6 MB) fits, the step-8 one does not.
    args = base_overrides(tiny_manifest, out, steps=STEPS, interval=INTERVAL)
    r = _train_in_namespace(f"mount -t tmpfs -o size=8m tmpfs {out}", args,
                            after=f"ls -a {out}/checkpoints > {listing}; cat {out}/checkpoints/latest >> {listing}")
    line = _one_line_error(r, "train", "No space left on device", "ENOSPC", str(out / "checkpoints"))
    assert "step_00000008 was not saved" in line and "the newest is still step_00000004" in line
    left = listing.read_text().split()
    # Nothing half-written is published or left behind; the previous checkpoint is still the newest.
    assert "step_00000004" in left and "step_00000008" not in left
    assert not [n for n in left if n.startswith(".tmp_")] and left[-1] == "step_00000004"


def test_save_failure_is_one_line_and_publishes_nothing(tmp_path):
    """The save path's error handling, with an engine whose save fails (no mount needed)."""

    class FailingEngine:
        name = "deepspeed"

        def __init__(self, error: BaseException):
            self.error = error

        def save(self, d: Path) -> None:
            d.mkdir(parents=True)
            (d / "part.pt").write_bytes(b"\0" * 100)
            raise self.error

        def meta(self) -> dict:
            return {"name": self.name}

    mgr = CheckpointManager(tmp_path)
    for error, fragments in (
            (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt")),
             ["No space left on device (ENOSPC)", str(tmp_path / "x.pt"), "free some space"]),
            (OSError(errno.EDQUOT, "Disk quota exceeded"), ["Disk quota exceeded (EDQUOT)", ".tmp_step_00000005"]),
            (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
             ["unexpected pos", ".tmp_step_00000005"])):  # the probe write succeeds: torch's words
        with pytest.raises(UserError) as e:
            mgr.save(5, FailingEngine(error), rank_state={}, trainer_state={}, config_yaml="", checksums={})
        msg = str(e.value)
        assert "\n" not in msg and "step_00000005 was not saved" in msg and all(f in msg for f in fragments), msg
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []  # no tmp, no step, no latest
    with pytest.raises(ValueError, match="a bug"):  # anything else is not dressed up as a user error
        mgr.save(5, FailingEngine(ValueError("a bug")), rank_state={}, trainer_state={}, config_yaml="",
                 checksums={})


def test_out_dir_where_a_file_is(tiny_manifest, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_train(1, base_overrides(tiny_manifest, blocker / "run"))
    _one_line_error(r, "train", f"run.out_dir='{blocker / 'run'}' is not writable", "Not a directory")


@needs_mounts
def test_read_only_out_dir_fresh_and_resumed(finished_run, tiny_manifest, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = _train_in_namespace(f"mount -t tmpfs -o size=1m,ro tmpfs {ro}", base_overrides(tiny_manifest, ro / "run"))
    _one_line_error(r, "train", str(ro / "run"), "Read-only file system (EROFS)")
    # Resuming a run whose folder has become read-only: refused before anything is changed.
    out = _copy(finished_run, tmp_path / "run")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    args = base_overrides(tiny_manifest, out, steps=STEPS + 2, interval=INTERVAL)
    r = _train_in_namespace(f"mount --bind {out} {out}; mount -o remount,bind,ro {out}", args)
    _one_line_error(r, "train", str(out / "checkpoints"), "Read-only file system")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    json.loads((out / "checkpoints" / "step_00000008" / "files.json").read_text())  # untouched, intact
