"""bf16, torch.compile and optimizer offload through the real CLI on CPU (gloo), as a user runs them.

1. bf16 trains and resumes bitwise after SIGKILL:
   - FSDP2 on 2 processes: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over
     fp32 sharded parameters (the master weights; the checkpoint holds them in fp32);
   - DeepSpeed ZeRO-1 bf16 on 2 processes (DeepSpeed's BF16_Optimizer), and ZeRO-2 bf16 with
     ``offload_optimizer`` (the optimizer and its fp32 master partition on the CPU; exercised
     once, here), 1 process. The checkpoint holds bf16 module weights and fp32 masters.
   A straight run and a run killed after its step-N checkpoint then resumed log identical
   per-step losses. bf16 really computes in bf16: its losses differ from the fp32 run's, by less
   than BF16_TOL.
2. ``engine.compile: true`` (inductor, CPU) on FSDP2, 1 process: killed after the step-N
   checkpoint and resumed (compiling again), every step's loss matches the eager fp32 run within
   COMPILE_RTOL (inductor fuses and reorders float operations; eager vs compiled differ by ~1e-7
   relative here, while a resume that lost state or data position moves the loss by ~1e-2).

Few and small: a 4-block model (ef_cycles 1), 2N steps, 1 or 2 processes; the compile run is the
slow one (inductor compiles each block once; the resumed run reuses inductor's on-disk cache).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from train_utils import base_overrides, latest_step, losses, run_and_kill, run_train

N = 2  # checkpoint at N, run to 2N
BF16_TOL = 0.02  # |loss_bf16 - loss_fp32| per step on this model (observed ~1e-4)
COMPILE_RTOL = 1e-4  # relative, compiled vs eager fp32, per step


def _ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _args(manifest: Path, out: Path, *, engine: str, zero: int = 0, nproc: int = 1, extra: tuple[str, ...] = ()
          ) -> list[str]:
    """2N steps, a checkpoint every N, global batch 16 = micro x nproc x grad_accum 2."""
    args = base_overrides(manifest, out, engine=engine, zero=zero, steps=2 * N, interval=N, micro=8 // nproc)
    for s in ("model.ef_cycles=1", *extra):
        args += ["--set", s]
    return args


def _straight(manifest: Path, out: Path, nproc: int, **kw) -> dict[int, float]:
    r = run_train(nproc, _args(manifest, out, nproc=nproc, **kw), timeout=900)
    _ok(r)
    got = losses(out)
    assert sorted(got) == list(range(1, 2 * N + 1))
    assert all(math.isfinite(v) for v in got.values())
    return got


def _killed_and_resumed(manifest: Path, out: Path, nproc: int, **kw) -> dict[int, float]:
    """Run, SIGKILL every process once the step-N checkpoint is published, resume (--resume auto)."""
    args = _args(manifest, out, nproc=nproc, **kw)
    rc, log = run_and_kill(nproc, args, out, when=lambda d: latest_step(d) == N, timeout=900)
    assert rc == -9, f"the run was not killed mid-way (exit {rc}):\n{log[-3000:]}"
    r = run_train(nproc, args, timeout=900)
    _ok(r)
    assert f"resumed from step {N} (" in r.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, 2 * N + 1))
    return got


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory: pytest.TempPathFactory, tiny_manifest: Path) -> dict[int, float]:
    """The eager fp32 reference: FSDP2, 1 process (every run here sees the same global batches)."""
    return _straight(tiny_manifest, tmp_path_factory.mktemp("fp32") / "run", 1, engine="fsdp")


def _check_bf16(bf16: dict[int, float], fp32: dict[int, float]) -> None:
    diffs = {s: abs(bf16[s] - fp32[s]) for s in fp32}
    assert max(diffs.values()) < BF16_TOL, f"bf16 strays from fp32: {diffs}"
    assert any(d > 0 for d in diffs.values()), "bf16 losses equal fp32 bitwise: the bf16 setting was not applied"
    assert bf16[2 * N] < bf16[1], f"bf16 loss did not fall: {bf16}"


def test_fsdp_bf16_two_processes_resumes_bitwise(tmp_path: Path, tiny_manifest: Path,
                                                 fp32_losses: dict[int, float]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    kw = dict(engine="fsdp", extra=("engine.precision=bf16",))
    straight = _straight(tiny_manifest, tmp_path / "straight", 2, **kw)
    resumed = _killed_and_resumed(tiny_manifest, tmp_path / "killed", 2, **kw)
    assert resumed == straight  # bitwise: float equality of every step's loss
    _check_bf16(straight, fp32_losses)
    # The parameters FSDP shards and AdamW updates (and the checkpoint holds) stay fp32.
    meta = FileSystemReader(str(tmp_path / "killed" / "checkpoints" / f"step_{2 * N:08d}" / "engine")).read_metadata()
    dtypes = {k: md.properties.dtype for k, md in meta.state_dict_metadata.items() if k.startswith("model.")}
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes


@pytest.mark.parametrize("zero,nproc,offload", [(1, 2, False), (2, 1, True)],
                         ids=["zero1-2proc", "zero2-offload-1proc"])
def test_deepspeed_bf16_resumes_bitwise(tmp_path: Path, tiny_manifest: Path, fp32_losses: dict[int, float],
                                        zero: int, nproc: int, offload: bool) -> None:
    """ZeRO-1 bf16 is DeepSpeed's BF16_Optimizer (fp32 gradient accumulation and master weights);
    ZeRO-2 bf16 with offload_optimizer keeps the optimizer and the fp32 master partition on the CPU."""
    from slam_pretrain.engine.deepspeed_shims import ds_safe_load

    kw = dict(engine="deepspeed", zero=zero, extra=("engine.precision=bf16", f"engine.offload_optimizer={offload}"))
    straight = _straight(tiny_manifest, tmp_path / "straight", nproc, **kw)
    resumed = _killed_and_resumed(tiny_manifest, tmp_path / "killed", nproc, **kw)
    assert resumed == straight  # bitwise
    _check_bf16(straight, fp32_losses)
    # bf16 module weights for compute, fp32 master partitions in the optimizer state.
    ds_dir = tmp_path / "killed" / "checkpoints" / f"step_{2 * N:08d}" / "engine" / "ds"
    with ds_safe_load():
        module = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        optim = [torch.load(f, map_location="cpu") for f in sorted(ds_dir.glob("*zero_pp_rank_*_optim_states.pt"))]
    assert {v.dtype for v in module.values()} == {torch.bfloat16}
    assert len(optim) == nproc
    for o in optim:
        masters = o["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        assert masters and all(t.dtype == torch.float32 for t in masters)


def test_compile_matches_eager_and_resumes(tmp_path: Path, tiny_manifest: Path,
                                           fp32_losses: dict[int, float]) -> None:
    kw = dict(engine="fsdp", extra=("engine.compile=true", "train.eval_batches=1"))
    resumed = _killed_and_resumed(tiny_manifest, tmp_path / "compiled", 1, **kw)
    for step, want in fp32_losses.items():
        assert resumed[step] == pytest.approx(want, rel=COMPILE_RTOL), (step, resumed[step], want)
    # Inductor's fused kernels round differently from eager: bitwise-equal losses at every step
    # would mean the blocks ran eagerly (compilation fell back or was never applied).
    assert resumed != fp32_losses, "compiled losses equal eager bitwise: compile did not take effect"
