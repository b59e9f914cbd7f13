"""CheckpointManager: layout, atomic publish under SIGKILL, retention, compatibility, weights_only,
asynchronous saves and per-rank RNG streams.

Spawned runs with a real FSDP engine: a 2-rank run that publishes step 1 and is SIGKILLed
while writing step 2, then a 1-rank run that cleans up, finds step 1, loads it (world size
changed) and exercises save/retention/compatibility; a 2-rank run of asynchronous saves (DCP
``async_save``) SIGKILLed after a save's data is on disk and before it is published; two 2-rank
runs with dropout (each rank its own stream, the same on every run). The rest needs no process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from slam_pretrain.training.checkpoint import CheckpointManager
from slam_pretrain.training.checkpoint_files import check_compatible, find_latest, is_complete
from slam_pretrain.training.rng import capture_rng, rank_stream_seed, rank_stream_state, restore_rng
from slam_pretrain.config import Config
from slam_pretrain.engine import build_engine
from slam_pretrain.errors import UserError
from slam_pretrain.model import ModelConfig, SLAMv1LM


class _Planted:
    """Unpickling this would run code (it creates a marker file); weights_only loading must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_config(out_dir: Path, world: int) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=2048, max_seq_len=64, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                            ef_cycles=2, segment_len=48, overlap=8)
    cfg.data.seq_len = 64
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 4
    cfg.engine.name, cfg.engine.precision, cfg.engine.device = "fsdp", "fp32", "cpu"
    cfg.run.out_dir = str(out_dir)
    return cfg


def new_engine(cfg: Config, info: Any, seed: int = 0):
    torch.manual_seed(seed)
    return build_engine(cfg, SLAMv1LM(cfg.model), info)


def train_step(engine: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(engine.grad_accum):
        x = torch.randint(0, 2048, (2, 65), generator=g)
        engine.forward_backward(x[:, :-1], x[:, 1:])
    engine.optimizer_step(1e-3)


def _save(mgr: CheckpointManager, engine: Any, cfg: Config, step: int, tok: Path, info: Any,
          blocking: bool = True) -> Path:
    return mgr.save(step, engine, rank_state={"loader": {"epoch": 0, "batches": step * 10 + info.rank}},
                    trainer_state={"step": step, "tokens": step * 256}, config_yaml=cfg.to_yaml(),
                    checksums={"tokenizer_sha256": "aa" * 32, "manifest_sha256": "bb" * 32}, tokenizer_path=tok,
                    blocking=blocking)


def killed_during_save(info: Any, out: str, tok: str) -> None:
    """2 ranks: publish step 1, then die by SIGKILL inside engine.save of step 2."""
    cfg = make_config(Path(out), info.world_size)
    engine = new_engine(cfg, info)
    mgr = CheckpointManager(out, keep_last=2, keep_every=0, dist=info)
    train_step(engine, 1)
    _save(mgr, engine, cfg, 1, Path(tok), info)
    weights = engine.full_state_dict()
    if info.rank == 0:
        torch.save(weights, Path(out) / "weights_step1.pt")
    train_step(engine, 2)
    real_save = engine.save

    def dying_save(d: Path) -> None:
        real_save(d)  # a partial checkpoint on disk, then the process is gone
        os.kill(os.getpid(), signal.SIGKILL)

    engine.save = dying_save
    _save(mgr, engine, cfg, 2, Path(tok), info)


def after_kill(info: Any, out: str, tok: str) -> dict[str, Any]:
    """1 rank: what a restarted (smaller) job sees, then saves, retention and errors."""
    r: dict[str, Any] = {}
    root = Path(out) / "checkpoints"
    r["tmp_before"] = sorted(p.name for p in root.glob(".tmp_*"))
    cfg = make_config(Path(out), info.world_size)
    mgr = CheckpointManager(out, keep_last=2, keep_every=3, dist=info)
    r["tmp_after"] = sorted(p.name for p in root.glob(".tmp_*"))
    latest = mgr.find_latest()
    r["latest"] = latest.name if latest else None
    engine = new_engine(cfg, info, seed=7)
    trainer_state, rank_state, changed = mgr.load(latest, engine, config=cfg,
                                                  checksums={"tokenizer_sha256": "aa" * 32})
    r.update(trainer_state=trainer_state, rank_state=rank_state, world_changed=changed)
    # World size changed: this rank's stream is the one of (run.seed, rank, step), not a saved one.
    saved_rng = torch.load(latest / "rank_00000.pt", weights_only=True)["rng"]
    r["rng_reseeded"] = torch.equal(rank_state["rng"]["torch"], rank_stream_state(cfg.run.seed, 0, 1)["torch"])
    r["rng_was_saved_one"] = torch.equal(rank_state["rng"]["torch"], saved_rng["torch"])
    want = torch.load(Path(out) / "weights_step1.pt", weights_only=True)
    got = engine.full_state_dict()
    r["weights_equal"] = all(torch.equal(got[k], want[k]) for k in want)
    # Errors that name what differs.
    errors = {}
    other = make_config(Path(out), 1)
    other.model.d_model = 128
    for key, kwargs in {"model": {"config": other},
                        "tokenizer": {"config": cfg, "checksums": {"tokenizer_sha256": "cc" * 32}}}.items():
        try:
            mgr.load(latest, engine, **kwargs)
            errors[key] = None
        except UserError as e:
            errors[key] = str(e)
    ds = make_config(Path(out), 1)
    ds.engine.name = "deepspeed"
    try:
        check_compatible(latest, ds)
        errors["engine"] = None
    except UserError as e:
        errors["engine"] = str(e)
    try:
        mgr.save(99, engine, rank_state={"bad": object()}, trainer_state={}, config_yaml="", checksums={})
        errors["unsafe_rank_state"] = None
    except UserError as e:
        errors["unsafe_rank_state"] = str(e)
    r["errors"] = errors
    r["manifest_differs"] = check_compatible(latest, cfg, {"tokenizer_sha256": "aa" * 32,
                                                           "manifest_sha256": "dd" * 32})
    # A tampered copy of the checkpoint whose rank file carries pickled code.
    bad = root / "step_00000050"
    __import__("shutil").copytree(latest, bad)
    marker = Path(out) / "pwned"
    torch.save({"rng": _Planted(str(marker))}, bad / "rank_00000.pt")
    try:
        mgr.load(bad, engine)
        r["tampered"] = None
    except Exception as e:  # noqa: BLE001 - the unpickler's own error type
        r["tampered"] = f"{type(e).__name__}: {e}"
    r["marker_created"] = marker.exists()
    __import__("shutil").rmtree(bad)
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(root / ".tmp_step_00000099", ignore_errors=True)
    # Retention: keep the last 2 plus every 3rd step.
    for step in range(2, 8):
        train_step(engine, step)
        _save(mgr, engine, cfg, step, Path(tok), info)
    _save(mgr, engine, cfg, 7, Path(tok), info)  # the same step again (a signal right after resuming)
    mgr.wait()  # old checkpoints are deleted in the background
    r["kept"] = sorted(p.name for p in root.iterdir())
    r["latest_pointer"] = (root / "latest").read_text()
    r["files"] = sorted(p.name for p in (root / "step_00000007").iterdir())
    step7 = root / "step_00000007"
    r["files_json"] = json.loads((step7 / "files.json").read_text())
    r["on_disk"] = {str(p.relative_to(step7).as_posix()): p.stat().st_size
                    for p in step7.rglob("*") if p.is_file() and p.name != "files.json"}
    r["engine_json"] = json.loads((root / "step_00000007" / "engine.json").read_text())
    return r


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ckpt_run")
    tok = out / "tok.model"
    tok.write_bytes(b"fake sentencepiece model")
    with pytest.raises(RuntimeError, match="exited with code -9"):
        run_distributed(killed_during_save, 2, args=(str(out), str(tok)), timeout=180)
    found_after_kill = find_latest(out)
    res = run_distributed(after_kill, 1, args=(str(out), str(tok)), timeout=240)[0]
    res["found_after_kill"] = found_after_kill
    return res


def test_killed_save_leaves_previous_checkpoint(killed_run: dict[str, Any]) -> None:
    r = killed_run
    assert r["found_after_kill"] is not None and r["found_after_kill"].name == "step_00000001"
    assert r["tmp_before"] == [".tmp_step_00000002"]  # the partial write, never published
    assert r["tmp_after"] == []  # removed by rank 0 at start
    assert r["latest"] == "step_00000001"


def test_load_after_world_change(killed_run: dict[str, Any]) -> None:
    r = killed_run
    assert r["weights_equal"]
    assert r["world_changed"] is True
    assert r["trainer_state"] == {"step": 1, "tokens": 256, "branch": 0, "branch_start_step": 0}
    assert r["rank_state"]["loader"] == {"epoch": 0, "batches": 10}  # rank 0's file
    assert set(r["rank_state"]["rng"]) >= {"python", "numpy", "torch"}
    assert r["rng_reseeded"] and not r["rng_was_saved_one"]


def test_retention_and_layout(killed_run: dict[str, Any]) -> None:
    r = killed_run
    # Steps 1..7 written, keep_last=2 -> 6, 7; keep_every=3 -> 3, 6.
    assert r["kept"] == ["latest", "step_00000003", "step_00000006", "step_00000007"]
    assert r["latest_pointer"] == "step_00000007"
    assert r["files"] == ["checksums.json", "config.yaml", "engine", "engine.json", "files.json", "rank_00000.pt",
                          "tokenizer.model", "trainer_state.json"]
    # files.json: every other file with its size and sha256 (engine/ included).
    listed = r["files_json"]["files"]
    assert {k: v["size"] for k, v in listed.items()} == r["on_disk"]
    assert any(k.startswith("engine/") for k in listed) and all(len(v["sha256"]) == 64 for v in listed.values())
    assert r["engine_json"] == {"name": "fsdp", "zero_stage": None, "world_size": 1, "precision": "fp32",
                             "context_parallel": 1}


def test_incompatible_checkpoint_errors(killed_run: dict[str, Any]) -> None:
    e = killed_run["errors"]
    assert e["model"] is not None and "model.d_model: checkpoint 64 vs config 128" in e["model"]
    assert e["tokenizer"] is not None and "tokenizer_sha256" in e["tokenizer"]
    assert e["engine"] is not None and "'fsdp' engine state" in e["engine"]
    assert e["unsafe_rank_state"] is not None and "weights_only" in e["unsafe_rank_state"]
    # Another manifest is only reported (the loader itself checks the dataset identity).
    assert killed_run["manifest_differs"] == ["manifest_sha256"]


# ---------------------------------------------------------------------------------------------
# Asynchronous saves (DCP async_save under FSDP2).

def async_saves_then_killed(info: Any, out: str, tok: str) -> None:
    """2 ranks: step 1 saved blocking; step 2 saved asynchronously while training goes on, then
    published by wait(); step 3 saved asynchronously, and every rank SIGKILLed once its data is
    on disk but before rank 0 publishes it (the test switch holds rank 0's publisher)."""
    cfg = make_config(Path(out), info.world_size)
    engine = new_engine(cfg, info)
    mgr = CheckpointManager(out, keep_last=5, keep_every=0, dist=info)
    root = Path(out) / "checkpoints"
    train_step(engine, 1)
    _save(mgr, engine, cfg, 1, Path(tok), info)
    train_step(engine, 2)
    weights2 = engine.full_state_dict()
    g = torch.Generator().manual_seed(3)
    for _ in range(engine.grad_accum):  # step 3's gradients first, so that its update ...
        x = torch.randint(0, 2048, (2, 65), generator=g)
        engine.forward_backward(x[:, :-1], x[:, 1:])
    _save(mgr, engine, cfg, 2, Path(tok), info, blocking=False)
    engine.optimizer_step(1e-3)  # ... changes every weight while step 2 is still being copied
    mgr.wait()
    if info.rank == 0:
        torch.save({"weights2": weights2, "latest_after_wait": (root / "latest").read_text()},
                   Path(out) / "async.pt")
    os.environ["SLAM_TEST_PAUSE_BEFORE_PUBLISH_S"] = "120"
    _save(mgr, engine, cfg, 3, Path(tok), info, blocking=False)
    metadata = root / ".tmp_step_00000003" / "engine" / ".metadata"  # DCP writes it after every rank's data
    for _ in range(1200):
        if metadata.exists():
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def test_async_save_is_exact_and_crash_safe(tmp_path: Path) -> None:
    from slam_pretrain.engine import consolidated_state_dict

    tok = tmp_path / "tok.model"
    tok.write_bytes(b"fake sentencepiece model")
    with pytest.raises(RuntimeError, match="exited with code -9"):
        run_distributed(async_saves_then_killed, 2, args=(str(tmp_path), str(tok)), timeout=180)
    seen = torch.load(tmp_path / "async.pt", weights_only=True)
    root = tmp_path / "checkpoints"
    assert seen["latest_after_wait"] == "step_00000002"
    # Step 2 holds the weights of the moment it was saved, not those of the step trained meanwhile.
    step2 = root / "step_00000002"
    got = consolidated_state_dict(step2 / "engine", json.loads((step2 / "engine.json").read_text()))
    assert got.keys() == seen["weights2"].keys()
    assert all(torch.equal(got[k], seen["weights2"][k]) for k in got)
    assert json.loads((step2 / "files.json").read_text())["previous"] == "step_00000001"
    # Step 3: every byte written, never published; the previous checkpoint is the one found.
    tmp3 = root / ".tmp_step_00000003"
    assert (tmp3 / "engine" / ".metadata").is_file() and len(list((tmp3 / "engine").glob("*.distcp"))) == 2
    assert not (root / "step_00000003").exists() and not (tmp3 / "files.json").exists()
    assert (root / "latest").read_text() == "step_00000002" and find_latest(tmp_path) == step2


# ---------------------------------------------------------------------------------------------
# Per-rank RNG streams.

def dropout_streams(info: Any, out: str) -> dict[str, Any]:
    """Weights from the common seed, then each rank's own stream: the loss of one batch in train
    mode (dropout 0.5) before a save, after it, and again after restoring the saved stream."""
    from slam_pretrain.training.run import seed_all

    cfg = make_config(Path(out), info.world_size)
    cfg.model.dropout = 0.5
    seed_all(cfg.run.seed)
    model = SLAMv1LM(cfg.model)
    init = float(sum(p.double().sum() for p in model.parameters()))
    engine = build_engine(cfg, model, info)
    seed_all(cfg.run.seed, rank=info.rank)
    engine.train()
    x = torch.randint(0, 2048, (2, 65), generator=torch.Generator().manual_seed(0))

    def loss() -> float:
        return float(engine.eval_loss(x[:, :-1], x[:, 1:]))  # no grad, but dropout is on in train mode

    first = loss()
    mgr = CheckpointManager(out, dist=info)
    path = mgr.save(1, engine, rank_state={"loader": {}}, trainer_state={"step": 1}, config_yaml=cfg.to_yaml(),
                    checksums={})
    after_save = loss()
    _, rank_state, changed = mgr.load(path, engine, config=cfg)
    restore_rng(rank_state["rng"])
    return {"init": init, "first": first, "after_save": after_save, "replayed": loss(), "changed": changed}


def test_each_rank_draws_its_own_dropout_masks_reproducibly(tmp_path: Path) -> None:
    runs = [run_distributed(dropout_streams, 2, args=(str(tmp_path / f"run{i}"),), timeout=180) for i in range(2)]
    for ranks in runs:
        assert ranks[0]["init"] == ranks[1]["init"]  # identical initial weights on every rank
        assert ranks[0]["first"] != ranks[1]["first"]  # same weights and batch: only the masks differ
        for r in ranks:
            assert r["changed"] is False and r["replayed"] == r["after_save"] != r["first"]
    assert runs[0] == runs[1]  # the same seed gives the same per-rank streams on every run
    assert len({rank_stream_seed(1234, r, s) for r in range(4) for s in (None, 0, 1)}) == 12


# ---------------------------------------------------------------------------------------------
# No process group needed.

def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / "checkpoints" / f"step_{step:08d}"
    (d / "engine").mkdir(parents=True)
    for f in ("engine.json", "trainer_state.json", "config.yaml") + (("rank_00000.pt",) if complete else ()):
        (d / f).write_text("{}")
    return d


def test_find_latest_rules(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    s1 = _fake_checkpoint(tmp_path, 1)
    s2 = _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 3, complete=False)  # a directory missing a file is not a checkpoint
    (tmp_path / "checkpoints" / ".tmp_step_00000004").mkdir()
    assert find_latest(tmp_path) == s2
    latest = tmp_path / "checkpoints" / "latest"
    latest.write_text("step_00000009")  # points at nothing
    assert find_latest(tmp_path) == s2
    # A higher step beside ``latest`` is another run's (never chosen over it) unless its
    # files.json says it follows the pointed one: killed between the rename and the pointer update.
    latest.write_text("step_00000001")
    assert find_latest(tmp_path) == s1
    (s2 / "files.json").write_text(json.dumps({"format": 1, "previous": "step_00000001", "files": {}}))
    assert find_latest(tmp_path) == s2
    latest.write_text("step_00000002")
    assert find_latest(tmp_path) == s2
    assert is_complete(s1) and not is_complete(tmp_path / "checkpoints" / "step_00000003")


def test_rng_roundtrip_weights_only(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_load_refuses_pickled_code(killed_run: dict[str, Any]) -> None:
    assert killed_run["tampered"] is not None and "Weights only load failed" in killed_run["tampered"]
    assert killed_run["marker_created"] is False
