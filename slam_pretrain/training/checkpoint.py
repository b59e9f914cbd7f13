"""Writing and loading checkpoints: ``CheckpointManager`` (atomic publish, ``latest``,
retention, where a run starts and branches).

What a checkpoint holds on disk and how one is found, verified, set aside or checked for
compatibility is in ``checkpoint_files.py`` (the layout is drawn there); the RNG state each rank
saves is in ``rng.py``. Their public names are re-exported here.

Publishing: every rank writes into ``.tmp_step_XXXXXXXX/``; rank 0 writes the small files, every
node fsyncs what it wrote, the ranks hash a share of the files each and rank 0 writes
``files.json`` (which also names the checkpoint this one follows); then rank 0 renames the
directory to ``step_XXXXXXXX`` (the commit point), fsyncs the parent, and replaces ``latest``
(temp file + rename). ``save(blocking=False)`` does the writing of the engine state (where the
engine can) and everything from the fsync on in the background, rank 0 alone hashing and
publishing once every byte is on disk; ``wait()`` ends it. A directory without its final name is
never loaded. Retention keeps the last ``keep_last`` checkpoints of the current branch plus every
``keep_every``-th step, on rank 0's I/O thread, outside every collective; a deleted one is first
renamed to a dot name so a half-deleted directory never looks complete. Every failure (a write
error on any rank, a damaged file) is one ``UserError`` line naming the file; a failed save
removes its temporary directory and publishes nothing.

Everything is read back with JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from data_pipeline.storage import atomic_write, fsync_dir, sha256_of
from slam_pretrain.distributed import all_gather_object, broadcast_object
from slam_pretrain.errors import UserError, write_error
# re-exported: callers import them from here
from slam_pretrain.training.checkpoint_files import (ABANDONED, BRANCH, FILES, REQUIRED, STEP_RE, VERIFY_MODES,
                                                     branch_of, check_compatible, find_latest, holds_a_run,
                                                     is_complete, is_damage_error, list_checkpoints, on_branch,
                                                     read_branch, set_aside, step_dir_name, verify_checkpoint)
# the helpers the writer and loader share with checkpoint_files.py
from slam_pretrain.training.checkpoint_files import (_fsync_tree, _load_error, _pointer_step, _read_json, _run_seed,
                                                     _step_dirs, _write_text)
# re-exported: callers import them from here
from slam_pretrain.training.rng import (capture_rng, rank_stream_seed, rank_stream_state, restore_rng,
                                        seed_generators)

if TYPE_CHECKING:
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine.base import Engine

# The manager and the public names that moved to checkpoint_files.py and rng.py (named here, so a
# re-export does not read as an unused import).
__all__ = ["ABANDONED", "BRANCH", "FILES", "REQUIRED", "STEP_RE", "VERIFY_MODES", "CheckpointManager", "branch_of",
           "capture_rng", "check_compatible", "find_latest", "holds_a_run", "is_complete", "is_damage_error",
           "list_checkpoints", "on_branch", "rank_stream_seed", "rank_stream_state", "read_branch", "restore_rng",
           "seed_generators", "set_aside", "step_dir_name", "verify_checkpoint"]


# ---------------------------------------------------------------------------------------------
# What the writer checks and lists.

# What torch.load(weights_only=True) reads back, checked without the round trip through a file.
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _is_plain(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, _PLAIN):
        return True
    if depth > 32:
        return False
    if type(obj) in (dict, list, tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in items)
    return False


def _files_of(d: Path) -> list[str]:
    """Every file under ``d`` but ``files.json``, as sorted relative POSIX paths."""
    out = []
    for dirpath, _, files in os.walk(d):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(d).as_posix()
            if rel != FILES:
                out.append(rel)
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# The manager.

def _is_dcp_failure(e: BaseException) -> bool:
    """Distributed Checkpoint's CheckpointException: a BaseException holding each rank's error."""
    return type(e).__name__ == "CheckpointException" and isinstance(getattr(e, "failures", None), dict)


def _write_failure(e: BaseException, where: Path) -> Optional[UserError]:
    """A UserError for a failed checkpoint write, or None when ``e`` is not one (a bug: re-raised).

    torch's zip writer reports a full disk as "unexpected pos N vs M" without an errno: a small
    probe write next to the failed one recovers the cause (ENOSPC, EDQUOT, ...).
    """
    if _is_dcp_failure(e) and e.failures:  # type: ignore[attr-defined]
        first = next(iter(e.failures.values()))  # type: ignore[attr-defined]
        e = first[0] if isinstance(first, tuple) else first  # (exception, traceback) pairs
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


def _pause_before_publish() -> None:
    # The one test-only switch (DESIGN.md): hold a fully written checkpoint before it is published,
    # so a test can SIGKILL the run at exactly that point. Unset, it costs one getenv.
    pause = float(os.environ.get("SLAM_TEST_PAUSE_BEFORE_PUBLISH_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)


def _settle(job: Optional[Future]) -> None:
    """Wait for a background write whose outcome no longer matters (its save already failed)."""
    if job is not None:
        try:
            job.result()
        except BaseException:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            pass


@dataclass
class _PendingSave:
    name: str  # step_XXXXXXXX
    tmp: Path
    job: Future  # _finish_in_background: None, or the failure


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
        # The branch new checkpoints belong to (set by resume_point; see read_branch), and the
        # record of the branch resume_point started, if it started one: {"event": "branch",
        # "branch", "step", "from", "abandoned", "abandoned_steps"}, for metrics.jsonl and MLflow.
        self.branch, self.branch_start_step = 0, 0
        self.branch_event: Optional[dict[str, Any]] = None
        # One nodes's ranks share a page cache: one fsync there covers every rank's files.
        self.single_node = (dist.local_world_size if dist else 1) == self.world_size
        self._pending: Optional[_PendingSave] = None  # a save(blocking=False) not yet waited for
        self._io: Optional[ThreadPoolExecutor] = None  # background publishing and deletion, in order
        self._io_jobs: list[Future] = []
        # Rank 0 checks that out_dir is writable before anything is written, and every rank hears
        # the outcome (an error on rank 0 alone would leave the others waiting at a barrier).
        self._agree(self._on_main(self._prepare_dir))
        recorded = read_branch(self.out_dir)  # resume_point decides; this is the default until then
        if recorded is not None:
            self.branch, self.branch_start_step = recorded["branch"], recorded["start_step"]

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
        except BaseException as e:  # noqa: BLE001 - sorted below; anything else is a bug and re-raised
            if not isinstance(e, Exception) and not _is_dcp_failure(e):
                raise  # KeyboardInterrupt, SystemExit
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
        ``never`` in a used out_dir, and a PATH that is not the newest checkpoint of the run here,
        start a new branch (``self.branch_event`` says where); ``auto`` continues the current one.
        """
        decision: Optional[dict[str, Any]] = None
        if self.is_main:
            chosen: list[Optional[Path]] = [None]
            error = self._attempt(lambda: chosen.__setitem__(0, self._decide(resume)))
            decision = {"error": error, "path": None if error or chosen[0] is None else str(chosen[0]),
                        "branch": (self.branch, self.branch_start_step, self.branch_event)}
        decision = broadcast_object(decision)
        if decision["error"]:
            raise UserError(decision["error"])
        self.branch, self.branch_start_step, self.branch_event = decision["branch"]
        chosen = Path(decision["path"]) if decision["path"] else None
        self.previous = chosen.name if chosen is not None and self._in_root(chosen) else None
        return chosen

    def begin_branch(self, step: int, origin: Path) -> dict[str, Any]:
        """Start a new branch at ``step`` from the checkpoint ``origin`` of this out_dir: what a
        rollback after a loss spike does (the run continues from an older state, on other data).
        Checkpoints above ``step`` are moved aside, never deleted. Collective: rank 0 decides and
        every rank returns the same ``branch_event``."""
        decision: Optional[dict[str, Any]] = None
        if self.is_main:
            def act() -> None:
                self._begin_branch(self._current_branch(), step, origin)
                self._set_aside(step, f"rollback to step {step} ({origin}) after a loss spike")
            error = self._attempt(act)
            decision = {"error": error, "branch": (self.branch, self.branch_start_step, self.branch_event)}
        decision = broadcast_object(decision)
        if decision["error"]:
            raise UserError(decision["error"])
        self.branch, self.branch_start_step, self.branch_event = decision["branch"]
        return dict(self.branch_event)

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _in_root(self, path: Path) -> bool:
        return path.parent.resolve() == self.root.resolve()

    def _begin_branch(self, current: dict[str, Any], start_step: int, origin: Optional[Path]) -> None:
        """Record a new branch (before anything is moved: see read_branch)."""
        number = current["branch"] + 1 if (current.get("recorded") or holds_a_run(self.out_dir)) else 0
        record = {"branch": number, "start_step": start_step, "from": str(origin) if origin else None,
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write(self.root / BRANCH, json.dumps(record, indent=1) + "\n")
        self.branch, self.branch_start_step = number, start_step
        self.branch_event = {"event": "branch", "branch": number, "step": start_step, "from": record["from"],
                             "abandoned": None, "abandoned_steps": []}

    def _set_aside(self, after_step: Optional[int], reason: str) -> Optional[tuple[Path, list[int]]]:
        moved = set_aside(self.out_dir, after_step, reason)
        if moved and self.branch_event is not None:
            self.branch_event.update(abandoned=str(moved[0]), abandoned_steps=moved[1])
        return moved

    def _current_branch(self) -> dict[str, Any]:
        recorded = read_branch(self.out_dir)
        if recorded is not None:
            return {**recorded, "recorded": True}
        saved_on = [branch_of(p) for _, p in list_checkpoints(self.out_dir)]
        return {"branch": max([b for b in saved_on if b is not None], default=0), "start_step": 0, "from": None}

    def _decide(self, resume: str) -> Optional[Path]:
        current = self._current_branch()
        self.branch, self.branch_start_step, self.branch_event = current["branch"], current["start_step"], None
        if resume == "never":
            if holds_a_run(self.out_dir):
                self._begin_branch(current, 0, None)
            moved = self._set_aside(None, "--resume never started a new run in this out_dir")
            if moved:
                folder, steps = moved
                what = f"checkpoints of steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
                self._say(f"--resume never: moved the previous run in {self.out_dir} ({what}, its metrics.jsonl "
                          f"and export) to {folder}; starting branch {self.branch} at step 0")
            return None
        if resume == "auto":
            return self._continue(current)
        chosen = Path(resume)
        if not chosen.is_dir():
            raise UserError(f"--resume {resume!r}: no such checkpoint directory; use 'auto', 'never' or a "
                            f"checkpoints/step_XXXXXXXX path")
        problem = None if self.verify == "none" else verify_checkpoint(chosen, full=self.verify == "full")
        if problem is not None:
            raise UserError(f"--resume {resume}: checkpoint is damaged or incomplete: {problem}; pass "
                            f"another checkpoint, or --resume auto for the newest one that verifies")
        step = int(STEP_RE.match(chosen.name).group(1))  # type: ignore[union-attr] - verified: a step_ name
        if self._in_root(chosen):
            if any(s > step for s, _ in _step_dirs(self.root)):  # rewinding: a new branch
                self._begin_branch(current, step, chosen)
                moved = self._set_aside(step, f"the run resumed from {chosen.name} (branch {self.branch}); "
                                              f"these newer checkpoints are not part of it")
                folder, steps = moved  # type: ignore[misc] - something newer was there to move
                self._say(f"resuming from {chosen.name} starts branch {self.branch}: moved the newer checkpoints "
                          f"(steps {', '.join(map(str, steps))}) and a copy of metrics.jsonl to {folder}")
            return chosen
        # A checkpoint of another out_dir (another run, or a branch set aside): a branch of its own here.
        used = holds_a_run(self.out_dir)
        self._begin_branch(current, step, chosen.resolve())
        moved = self._set_aside(None, f"the run resumed from {chosen} (branch {self.branch})") if used else None
        origin_metrics = chosen.parent.parent / "metrics.jsonl"  # chosen = <out_dir>/checkpoints/step_X
        if origin_metrics.is_file():  # its history up to the step (JsonlSink drops the records after it)
            shutil.copy2(origin_metrics, self.out_dir / "metrics.jsonl")
        self._say(f"resuming from {chosen} starts branch {self.branch} of {self.out_dir} at step {step}"
                  + (f"; moved the previous run here to {moved[0]}" if moved else ""))
        return chosen

    def _continue(self, current: dict[str, Any]) -> Optional[Path]:
        """``--resume auto``: the newest checkpoint of the current branch that verifies; newer ones
        (damaged, or a disowned branch's) are moved aside."""
        skipped: list[tuple[Path, str]] = []
        chosen = self.find_latest(on_skip=lambda p, why: skipped.append((p, why)))
        for p, why in skipped:
            self._say(f"warning: skipping damaged checkpoint {p}: {why}")
        if chosen is None and skipped:
            raise UserError(f"no checkpoint in {self.root} verifies (newest: {skipped[0][0].name}: "
                            f"{skipped[0][1]}); --resume never starts over (moving them aside), "
                            f"--resume PATH picks one")
        origin = current.get("from")
        if chosen is None and origin and not self._in_root(Path(origin)) and (verify_checkpoint(
                origin, full=self.verify == "full") is None if self.verify != "none" else is_complete(Path(origin))):
            # The branch started from another out_dir's checkpoint and saved none of its own yet.
            chosen = Path(origin)
        if chosen is None and _step_dirs(self.root):
            # Only checkpoints branch.json disowns (a kill cut the move of --resume never short):
            # the run starts at step 0, so they go where the rest of their run went.
            moved = set_aside(self.out_dir, None, "--resume auto found no checkpoint of the current branch "
                                                  "here; these belong to a branch that was abandoned")
            if moved:
                self._say(f"--resume auto: moved checkpoints of an abandoned branch (steps "
                          f"{', '.join(map(str, moved[1]))}) and their run's files to {moved[0]}")
        if chosen is not None and self._in_root(chosen):
            moved = set_aside(self.out_dir, int(STEP_RE.match(chosen.name).group(1)),  # type: ignore[union-attr]
                              f"the run resumed from {chosen.name}; these newer checkpoints are not "
                              f"part of it (damaged, or a branch that was abandoned)")
            if moved:
                folder, steps = moved
                self._say(f"resuming from {chosen.name}: moved the newer checkpoints (steps "
                          f"{', '.join(map(str, steps))}) and a copy of metrics.jsonl to {folder}")
        return chosen

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, engine: "Engine", rank_state: dict[str, Any], trainer_state: dict[str, Any],
             config_yaml: str, checksums: dict[str, Any], tokenizer_path: Optional[Union[str, Path]] = None,
             *, blocking: bool = True) -> Path:
        """Write the checkpoint of ``step``; returns its final path.

        ``blocking=True``: published (``latest`` names it) when this returns. ``blocking=False``:
        returns once the state is safe from the steps that follow: the engine state is staged and
        written in the background where the engine can (``engine.save_async``: DCP ``async_save``
        under FSDP2), else written now; then rank 0 fsyncs, hashes and publishes it in a background
        thread, once every byte is on disk. Until then ``latest`` names the previous checkpoint, so
        a kill leaves that one. ``wait()`` finishes it (the next ``save`` waits first).

        A failure on any rank (no space, permissions, an unsafe rank_state) is a UserError on
        every rank (for ``blocking=False`` possibly from the ``wait``/``save`` that finishes it),
        naming the path and the cause; the temporary directory is removed and nothing is
        published, so the previous checkpoint stays the newest. Old checkpoints are deleted after
        the publish, by rank 0 in the background: outside every collective, so a slow delete on a
        parallel filesystem never holds the other ranks at a barrier.
        """
        self._finish_pending()  # not the queued deletions: those may go on beside this save
        name = step_dir_name(step)
        tmp, final = self.root / f".tmp_{name}", self.root / name
        inflight: list[Optional[Future]] = [None]  # the engine's background write, if it has one
        previous = self.previous
        try:
            self._agree(self._on_main(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)),
                                      tmp))
            self._agree(self._attempt(lambda: self._write_rank_files(tmp, engine, rank_state, inflight, blocking),
                                      tmp))
            # Background publishing fsyncs on rank 0, which covers its node's page cache; other
            # nodes flush what they wrote now (DCP's background writer fsyncs its own files).
            fsync = "all" if blocking or (not self.single_node and inflight[0] is None) else \
                "none" if self.single_node else "but_engine"
            self._agree(self._attempt(lambda: self._write_small_files(
                tmp, engine, trainer_state, step, config_yaml, checksums, tokenizer_path, fsync), tmp))
            if not blocking:
                job = self._submit(lambda: self._finish_in_background(tmp, final, inflight[0], previous))
                self._pending = _PendingSave(name, tmp, job)
                return final
            _pause_before_publish()
            error = self._write_files_manifest(tmp, previous)
            self._agree(error or self._on_main(lambda: self._publish(tmp, final)))
            self.previous = name
        except UserError as e:
            _settle(inflight[0])  # never remove a folder the engine is still writing into
            self._not_saved(name, tmp, e)
        if self.is_main:
            self._submit(self._retain_quietly)
        return final

    @property
    def in_flight(self) -> bool:
        """Whether a ``save(blocking=False)`` is still being written or published."""
        return self._pending is not None and not self._pending.job.done()

    def wait(self) -> None:
        """Finish a ``save(blocking=False)`` still in flight; every rank calls it (before an export
        or the exit; the next ``save`` does the same first). Its failure is raised here, on every
        rank, as ``save`` would have raised it. Also lets this rank's queued deletions finish."""
        self._finish_pending()
        for job in self._io_jobs:
            job.result()
        self._io_jobs = []

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            outcome = pending.job.result()
            message, bug = None, None
            if outcome is not None:
                err = _write_failure(outcome, pending.tmp)
                bug = outcome if err is None else None
                message = str(err) if err is not None else \
                    f"{type(outcome).__name__} on rank {self.rank}: {(str(outcome).splitlines() or [''])[0][:200]}"
            errors = [m for m in all_gather_object(message) if m]  # every rank hears every failure
            if errors:
                if bug is not None:
                    if self.is_main:
                        shutil.rmtree(pending.tmp, ignore_errors=True)
                    raise bug
                self._not_saved(pending.name, pending.tmp, UserError(errors[0]))
            self.previous = pending.name

    def _submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on this rank's checkpoint I/O thread (one: publishing and deleting stay in order).
        Its threads are joined at interpreter exit, so a deletion is not cut short by a normal exit."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slam-checkpoint-io")
        job = self._io.submit(fn)
        self._io_jobs = [j for j in self._io_jobs if not j.done()] + [job]
        return job

    def _not_saved(self, name: str, tmp: Path, e: BaseException) -> None:
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = find_latest(self.out_dir, "none")
        raise UserError(f"checkpoint {name} was not saved, nothing was published"
                        f"{f' (the newest is still {newest.name})' if newest else ''}: {e}") from None

    def _finish_in_background(self, tmp: Path, final: Path, engine_write: Optional[Future],
                              previous: Optional[str]) -> Optional[BaseException]:
        """The rest of a ``save(blocking=False)``, on the I/O thread; returns the failure, if any.

        Every rank waits for its engine write; rank 0 then makes the folder durable, lists and
        hashes it alone (no collective can run here) and publishes it. Rank 0's DCP write ends
        after every rank's files and ``.metadata`` are written and fsynced (DCP gathers the
        ranks' results before it writes the metadata), so publishing after it is safe.
        """
        try:
            if engine_write is not None:
                engine_write.result()
            if not self.is_main:
                return None
            _pause_before_publish()
            _fsync_tree(tmp)  # flushes what was written without fsync; a no-op for what DCP synced
            table = {rel: {"size": (tmp / rel).stat().st_size, "sha256": sha256_of(str(tmp / rel))}
                     for rel in _files_of(tmp)}
            _write_text(tmp / FILES, self._files_json(previous, table))
            self._publish(tmp, final)
        except BaseException as e:  # noqa: BLE001 - handed to wait(), which sorts and raises it
            return e
        self._retain_quietly()
        return None

    def _write_rank_files(self, tmp: Path, engine: "Engine", rank_state: dict[str, Any],
                          inflight: list[Optional[Future]], blocking: bool = True) -> None:
        save_async = None if blocking else getattr(engine, "save_async", None)
        if save_async is not None:
            inflight[0] = save_async(tmp / "engine")  # staged (copied) now, written in the background
        else:
            engine.save(tmp / "engine")
        state = dict(rank_state)
        state.setdefault("rng", capture_rng())
        state["_rank"], state["_world_size"] = self.rank, self.world_size
        rank_file = tmp / f"rank_{self.rank:05d}.pt"
        buf = io.BytesIO()
        torch.save(state, buf)  # then one write: torch's file writer makes many small ones (4x slower)
        rank_file.write_bytes(buf.getbuffer())
        if _is_plain(state):  # the common case, without reading the file back (~10 ms of unpickling)
            return
        try:  # fail now, not at resume time, if the trainer passed something weights_only refuses
            torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler raises several types
            raise UserError(f"rank_state for the checkpoint holds an object that weights_only loading refuses "
                            f"(use tensors and plain data): {str(e).splitlines()[0][:200]}") from None

    def _write_small_files(self, tmp: Path, engine: "Engine", trainer_state: dict[str, Any], step: int,
                           config_yaml: str, checksums: dict[str, Any],
                           tokenizer_path: Optional[Union[str, Path]], fsync: str = "all") -> None:
        """Rank 0's small files; then each node flushes what it wrote (``fsync``: all, but_engine
        (the engine's background writer syncs its own files) or none (rank 0 syncs it later))."""
        if self.is_main:  # fsynced below or by the publisher, with the rest of the folder
            _write_text(tmp / "engine.json", json.dumps(engine.meta(), indent=1), fsync=False)
            _write_text(tmp / "trainer_state.json", json.dumps({
                **trainer_state, "step": trainer_state.get("step", step), "branch": self.branch,
                "branch_start_step": self.branch_start_step}, indent=1), fsync=False)
            _write_text(tmp / "config.yaml", config_yaml, fsync=False)
            _write_text(tmp / "checksums.json", json.dumps(checksums, indent=1), fsync=False)
            if tokenizer_path is not None and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        if self.local_rank == 0 and fsync != "none":
            _fsync_tree(tmp, skip="engine" if fsync == "but_engine" else None)  # every node, on shared filesystems

    def _files_json(self, previous: Optional[str], table: dict[str, Any]) -> str:
        return json.dumps({"format": 1, "previous": previous, "branch": self.branch,
                           "files": dict(sorted(table.items()))}, indent=1)

    def _write_files_manifest(self, tmp: Path, previous: Optional[str]) -> Optional[str]:
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
        return self._attempt(lambda: _write_text(tmp / FILES, self._files_json(previous, table)), tmp)

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
        """Keep the newest ``keep_last`` checkpoints of this branch's history, every
        ``keep_every``-th step and whatever ``latest`` names; delete the rest. Checkpoints of a
        branch that ``branch.json`` disowns (left by a kill during a rewind) are neither counted
        nor deleted here: the next start moves them aside."""
        mine = {"branch": self.branch, "start_step": self.branch_start_step}
        complete = [(s, p) for s, p in list_checkpoints(self.out_dir) if on_branch(s, p, mine)]
        keep = {s for s, _ in complete[-self.keep_last:]}
        if self.keep_every:
            keep |= {s for s, _ in complete if s % self.keep_every == 0}
        pointed = _pointer_step(self.root)
        if pointed is not None:
            keep.add(pointed)
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

    def _retain_quietly(self) -> None:
        try:
            self._retain()
        except OSError as e:  # the checkpoint is published; an old one staying is only a warning
            print(f"warning: retention in {self.root} failed ({e}); old checkpoints may remain",
                  file=sys.stderr, flush=True)

    # -- load -------------------------------------------------------------------------------
    def load(self, path: Union[str, Path], engine: "Engine", *, config: Any = None,
             checksums: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Load ``path`` into ``engine``; return (trainer_state, rank_state, world_changed).

        ``config`` (Config, dict or YAML text) and ``checksums`` are checked against the checkpoint
        first (``check_compatible``). ``rank_state`` is this rank's file when the world size is the
        one that saved, else rank 0's (``world_changed`` True; the data loader's state is world-size
        independent, so rank 0's serves every new rank) with ``rng`` replaced: no rank's saved
        stream belongs to a rank of the new world, so every rank starts the stream of
        ``rank_stream_seed(run.seed, rank, step)`` (run.seed from ``config``, else the checkpoint's)
        -- a function of the new layout and the step alone, the same on every such resume.
        Restoring RNG is the caller's call: ``restore_rng(rank_state["rng"])``. A file that cannot
        be read (damaged) is a UserError naming it.
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
        if self.world_changed:
            seed = _run_seed(config, path)
            rank_state = {**rank_state, "rng": rank_stream_state(seed, self.rank, int(trainer_state.get("step", 0)))}
        return trainer_state, rank_state, self.world_changed
