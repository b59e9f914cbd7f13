"""Run a function in N gloo processes on CPU (multi-process tests without a launcher).

    from dist_utils import run_distributed
    results = run_distributed(fn, world_size=2, args=(tmp_path,))  # [rank 0's return, rank 1's, ...]

``fn(dist_info, *args)`` must be importable (a module-level function of a test module or a
package). Each rank is a fresh ``spawn`` process with torchrun's environment variables, one CPU
thread, ``DS_ACCELERATOR=cpu`` and a short collective timeout; it calls
``slam_pretrain.distributed.init_distributed("cpu")`` before ``fn``. Return values come back
through ``torch.save`` files (tensors and plain data). A rank that raises fails the call with its
traceback; a hang fails it after ``timeout`` seconds with every rank killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable, Optional

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, out: str, args: tuple,
           env: dict[str, str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    os.environ.setdefault("SLAM_DIST_TIMEOUT_S", "120")
    os.environ.update(env)
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):  # tests may run inside a SLURM job
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        from slam_pretrain.distributed import destroy, init_distributed

        info = init_distributed("cpu")
        try:
            result = {"ok": True, "value": fn(info, *args)}
        finally:
            destroy()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    torch.save(result, out)


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 240,
                    env: Optional[dict[str, str]] = None) -> list[Any]:
    """Run ``fn(dist_info, *args)`` on ``world_size`` ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with TemporaryDirectory(prefix="slam_dist_") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, outs[r], args, dict(env or {})),
                             daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline_hit = False
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                deadline_hit = True
                break
        if deadline_hit:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(10)
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} rank(s) did not finish in {timeout:.0f} s")
        results, errors = [], []
        for r, (p, out) in enumerate(zip(procs, outs)):
            if not Path(out).is_file():
                errors.append(f"rank {r} exited with code {p.exitcode} and no result")
                continue
            res = torch.load(out, weights_only=False)  # our own test data
            if res["ok"]:
                results.append(res["value"])
            else:
                errors.append(f"rank {r} raised:\n{res['error']}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
