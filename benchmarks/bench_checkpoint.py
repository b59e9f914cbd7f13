"""How long a training step is blocked by a checkpoint save, against ``torch.save`` of the same
state measured in the same run (one process, CPU, each engine).

Per engine, after a few training steps (so the optimizer state exists), each round times:

- ``torch.save``: the engine's model + optimizer state dicts (what its checkpoint holds) into one
  file in the same folder, as the baseline; ``+fsync`` adds the fsync that makes it durable.
- ``save(blocking=True)``: ``CheckpointManager.save`` as the trainer ran it before async saves:
  the engine state, rank file, small files, fsync, sha256 of every file, publish.
- ``save(blocking=False)``: ``blocked`` is the time until the call returns (FSDP2: DCP copies the
  state on a thread of its own, beside the next step's forward and backward, whose optimizer step
  waits for the copy, and writes it on another; DeepSpeed has no async writer here, so its files
  are written before the call returns); the fsync, hashing and publish happen on rank 0's
  background thread. Training steps run meanwhile: ``slower steps`` is how much longer they took than the
  median step measured before (on a CPU the writer competes for the cores), and ``published
  after`` is the time from the call to the checkpoint being published.

Each ratio is against the ``torch.save`` baseline of the same round (measured seconds apart, so a
machine that gets busier between rounds moves both); the table gives the median over the rounds
after one warm-up round (first-call costs: DCP's process group for background writes) of the
times and, separately, of the per-round ratios.

    python benchmarks/bench_checkpoint.py                                   # tiny CPU model, both engines
    python benchmarks/bench_checkpoint.py --set model.d_model=512 --set model.d_ff=1536 --rounds 5
    python benchmarks/bench_checkpoint.py --engines fsdp --json ckpt.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from slam_pretrain.config import load_config  # noqa: E402
from slam_pretrain.distributed import destroy, init_distributed  # noqa: E402
from slam_pretrain.engine import build_engine  # noqa: E402
from slam_pretrain.model import SLAMv1LM, count_params  # noqa: E402
from slam_pretrain.training.checkpoint import CheckpointManager  # noqa: E402
from slam_pretrain.training.rng import capture_rng  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def engine_state(engine: Any) -> dict[str, Any]:
    """The state the engine's checkpoint holds: model and optimizer state dicts."""
    if engine.name == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
        return {"model": model_sd, "optim": optim_sd}
    return {"model": engine.ds.module.state_dict(), "optim": engine.ds.optimizer.state_dict()}


def torch_save(engine: Any, path: Path, fsync: bool) -> None:
    torch.save(engine_state(engine), path)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bench_engine(name: str, cfg: Any, dist: Any, out: Path, rounds: int) -> dict[str, Any]:
    cfg.engine.name = name
    torch.manual_seed(cfg.run.seed)
    engine = build_engine(cfg, SLAMv1LM(cfg.model), dist)
    gen = torch.Generator().manual_seed(0)
    t = cfg.train
    batch = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)

    def step() -> None:
        for _ in range(engine.grad_accum):
            engine.forward_backward(batch[:, :-1], batch[:, 1:])
        engine.optimizer_step(t.lr)

    for _ in range(3):
        step()
    step_s = statistics.median(timed(step) for _ in range(5))
    mgr = CheckpointManager(out / name, keep_last=2, keep_every=0, dist=dist)
    config_yaml = cfg.to_yaml()  # once per run: emitting the YAML takes ~10 ms, and the config never changes
    state_bytes = 0
    rows: dict[str, list[float]] = {k: [] for k in ("torch_save", "torch_save_fsync", "blocking", "blocked",
                                                     "slower_steps", "published_after")}
    n = 0
    for r in range(rounds + 1):
        step()
        baseline = out / f"{name}_baseline.pt"
        ts = timed(lambda: torch_save(engine, baseline, fsync=False))
        tsf = timed(lambda: torch_save(engine, baseline, fsync=True))
        state_bytes = baseline.stat().st_size
        baseline.unlink()

        def save(blocking: bool) -> None:
            mgr.save(n, engine, rank_state={"rng": capture_rng(), "loader": {"position": n}},
                     trainer_state={"step": n}, config_yaml=config_yaml, checksums={}, blocking=blocking)

        n += 1
        tb = timed(lambda: save(True))
        mgr.wait()  # deleting the checkpoint retention dropped must not overlap the next timing
        n += 1
        t0 = time.perf_counter()
        save(False)
        blocked = time.perf_counter() - t0
        during = []
        while mgr.in_flight:
            during.append(timed(step))
        mgr.wait()
        published = time.perf_counter() - t0
        if r == 0:
            continue  # warm-up round
        for key, value in (("torch_save", ts), ("torch_save_fsync", tsf), ("blocking", tb), ("blocked", blocked),
                           ("slower_steps", sum(max(0.0, d - step_s) for d in during)),
                           ("published_after", published)):
            rows[key].append(value)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {k: statistics.median(x / b for x, b in zip(v, rows["torch_save"])) for k, v in rows.items()}
    return {"engine": name, "params": count_params(cfg.model), "state_mb": state_bytes / 1e6, "step_s": step_s,
            "rounds": rounds, "median_s": med, "raw_s": rows, "ratio_vs_torch_save": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--engines", default="fsdp,deepspeed")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per engine (after one warm-up)")
    ap.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the training steps")
    args = ap.parse_args()
    cfg = load_config(args.config, ["engine.device=cpu", "engine.precision=fp32", "engine.zero_stage=1",
                                    "train.micro_batch_size=2", "train.global_batch_size=2", *args.set])
    torch.set_num_threads(args.threads)
    dist = init_distributed("cpu")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=args.out) as tmp:
        for name in args.engines.split(","):
            results.append(bench_engine(name, cfg, dist, Path(tmp), args.rounds))
    destroy()
    print(f"checkpoint save vs torch.save of the same state; 1 process, CPU; medians of {args.rounds} rounds "
          f"(ratio vs torch.save in brackets)")
    print(f"{'engine':<10} {'params':>8} {'state MB':>8} {'step ms':>8} {'torch.save':>10} {'+fsync':>14} "
          f"{'save(blocking)':>16} {'blocked (async)':>16} {'slower steps':>14} {'published after':>16}")
    for res in results:
        m, q = res["median_s"], res["ratio_vs_torch_save"]

        def cell(key: str) -> str:
            return f"{1000 * m[key]:.1f} ({q[key]:.2f}x)"

        print(f"{res['engine']:<10} {res['params'] / 1e6:>7.2f}M {res['state_mb']:>8.1f} {1000 * res['step_s']:>8.1f} "
              f"{1000 * m['torch_save']:>10.1f} {cell('torch_save_fsync'):>14} {cell('blocking'):>16} "
              f"{cell('blocked'):>16} {cell('slower_steps'):>14} {cell('published_after'):>16}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
