"""What a checkpoint is on disk and how it is read, without writing one: the layout, finding and
verifying checkpoints, branches, setting another run's outputs aside, and compatibility checks.

```
out_dir/checkpoints/step_00000100/
  engine/              engine state (DeepSpeed save_checkpoint tree, or a DCP directory)
  engine.json          {"name", "zero_stage", "world_size", "precision"}
  rank_00000.pt ...    per-rank RNG and loader state (tensors + plain data only)
  trainer_state.json   step, tokens, bad-step counters, tracking run id, branch, branch_start_step
  config.yaml          the resolved config
  checksums.json       tokenizer and manifest sha256
  tokenizer.model      copy of the tokenizer
  files.json           size and sha256 of every other file, written last before the publish
out_dir/checkpoints/latest        "step_00000100", replaced atomically
out_dir/checkpoints/branch.json   the branch new checkpoints belong to (see read_branch)
out_dir/abandoned/<time>/         what --resume never (or a new branch) set aside
```

A directory without its final name is never a checkpoint. ``latest`` is followed (one step
further when the rename happened but the pointer update did not), never a higher step of another
run or branch; a checkpoint that does not verify (a truncated file) is skipped with a message for
the newest older one that does. Writing and loading (``CheckpointManager``) is in
``checkpoint.py``, which re-exports the public names of this module.

Everything is read back with JSON or YAML (``safe_load``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from data_pipeline.storage import atomic_write, fsync_dir, sha256_of
from slam_pretrain.errors import UserError
from slam_pretrain.model import ModelConfig

STEP_RE = re.compile(r"^step_(\d{8})$")
REQUIRED = ("engine", "engine.json", "trainer_state.json", "config.yaml", "rank_00000.pt")
# {"format": 1, "previous": "step_..." or null, "files": {relative path: {"size": bytes, "sha256": hex}}}
FILES = "files.json"
BRANCH = "branch.json"  # out_dir/checkpoints/branch.json: the branch new checkpoints belong to
ABANDONED = "abandoned"  # out_dir/abandoned/<time>/: runs and branches set aside, laid out as an out_dir
VERIFY_MODES = ("size", "full", "none")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Durable writes (the writer's, and set_aside's: the ``latest`` of the folder it fills).

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path, skip: Optional[str] = None) -> None:
    """fsync every file and folder under ``root`` (but the top-level entry ``skip``)."""
    for dirpath, dirs, files in os.walk(root):
        if skip is not None and Path(dirpath) == root and skip in dirs:
            dirs.remove(skip)
        for f in files:
            _fsync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


def _write_text(path: Path, text: str, fsync: bool = True) -> None:
    with open(path, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Finding checkpoints.

def is_complete(path: Path) -> bool:
    """A published checkpoint: final name and every required file present."""
    path = Path(path)
    return bool(STEP_RE.match(path.name)) and path.is_dir() and all((path / f).exists() for f in REQUIRED)


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_XXXXXXXX`` entry under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)))


def verify_checkpoint(path: Union[str, Path], full: bool = False) -> Optional[str]:
    """None when the checkpoint in ``path`` is intact, else what is wrong, naming the file.

    Sizes are checked against ``files.json`` always (cheap: a truncated file is the common damage
    of a full disk or a killed copy), sha256 only with ``full`` (reads every byte). A checkpoint
    written before ``files.json`` existed is only checked for its required files.
    """
    path = Path(path)
    if not is_complete(path):
        missing = [f for f in REQUIRED if not (path / f).exists()]
        return f"missing {', '.join(missing) or 'its step_XXXXXXXX name'}"
    manifest = path / FILES
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    for rel, want in files.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{f} is missing"
        if size != want["size"]:
            return f"{f} has {size:,} bytes, {want['size']:,} were written (truncated or overwritten)"
        if full and sha256_of(str(f)) != want["sha256"]:
            return f"{f} does not match the sha256 recorded when it was written (corrupted)"
    return None


def _pointer_step(root: Path) -> Optional[int]:
    try:
        m = STEP_RE.match((root / "latest").read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


def _previous_of(path: Path) -> Optional[str]:
    """The checkpoint ``path`` follows in its run (files.json), or None when unknown."""
    try:
        return json.loads((path / FILES).read_text()).get("previous")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Branches. Resuming from an older checkpoint, or starting over in a used out_dir, starts a new
# branch: the abandoned branch's later checkpoints are moved aside (set_aside), and
# ``checkpoints/branch.json`` records the branch that later checkpoints belong to. It is written
# before anything is moved, so a kill in the middle of the move leaves checkpoints that the
# record disowns: find_latest and retention pass over them, and the next start moves them too.
# Every checkpoint records its branch in trainer_state.json ("branch", "branch_start_step").

def read_branch(out_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    """``checkpoints/branch.json`` ({"branch", "start_step", "from", "started"}), or None when no
    branch was ever started in ``out_dir`` (everything in it is branch 0)."""
    try:
        data = json.loads((Path(out_dir) / "checkpoints" / BRANCH).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("branch"), int)
            and isinstance(data.get("start_step"), int)):
        return None
    return data


def branch_of(path: Union[str, Path]) -> Optional[int]:
    """The branch the checkpoint in ``path`` was saved on (0 when it predates branches), or None
    when its trainer_state.json cannot be read."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
        return int(state.get("branch", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def on_branch(step: int, path: Path, branch: Optional[dict[str, Any]]) -> bool:
    """Whether a checkpoint is part of ``branch``'s history: at or before the step it started
    from, or saved on it. An unreadable one counts (verification then says what is wrong)."""
    if branch is None or step <= branch["start_step"]:
        return True
    saved_on = branch_of(path)
    return saved_on is None or saved_on == branch["branch"]


def holds_a_run(out_dir: Union[str, Path]) -> bool:
    """Whether ``out_dir`` holds outputs of an earlier run (a checkpoint, even a damaged one,
    metrics.jsonl, config.yaml or an export): starting over there starts a new branch."""
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    if root.is_dir() and any(STEP_RE.match(p.name) for p in root.iterdir()):
        return True
    return any((out_dir / f).exists() for f in ("metrics.jsonl", "config.yaml", "export"))


def find_latest(out_dir: Union[str, Path], verify: str = "size",
                on_skip: Optional[Callable[[Path, str], None]] = None) -> Optional[Path]:
    """The checkpoint a resume of the run in ``out_dir`` continues from, or None.

    ``latest`` names the run's newest checkpoint. A higher step is taken only when its
    ``files.json`` says it follows the pointed one (a kill between the publishing rename and the
    pointer update); any other higher step is not this run's and is never chosen. The choice is
    verified (``verify``: size, full or none, see ``verify_checkpoint``); a checkpoint that does
    not verify is passed over for the newest older one that does, and ``on_skip(path, problem)``
    hears about it. Without a pointer every complete checkpoint is a candidate; ``.tmp_*``
    directories are ignored, and so are checkpoints of a branch ``branch.json`` disowns.
    """
    root = Path(out_dir) / "checkpoints"
    branch = read_branch(out_dir)
    # Checkpoints of an abandoned branch that a kill left behind are never candidates.
    complete = [(s, p) for s, p in list_checkpoints(out_dir) if on_branch(s, p, branch)]
    limit = _pointer_step(root)
    if limit is not None:
        pointed = step_dir_name(limit)
        for step, path in complete:
            if step > limit and _previous_of(path) == pointed:
                limit = step
                break
    for step, path in reversed(complete):
        if limit is not None and step > limit:
            continue
        problem = None if verify == "none" else verify_checkpoint(path, full=verify == "full")
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def _moved_aside_folder(out_dir: Path) -> Path:
    base = out_dir / ABANDONED / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    return dest


def set_aside(out_dir: Union[str, Path], after_step: Optional[int], reason: str) -> Optional[tuple[Path, list[int]]]:
    """Move another run's (or branch's) outputs to ``out_dir/abandoned/<time>/``; never delete them.

    ``after_step=None`` (``--resume never``): every checkpoint, ``metrics.jsonl``, ``config.yaml``
    and ``export/``. ``after_step=N`` (a resume from step N with newer checkpoints beside it):
    the checkpoints above N and ``export/`` are moved, ``metrics.jsonl`` is copied (the resumed run
    keeps its first N steps). The folder is laid out as an out_dir (``checkpoints/latest`` names
    its newest step), so ``export``/``generate``/``--resume`` accept it. Returns (folder, steps
    moved), or None when there was nothing to set aside. Rank 0 only.
    """
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    steps = [(s, p) for s, p in _step_dirs(root) if after_step is None or s > after_step]
    run_files = [out_dir / "metrics.jsonl", out_dir / "export"]
    if after_step is None:
        run_files.append(out_dir / "config.yaml")
    if not steps and not (after_step is None and any(f.exists() for f in run_files)):
        return None
    dest = _moved_aside_folder(out_dir)
    (dest / "checkpoints").mkdir(parents=True)
    (dest / "reason.txt").write_text(reason + "\n")
    for _, p in steps:
        shutil.move(str(p), str(dest / "checkpoints" / p.name))
    if steps:
        pointer = _pointer_step(root)
        newest = pointer if pointer in [s for s, _ in steps] else steps[-1][0]
        _write_text(dest / "checkpoints" / "latest", step_dir_name(newest))
    for f in run_files:
        if not f.exists():
            continue
        if f.name == "metrics.jsonl" and after_step is not None:
            shutil.copy2(f, dest / f.name)
        else:
            shutil.move(str(f), str(dest / f.name))
    if after_step is None:
        (root / "latest").unlink(missing_ok=True)
    else:
        atomic_write(root / "latest", step_dir_name(after_step))
    fsync_dir(root)
    fsync_dir(out_dir)
    return dest, [s for s, _ in steps]


# ---------------------------------------------------------------------------------------------
# Compatibility.

def _as_config_dict(config: Any) -> Optional[dict[str, Any]]:
    if config is None:
        return None
    if isinstance(config, str):
        return yaml.safe_load(config) or {}
    if isinstance(config, dict):
        return config
    return config.to_dict()  # a Config


def _run_seed(config: Any, path: Path) -> int:
    """``run.seed`` of ``config``, else of the checkpoint's config.yaml, else 0."""
    for source in (lambda: _as_config_dict(config), lambda: yaml.safe_load((path / "config.yaml").read_text())):
        try:
            seed = (source() or {}).get("run", {}).get("seed")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(seed, int):
            return seed
    return 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path.parent} is damaged: {path} is unreadable "
                        f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path.parent} is damaged: {path} does not hold a JSON object")
    return data


def is_damage_error(e: BaseException) -> bool:
    """An exception a truncated or corrupted file raises while torch/DeepSpeed read it."""
    if isinstance(e, (EOFError, OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError)):
        return True  # torch's zip reader says OSError(EINVAL) for a truncated file
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "PytorchStreamReader", "failed finding central directory", "invalid header or archive is corrupted",
        "unexpected EOF", "Ran out of input"))


def _load_error(path: Path, what: Path, e: BaseException) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"checkpoint {path} is damaged: reading {what} failed ({first}); resume from an older "
                     f"checkpoint (--resume auto skips damaged ones)")


def check_compatible(path: Path, config: Any = None, checksums: Optional[dict[str, Any]] = None) -> list[str]:
    """UserError naming what differs when the checkpoint in ``path`` cannot continue this run:
    any key of the ``model`` section, the engine name, or a ``*tokenizer*`` checksum present on
    both sides. Returns the other checksum keys that differ (e.g. the manifest: the loader checks
    the dataset identity itself), for a warning."""
    path = Path(path)
    current = _as_config_dict(config)
    if current is not None:
        saved_path = path / "config.yaml"
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"checkpoint {path} is damaged: {saved_path} is unreadable "
                            f"({str(e).splitlines()[0][:120]})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise UserError(f"checkpoint {path} is damaged: {saved_path} holds no model section "
                            f"({'empty' if not saved else 'not a mapping of sections'})")
        old_model, new_model = saved.get("model", {}), current.get("model", {})
        # A key missing from a saved section is a field that did not exist yet when it was saved:
        # its default (layout_revision: 1, since revision 2 is when it started being recorded).
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        old_model = {**defaults, "layout_revision": 1, **old_model}
        diff = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
        if diff:
            shown = ", ".join(f"model.{k}: checkpoint {old_model.get(k)!r} vs config {new_model.get(k)!r}"
                              for k in diff[:5])
            raise UserError(f"checkpoint {path} was trained with another model config ({shown}); "
                            f"use the same model section, or --resume never / another run.out_dir")
        old_engine = _read_json(path / "engine.json").get("name")
        new_engine = current.get("engine", {}).get("name")
        if new_engine and old_engine != new_engine:
            raise UserError(f"checkpoint {path} holds a {old_engine!r} engine state; engine.name={new_engine!r} "
                            f"cannot load it (set engine.name={old_engine!r}, or export and start a new run)")
    differing: list[str] = []
    if checksums:
        saved_sums = _read_json(path / "checksums.json") if (path / "checksums.json").is_file() else {}
        for key, value in checksums.items():
            old = saved_sums.get(key)
            if value is None or old is None or old == value:
                continue
            if "tokenizer" in key:
                raise UserError(f"checkpoint {path} was trained with another tokenizer: {key} is {str(old)[:12]}... "
                                f"in the checkpoint but {str(value)[:12]}... now; use the dataset/tokenizer it was "
                                f"trained with, or --resume never")
            differing.append(key)
    return differing
