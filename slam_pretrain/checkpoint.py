"""Checkpoint layout, atomic publish, ``latest``, retention and RNG state.

```
out_dir/checkpoints/step_00000100/
  engine/              engine state (DeepSpeed save_checkpoint tree, or a DCP directory)
  engine.json          {"name", "zero_stage", "world_size", "precision"}
  rank_00000.pt ...    per-rank RNG and loader state (tensors + plain data only)
  trainer_state.json   step, tokens, bad-step counters, tracking run id, ...
  config.yaml          the resolved config
  checksums.json       tokenizer and manifest sha256
  tokenizer.model      copy of the tokenizer
out_dir/checkpoints/latest   "step_00000100", replaced atomically
```

Publishing: every rank writes into ``.tmp_step_XXXXXXXX/``; after a barrier rank 0 writes the
small files, every node fsyncs what it wrote, and after a second barrier rank 0 renames the
directory to ``step_XXXXXXXX`` (the commit point), fsyncs the parent, then replaces ``latest``
(temp file + rename). A directory without its final name is never loaded; a run killed at any
moment leaves the previous checkpoint as the newest complete one. Retention keeps the last
``keep_last`` checkpoints plus every ``keep_every``-th step; a deleted one is first renamed to a
dot name so a half-deleted directory never looks complete.

Everything is read back with JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
import yaml

from slam_pretrain.distributed import barrier
from slam_pretrain.errors import UserError

if TYPE_CHECKING:
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine.base import Engine

STEP_RE = re.compile(r"^step_(\d{8})$")
REQUIRED = ("engine", "engine.json", "trainer_state.json", "config.yaml", "rank_00000.pt")


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def find_latest(out_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``out_dir``, or None.

    ``latest`` is followed when it names a complete checkpoint and nothing newer is published
    (the rename, not the pointer, is the commit point); ``.tmp_*`` directories are ignored.
    """
    root = Path(out_dir) / "checkpoints"
    complete = list_checkpoints(out_dir)
    newest = complete[-1][1] if complete else None
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target) and (newest is None or target == newest):
            return target
    return newest


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


def check_compatible(path: Path, config: Any = None, checksums: Optional[dict[str, Any]] = None) -> list[str]:
    """UserError naming what differs when the checkpoint in ``path`` cannot continue this run:
    any key of the ``model`` section, the engine name, or a ``*tokenizer*`` checksum present on
    both sides. Returns the other checksum keys that differ (e.g. the manifest: the loader checks
    the dataset identity itself), for a warning."""
    path = Path(path)
    current = _as_config_dict(config)
    if current is not None:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        old_model, new_model = saved.get("model", {}), current.get("model", {})
        old_model = {"layout_revision": 1, **old_model}  # saved before revision 2 recorded it
        diff = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
        if diff:
            shown = ", ".join(f"model.{k}: checkpoint {old_model.get(k)!r} vs config {new_model.get(k)!r}"
                              for k in diff[:5])
            raise UserError(f"checkpoint {path} was trained with another model config ({shown}); "
                            f"use the same model section, or --resume never / another run.out_dir")
        old_engine = json.loads((path / "engine.json").read_text()).get("name")
        new_engine = current.get("engine", {}).get("name")
        if new_engine and old_engine != new_engine:
            raise UserError(f"checkpoint {path} holds a {old_engine!r} engine state; engine.name={new_engine!r} "
                            f"cannot load it (set engine.name={old_engine!r}, or export and start a new run)")
    differing: list[str] = []
    if checksums:
        saved_sums = json.loads((path / "checksums.json").read_text()) if (path / "checksums.json").is_file() else {}
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

class CheckpointManager:
    """Writes and reads ``out_dir/checkpoints/step_XXXXXXXX``; every rank calls ``save``/``load``."""

    def __init__(self, out_dir: Union[str, Path], keep_last: int = 2, keep_every: int = 0,
                 dist: Optional["DistInfo"] = None):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank = dist.rank if dist else 0
        self.world_size = dist.world_size if dist else 1
        self.local_rank = dist.local_rank if dist else 0
        self.is_main = self.rank == 0
        self.world_changed = False  # set by load()
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
        barrier()

    def remove_stale(self) -> None:
        """Delete what a killed run left: ``.tmp_step_*``, half-deleted and converted scratch dirs."""
        for p in self.root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".del_step_*"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.root / ".universal", ignore_errors=True)

    def find_latest(self) -> Optional[Path]:
        return find_latest(self.out_dir)

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, engine: "Engine", rank_state: dict[str, Any], trainer_state: dict[str, Any],
             config_yaml: str, checksums: dict[str, Any], tokenizer_path: Optional[Union[str, Path]] = None) -> Path:
        """Write and publish the checkpoint of ``step``; returns its final path."""
        name = step_dir_name(step)
        tmp, final = self.root / f".tmp_{name}", self.root / name
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
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
        barrier()  # every rank's files exist
        if self.is_main:
            meta = engine.meta()
            _write_text(tmp / "engine.json", json.dumps(meta, indent=1))
            _write_text(tmp / "trainer_state.json", json.dumps({**trainer_state, "step": trainer_state.get(
                "step", step)}, indent=1))
            _write_text(tmp / "config.yaml", config_yaml)
            _write_text(tmp / "checksums.json", json.dumps(checksums, indent=1))
            if tokenizer_path is not None and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        if self.local_rank == 0:
            _fsync_tree(tmp)  # flushes this node's writes (every node, on shared filesystems)
        # Fault-injection hook for the crash-during-save test: hold the fully written but not yet
        # published checkpoint so the test can SIGKILL the run at exactly this point.
        pause = float(os.environ.get("SLAM_TEST_PAUSE_BEFORE_PUBLISH_S", "0") or 0)
        if pause > 0:
            time.sleep(pause)
        barrier()  # durable everywhere
        if self.is_main:
            self._publish(tmp, final)
            self._retain()
        barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # the same step saved again (e.g. a signal right after a resume)
            old = self.root / f".del_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(self.root)
        _replace_atomically(self.root / "latest", final.name)
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
                os.replace(p, doomed)  # never leave a half-deleted dir under a final name
                shutil.rmtree(doomed, ignore_errors=True)
        _fsync_dir(self.root)

    # -- load -------------------------------------------------------------------------------
    def load(self, path: Union[str, Path], engine: "Engine", *, config: Any = None,
             checksums: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Load ``path`` into ``engine``; return (trainer_state, rank_state, world_changed).

        ``config`` (Config, dict or YAML text) and ``checksums`` are checked against the checkpoint
        first (``check_compatible``). ``rank_state`` is this rank's file when the world size is the
        one that saved, else rank 0's (``world_changed`` True; the data loader's state is world-size
        independent, so rank 0's serves every new rank). Restoring RNG is the caller's call:
        ``restore_rng(rank_state["rng"])``.
        """
        path = Path(path)
        if not is_complete(path):
            missing = [f for f in REQUIRED if not (path / f).exists()]
            raise UserError(f"{path} is not a complete checkpoint (missing: {', '.join(missing) or 'step_XXXXXXXX name'})")
        differing = check_compatible(path, config, checksums)
        if differing and self.is_main:
            print(f"warning: {', '.join(differing)} differ(s) from checkpoint {path}; continuing",
                  file=sys.stderr, flush=True)
        meta = json.loads((path / "engine.json").read_text())
        if meta.get("name") != engine.name:
            raise UserError(f"checkpoint {path} holds a {meta.get('name')!r} engine state; this run uses "
                            f"engine.name={engine.name!r}")
        engine.load(path / "engine")
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        saved_world = int(meta.get("world_size", 1))
        self.world_changed = saved_world != self.world_size
        rank_file = path / f"rank_{(0 if self.world_changed else self.rank):05d}.pt"
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return trainer_state, rank_state, self.world_changed
