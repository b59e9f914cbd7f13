"""Checkpoint layout, atomic publish, ``latest``, retention, verification and RNG state.

```
out_dir/checkpoints/step_00000100/
  engine/              engine state (DeepSpeed save_checkpoint tree, or a DCP directory)
  engine.json          {"name", "zero_stage", "world_size", "precision"}
  rank_00000.pt ...    per-rank RNG and loader state (tensors + plain data only)
  trainer_state.json   step, tokens, bad-step counters, tracking run id, ...
  config.yaml          the resolved config
  checksums.json       tokenizer and manifest sha256
  tokenizer.model      copy of the tokenizer
  files.json           size and sha256 of every other file, written last before the publish
out_dir/checkpoints/latest   "step_00000100", replaced atomically
out_dir/abandoned/<time>/    what --resume never (or a resume from an older step) set aside
```

Publishing: every rank writes into ``.tmp_step_XXXXXXXX/``; rank 0 writes the small files, every
node fsyncs what it wrote, the ranks hash a share of the files each and rank 0 writes
``files.json`` (which also names the checkpoint this one follows); then rank 0 renames the
directory to ``step_XXXXXXXX`` (the commit point), fsyncs the parent, and replaces ``latest``
(temp file + rename). A directory without its final name is never loaded. ``latest`` is followed
(one step further when the rename happened but the pointer update did not), never a higher step
of another run; a checkpoint that does not verify (a truncated file) is skipped with a message
for the newest older one that does. Retention keeps the
last ``keep_last`` checkpoints plus every ``keep_every``-th step; a deleted one is first renamed
to a dot name so a half-deleted directory never looks complete. Every failure (a write error on
any rank, a damaged file) is one ``UserError`` line naming the file; a failed save removes its
temporary directory and publishes nothing.

Everything is read back with JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
import yaml

from data_pipeline.storage import atomic_write, fsync_dir, sha256_of
from slam_pretrain.distributed import all_gather_object, broadcast_object
from slam_pretrain.errors import UserError, write_error

if TYPE_CHECKING:
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine.base import Engine

STEP_RE = re.compile(r"^step_(\d{8})$")
REQUIRED = ("engine", "engine.json", "trainer_state.json", "config.yaml", "rank_00000.pt")
# {"format": 1, "previous": "step_..." or null, "files": {relative path: {"size": bytes, "sha256": hex}}}
FILES = "files.json"
ABANDONED = "abandoned"  # out_dir/abandoned/<time>/: runs and branches set aside, laid out as an out_dir
VERIFY_MODES = ("size", "full", "none")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG state (plain data + tensors, so weights_only loading accepts it).

def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo ``capture_rng``: the generators continue exactly where they were captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# Durable writes.

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
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


def _files_of(d: Path) -> list[str]:
    """Every file under ``d`` but ``files.json``, as sorted relative POSIX paths."""
    out = []
    for dirpath, _, files in os.walk(d):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(d).as_posix()
            if rel != FILES:
                out.append(rel)
    return sorted(out)


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


def find_latest(out_dir: Union[str, Path], verify: str = "size",
                on_skip: Optional[Callable[[Path, str], None]] = None) -> Optional[Path]:
    """The checkpoint a resume of the run in ``out_dir`` continues from, or None.

    ``latest`` names the run's newest checkpoint. A higher step is taken only when its
    ``files.json`` says it follows the pointed one (a kill between the publishing rename and the
    pointer update); any other higher step is not this run's and is never chosen. The choice is
    verified (``verify``: size, full or none, see ``verify_checkpoint``); a checkpoint that does
    not verify is passed over for the newest older one that does, and ``on_skip(path, problem)``
    hears about it. Without a pointer every complete checkpoint is a candidate; ``.tmp_*``
    directories are ignored.
    """
    root = Path(out_dir) / "checkpoints"
    complete = list_checkpoints(out_dir)
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
    steps = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and (after_step is None or int(m.group(1)) > after_step):
                steps.append((int(m.group(1)), p))
    steps.sort()
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
        old_model = {"layout_revision": 1, **old_model}  # saved before revision 2 recorded it
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


# ---------------------------------------------------------------------------------------------
# The manager.

def _write_failure(e: BaseException, where: Path) -> Optional[UserError]:
    """A UserError for a failed checkpoint write, or None when ``e`` is not one (a bug: re-raised).

    torch's zip writer reports a full disk as "unexpected pos N vs M" without an errno: a small
    probe write next to the failed one recovers the cause (ENOSPC, EDQUOT, ...).
    """
    if isinstance(e, UserError):
        return e
    if isinstance(e, OSError):
        return write_error(e, where)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("PytorchStreamWriter", "unexpected pos",
                                                                   "file write failed", "inline_container")):
        probe = where / f".write_probe_{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as pe:
            return write_error(OSError(pe.errno, pe.strerror), where)  # name the folder, not the probe
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
        return UserError(f"cannot write {where}: {str(e).strip().splitlines()[0][:200]}")
    return None


class CheckpointManager:
    """Writes and reads ``out_dir/checkpoints/step_XXXXXXXX``; every rank calls ``save``/``load``.

    ``verify`` (``checkpoint.verify``): how a checkpoint is checked before it is resumed from:
    ``size`` (every file's size against ``files.json``), ``full`` (sizes and sha256) or ``none``.
    """

    def __init__(self, out_dir: Union[str, Path], keep_last: int = 2, keep_every: int = 0,
                 dist: Optional["DistInfo"] = None, verify: str = "size"):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"
        self.keep_last, self.keep_every, self.verify = keep_last, keep_every, verify
        self.rank = dist.rank if dist else 0
        self.world_size = dist.world_size if dist else 1
        self.local_rank = dist.local_rank if dist else 0
        self.is_main = self.rank == 0
        self.world_changed = False  # set by load()
        self.previous: Optional[str] = None  # the checkpoint the next save follows (files.json)
        # Rank 0 checks that out_dir is writable before anything is written, and every rank hears
        # the outcome (an error on rank 0 alone would leave the others waiting at a barrier).
        self._agree(self._on_main(self._prepare_dir))

    def _prepare_dir(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run.out_dir={str(self.out_dir)!r} is not writable: {write_error(e)}") from None
        probe = self.root / f".write_probe_{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:  # e.g. a read-only mount: say so before anything is built or moved
            cause = write_error(OSError(e.errno, e.strerror), self.root)
            raise UserError(f"run.out_dir={str(self.out_dir)!r} is not writable: {cause}") from None
        self.remove_stale()

    # -- rank agreement --------------------------------------------------------------------
    def _on_main(self, fn: Callable[[], Any], where: Optional[Path] = None) -> Optional[str]:
        return self._attempt(fn, where) if self.is_main else None

    def _attempt(self, fn: Callable[[], Any], where: Optional[Path] = None) -> Optional[str]:
        """Run ``fn``; return None, or the one-line message of a user-fixable failure."""
        try:
            fn()
            return None
        except Exception as e:  # noqa: BLE001 - sorted below; anything else is a bug and re-raised
            err = _write_failure(e, where or self.root)
            if err is None:
                raise
            return str(err)

    def _agree(self, error: Optional[str]) -> None:
        """A collective: raise the first rank's error on every rank (and the barrier it replaces)."""
        errors = [m for m in all_gather_object(error) if m]
        if errors:
            raise UserError(errors[0])

    def remove_stale(self) -> None:
        """Delete what a killed run left: ``.tmp_step_*``, half-deleted and converted scratch dirs."""
        for p in self.root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".del_step_*"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.root / ".universal", ignore_errors=True)

    def find_latest(self, on_skip: Optional[Callable[[Path, str], None]] = None) -> Optional[Path]:
        return find_latest(self.out_dir, self.verify, on_skip)

    # -- where a run starts ----------------------------------------------------------------
    def resume_point(self, resume: str) -> Optional[Path]:
        """The checkpoint to continue from for ``--resume auto|never|PATH`` (None: start at step 0).

        Rank 0 decides and tells the others. Never mixes two runs: what does not belong to the
        run that continues (everything for ``never``; checkpoints above the chosen one, damaged
        or from an abandoned branch) is moved to ``out_dir/abandoned/<time>/`` with a message.
        """
        decision: Optional[dict[str, Optional[str]]] = None
        if self.is_main:
            chosen: list[Optional[Path]] = [None]
            error = self._attempt(lambda: chosen.__setitem__(0, self._decide(resume)))
            decision = {"error": error, "path": None if error or chosen[0] is None else str(chosen[0])}
        decision = broadcast_object(decision)
        if decision["error"]:
            raise UserError(decision["error"])
        chosen = Path(decision["path"]) if decision["path"] else None
        in_root = chosen is not None and chosen.parent.resolve() == self.root.resolve()
        self.previous = chosen.name if in_root else None
        return chosen

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _decide(self, resume: str) -> Optional[Path]:
        if resume == "never":
            moved = set_aside(self.out_dir, None, "--resume never started a new run in this out_dir")
            if moved:
                folder, steps = moved
                what = f"checkpoints of steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
                self._say(f"--resume never: moved the previous run in {self.out_dir} ({what}, its metrics.jsonl "
                          f"and export) to {folder}; starting at step 0")
            return None
        if resume == "auto":
            skipped: list[tuple[Path, str]] = []
            chosen = self.find_latest(on_skip=lambda p, why: skipped.append((p, why)))
            for p, why in skipped:
                self._say(f"warning: skipping damaged checkpoint {p}: {why}")
            if chosen is None and skipped:
                raise UserError(f"no checkpoint in {self.root} verifies (newest: {skipped[0][0].name}: "
                                f"{skipped[0][1]}); --resume never starts over (moving them aside), "
                                f"--resume PATH picks one")
        else:
            chosen = Path(resume)
            if not chosen.is_dir():
                raise UserError(f"--resume {resume!r}: no such checkpoint directory; use 'auto', 'never' or a "
                                f"checkpoints/step_XXXXXXXX path")
            problem = None if self.verify == "none" else verify_checkpoint(chosen, full=self.verify == "full")
            if problem is not None:
                raise UserError(f"--resume {resume}: checkpoint is damaged or incomplete: {problem}; pass "
                                f"another checkpoint, or --resume auto for the newest one that verifies")
        if chosen is not None:
            m = STEP_RE.match(chosen.name)
            if m and chosen.parent.resolve() == self.root.resolve():
                moved = set_aside(self.out_dir, int(m.group(1)),
                                  f"the run resumed from {chosen.name}; these newer checkpoints are not "
                                  f"part of it (damaged, or a branch that was abandoned)")
                if moved:
                    folder, steps = moved
                    self._say(f"resuming from {chosen.name}: moved the newer checkpoints (steps "
                              f"{', '.join(map(str, steps))}) and a copy of metrics.jsonl to {folder}")
        return chosen

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, engine: "Engine", rank_state: dict[str, Any], trainer_state: dict[str, Any],
             config_yaml: str, checksums: dict[str, Any], tokenizer_path: Optional[Union[str, Path]] = None) -> Path:
        """Write and publish the checkpoint of ``step``; returns its final path.

        A failure on any rank (no space, permissions, an unsafe rank_state) is a UserError on
        every rank, naming the path and the cause; the temporary directory is removed and nothing
        is published, so the previous checkpoint stays the newest.
        """
        name = step_dir_name(step)
        tmp, final = self.root / f".tmp_{name}", self.root / name
        try:
            self._agree(self._on_main(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)),
                                      tmp))
            self._agree(self._attempt(lambda: self._write_rank_files(tmp, engine, rank_state), tmp))
            self._agree(self._attempt(lambda: self._write_small_files(
                tmp, engine, trainer_state, step, config_yaml, checksums, tokenizer_path), tmp))
            # Fault-injection hook for the crash-during-save test: hold the fully written but not yet
            # published checkpoint so the test can SIGKILL the run at exactly this point.
            pause = float(os.environ.get("SLAM_TEST_PAUSE_BEFORE_PUBLISH_S", "0") or 0)
            if pause > 0:
                time.sleep(pause)
            error = self._write_files_manifest(tmp)
            self._agree(error or self._on_main(lambda: (self._publish(tmp, final), self._retain())))
            self.previous = name
        except UserError as e:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = find_latest(self.out_dir, "none")
            raise UserError(f"checkpoint {name} was not saved, nothing was published"
                            f"{f' (the newest is still {newest.name})' if newest else ''}: {e}") from None
        return final

    def _write_rank_files(self, tmp: Path, engine: "Engine", rank_state: dict[str, Any]) -> None:
        engine.save(tmp / "engine")
        state = dict(rank_state)
        state.setdefault("rng", capture_rng())
        state["_rank"], state["_world_size"] = self.rank, self.world_size
        rank_file = tmp / f"rank_{self.rank:05d}.pt"
        torch.save(state, rank_file)
        try:  # fail now, not at resume time, if the trainer passed something weights_only refuses
            torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler raises several types
            raise UserError(f"rank_state for the checkpoint holds an object that weights_only loading refuses "
                            f"(use tensors and plain data): {str(e).splitlines()[0][:200]}") from None

    def _write_small_files(self, tmp: Path, engine: "Engine", trainer_state: dict[str, Any], step: int,
                           config_yaml: str, checksums: dict[str, Any],
                           tokenizer_path: Optional[Union[str, Path]]) -> None:
        if self.is_main:
            _write_text(tmp / "engine.json", json.dumps(engine.meta(), indent=1))
            _write_text(tmp / "trainer_state.json", json.dumps({**trainer_state, "step": trainer_state.get(
                "step", step)}, indent=1))
            _write_text(tmp / "config.yaml", config_yaml)
            _write_text(tmp / "checksums.json", json.dumps(checksums, indent=1))
            if tokenizer_path is not None and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        if self.local_rank == 0:
            _fsync_tree(tmp)  # flushes this node's writes (every node, on shared filesystems)

    def _write_files_manifest(self, tmp: Path) -> Optional[str]:
        """``files.json``: every rank hashes a share of the files (rank 0 lists them), rank 0 writes
        it; returns rank 0's write error, for the next agreement."""
        files = broadcast_object(_files_of(tmp) if self.is_main else None)
        mine: dict[str, Any] = {}

        def describe() -> None:
            for rel in files[self.rank::self.world_size]:
                f = tmp / rel
                mine[rel] = {"size": f.stat().st_size, "sha256": sha256_of(str(f))}

        error = self._attempt(describe, tmp)
        gathered = all_gather_object((error, mine))
        errors = [e for e, _ in gathered if e]
        if errors:
            raise UserError(errors[0])
        if not self.is_main:
            return None
        table = {}
        for _, part in gathered:
            table.update(part)
        return self._attempt(lambda: _write_text(tmp / FILES, json.dumps(
            {"format": 1, "previous": self.previous, "files": dict(sorted(table.items()))}, indent=1)), tmp)

    def _publish(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # the same step saved again (e.g. a signal right after a resume)
            old = self.root / f".del_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)  # the commit point (files.json names ``latest``'s target as previous)
        fsync_dir(self.root)
        atomic_write(self.root / "latest", final.name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _retain(self) -> None:
        complete = list_checkpoints(self.out_dir)
        keep = {s for s, _ in complete[-self.keep_last:]}
        if self.keep_every:
            keep |= {s for s, _ in complete if s % self.keep_every == 0}
        for s, p in complete:
            if s not in keep:
                doomed = self.root / f".del_{p.name}"
                try:
                    os.replace(p, doomed)  # never leave a half-deleted dir under a final name
                except OSError as e:  # the new checkpoint is published: a warning, not a failed save
                    print(f"warning: could not remove old checkpoint {p} ({e.strerror})", file=sys.stderr,
                          flush=True)
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(self.root)

    # -- load -------------------------------------------------------------------------------
    def load(self, path: Union[str, Path], engine: "Engine", *, config: Any = None,
             checksums: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Load ``path`` into ``engine``; return (trainer_state, rank_state, world_changed).

        ``config`` (Config, dict or YAML text) and ``checksums`` are checked against the checkpoint
        first (``check_compatible``). ``rank_state`` is this rank's file when the world size is the
        one that saved, else rank 0's (``world_changed`` True; the data loader's state is world-size
        independent, so rank 0's serves every new rank). Restoring RNG is the caller's call:
        ``restore_rng(rank_state["rng"])``. A file that cannot be read (damaged) is a UserError
        naming it.
        """
        path = Path(path)
        if not is_complete(path):
            missing = [f for f in REQUIRED if not (path / f).exists()]
            raise UserError(f"{path} is not a complete checkpoint (missing: {', '.join(missing) or 'step_XXXXXXXX name'})")
        differing = check_compatible(path, config, checksums)
        if differing and self.is_main:
            print(f"warning: {', '.join(differing)} differ(s) from checkpoint {path}; continuing",
                  file=sys.stderr, flush=True)
        meta = _read_json(path / "engine.json")
        if meta.get("name") != engine.name:
            raise UserError(f"checkpoint {path} holds a {meta.get('name')!r} engine state; this run uses "
                            f"engine.name={engine.name!r}")
        try:
            engine.load(path / "engine")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - only the errors of unreadable files become one line
            if is_damage_error(e):
                raise _load_error(path, path / "engine", e) from None
            raise
        trainer_state = _read_json(path / "trainer_state.json")
        saved_world = int(meta.get("world_size", 1))
        self.world_changed = saved_world != self.world_size
        rank_file = path / f"rank_{(0 if self.world_changed else self.rank):05d}.pt"
        try:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            if is_damage_error(e):
                raise _load_error(path, rank_file, e) from None
            raise
        return trainer_state, rank_state, self.world_changed
