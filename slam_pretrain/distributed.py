"""Process-group setup from torchrun, the ``deepspeed`` launcher, SLURM, or nothing (one process).

Where the rank comes from, first match wins:

1. ``RANK`` + ``WORLD_SIZE`` (torchrun, the deepspeed launcher; ``--local_rank`` from the CLI is
   put into ``LOCAL_RANK`` by ``cli.main``), with ``MASTER_ADDR``/``MASTER_PORT``.
2. SLURM (``srun python ...`` or ``deepspeed --launcher slurm``, neither of which sets ``RANK``):
   ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, tasks per node from
   ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``; ``MASTER_ADDR`` defaults to the first host
   of ``SLURM_JOB_NODELIST`` and ``MASTER_PORT`` to a port derived from the job id.
3. Nothing: a world of one. It is still a real process group (on 127.0.0.1 with a free port)
   because DeepSpeed and DCP need one.

gloo on CPU, NCCL on GPU. Collectives time out after ``SLAM_DIST_TIMEOUT_S`` seconds (default
300), so a lost rank ends the job with an error instead of hanging it forever.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from slam_pretrain.errors import ConfigError, UserError

DEFAULT_TIMEOUT_S = 300
DEFAULT_MASTER_PORT = 29500


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str  # "gloo" | "nccl"
    is_main: bool  # rank 0


_INFO: Optional[DistInfo] = None


# ---------------------------------------------------------------------------------------------
# SLURM helpers (pure functions: tested without SLURM).

def parse_tasks_per_node(value: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]`` (the SLURM_TASKS_PER_NODE syntax)."""
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise UserError(f"cannot parse SLURM tasks per node {value!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """``"gpu[01-02,07],cpu3"`` -> ``["gpu01", "gpu02", "gpu07", "cpu3"]`` (fallback when
    ``scontrol`` is unavailable; covers one bracket group per host name, as SLURM prints them)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + r)
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"cannot find the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return hosts[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def resolve_env(env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Read rank/world/master from ``env`` (default ``os.environ``); no side effects.

    Returns {"rank", "world_size", "local_rank", "local_world_size", "master_addr",
    "master_port", "source"} with source one of "torchrun", "slurm", "single".
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; else assume one node.
        key = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE" if "LOCAL_SIZE" in env else None
        lws = _env_int(env, key) if key else world
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            if world > 1:
                raise UserError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; launch with "
                                "torchrun or the deepspeed launcher, or set both")
        return {"rank": rank, "world_size": world, "local_rank": local_rank, "local_world_size": lws,
                "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                "master_port": int(env.get("MASTER_PORT", 0)) or _free_port(), "source": "torchrun"}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local_rank = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        counts = parse_tasks_per_node(per_node)
        node = _env_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        lws = counts[node] if node < len(counts) else counts[0]
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif world == 1:
            addr = "127.0.0.1"
        else:
            addr = _first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
        else:
            # Same on every task of a job, different between jobs sharing a node ("address in use").
            job = int(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID", "").isdigit() else 0
            port = DEFAULT_MASTER_PORT + job % 10000
        return {"rank": rank, "world_size": world, "local_rank": local_rank, "local_world_size": lws,
                "master_addr": addr, "master_port": port, "source": "slurm"}
    return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
            "master_addr": "127.0.0.1", "master_port": _free_port(), "source": "single"}


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("SLAM_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
        if seconds <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"SLAM_DIST_TIMEOUT_S={raw!r} is invalid: must be a positive number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"engine.device={device!r} is invalid: must be one of 'auto', 'cpu', 'cuda'")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("engine.device='cuda' is invalid: no CUDA device is visible; use 'cpu' or 'auto'")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UserError(f"local rank {local_rank} has no GPU: only {n} visible on this node")
    return torch.device("cuda", local_rank)


def _info_from_group(device: str) -> DistInfo:
    env = resolve_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    local_rank = env["local_rank"] if env["source"] != "single" else 0
    dev = _pick_device(device, local_rank)
    return DistInfo(rank, world, local_rank, env["local_world_size"], dev, backend, rank == 0)


def init_distributed(device: str = "auto") -> DistInfo:
    """Create the default process group (once) and return this process's DistInfo.

    ``device`` is ``engine.device``: "auto" (CUDA when visible), "cpu" or "cuda". Also exports
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which DeepSpeed reads.
    """
    global _INFO
    if dist.is_available() and dist.is_initialized():
        if _INFO is None:
            _INFO = _info_from_group(device)
        return _INFO
    env = resolve_env()
    dev = _pick_device(device, env["local_rank"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    os.environ.update({"RANK": str(env["rank"]), "WORLD_SIZE": str(env["world_size"]),
                       "LOCAL_RANK": str(env["local_rank"]), "LOCAL_WORLD_SIZE": str(env["local_world_size"]),
                       "MASTER_ADDR": str(env["master_addr"]), "MASTER_PORT": str(env["master_port"])})
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds NCCL to this GPU (no guessing from the rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=env["rank"],
                            world_size=env["world_size"], timeout=_timeout(), **kwargs)
    _INFO = DistInfo(env["rank"], env["world_size"], env["local_rank"], env["local_world_size"],
                     dev, backend, env["rank"] == 0)
    return _INFO


def get_info() -> Optional[DistInfo]:
    """The DistInfo of init_distributed, or None before it."""
    return _INFO


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    if _INFO is not None:
        return _INFO.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[_device().index])
    else:
        dist.barrier()


def _all_reduce_scalar(value: float, op: "dist.ReduceOp") -> float:
    if not _active() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    """The maximum of ``value`` over ranks."""
    return _all_reduce_scalar(value, dist.ReduceOp.MAX)


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over ranks (float64 sum, then divided by the world size)."""
    total = _all_reduce_scalar(value, dist.ReduceOp.SUM)
    return total / dist.get_world_size() if _active() else total


def all_reduce_any(flag: "bool | torch.Tensor") -> bool:
    """True when ``flag`` is true on any rank. A tensor flag (0-d, bool or float, on the training
    device) is reduced where it lives, so the caller pays one host sync, not two."""
    if not isinstance(flag, torch.Tensor):
        return all_reduce_max(1.0 if flag else 0.0) > 0.0
    t = flag.detach().to(torch.float32).reshape(1)
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; our own data only)."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (picklable objects; our own data only)."""
    if not _active() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Tear the process group down (idempotent)."""
    global _INFO
    if _active():
        dist.destroy_process_group()
    _INFO = None
