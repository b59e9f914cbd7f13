"""DeepSpeed engine: ZeRO stages 0-3, bf16/fp16/fp32, clipping, optional optimizer offload.

The DeepSpeed config is generated from ours (``deepspeed_config``) and then deep-merged with
``engine.deepspeed_extra``: user keys win, except the batch sizes, the ZeRO stage and the
precision, which must be set through train.* / engine.* (a conflict is a ConfigError), so that the
trainer, the loader and DeepSpeed never disagree about what a step is.

No JIT-compiled ops: the optimizer is a client ``torch.optim.AdamW`` (not FusedAdam / CPUAdam, also
with offload), and on CPU the ``deepspeed_shm_comm`` op is switched off before DeepSpeed builds its
communication backend. Each workaround of DeepSpeed's behaviour lives in deepspeed_shims.py.

Skipping a bad step on every rank, with one finiteness check per step: ``forward_backward`` flags
a non-finite loss (a device op, no sync) and ``optimizer_step`` all-reduces the flag once (no
collective on one process). When set, the client AdamW's ``step()`` is held: DeepSpeed still runs
its step (reduction, clipping, copying the unchanged fp32 master weights back, zeroing gradients),
so parameters and optimizer state stay bit-for-bit as they were, for ZeRO 0-3 alike. A non-finite
gradient is caught by the global gradient norm: DeepSpeed's ZeRO 1-3 and bf16 optimizers compute it
(all-reduced) before updating anything and skip the step themselves when it is not finite; under
ZeRO-0 we compute it. Only when DeepSpeed's check is switched off (``compute_grad_norm: false``, or
``bf16.check_grad_overflow: false``) do per-gradient hooks flag it during backward instead.
Under fp16 an overflowing (scaled) gradient is the dynamic loss scaler's normal event: DeepSpeed
skips that update and lowers the scale; it is counted in ``loss_scale_skips``, not reported as a
skipped (bad) step. Only a non-finite loss is.

Checkpoints: ``save_checkpoint(dir, tag="ds", save_latest=False)`` on every rank, with the
client_state that universal conversion needs. ``load`` from the same world size, ZeRO stage and
precision is DeepSpeed's own loader; anything else (world size change) is converted to a universal
checkpoint on rank 0, in ``<run.out_dir>/checkpoints/.universal/`` of the current run (never
inside the published checkpoint), loaded with ``load_universal``, then deleted. DeepSpeed's files
are read with ``torch.load(weights_only=True)`` and only DeepSpeed's own plain types allowed
(``ds_safe_load``), also inside the converter and ``consolidated_state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from slam_pretrain.engine.activation_checkpointing import apply_activation_checkpointing
from slam_pretrain.distributed import all_reduce_any
from slam_pretrain.engine.base import Engine, StepResult, build_on_meta, check_initialisable, grad_accum_steps
from slam_pretrain.engine.deepspeed_shims import disable_shm_comm, ds_safe_load, quiet_untested_optimizer_warning
from slam_pretrain.errors import ConfigError, UserError
from slam_pretrain.engine.optim import param_groups
from slam_pretrain.model.slam_v1 import deferred_init, fill_flat

if TYPE_CHECKING:
    from slam_pretrain.config import Config
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine.base import ModelSource

TAG = "ds"  # DeepSpeed's checkpoint tag: one engine state per step directory
META_FILE = "slam_engine.json"  # {"zero_stage", "world_size", "precision"}: how the state was saved
_LOCKED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


# ---------------------------------------------------------------------------------------------
# Config.

def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: "Config", world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` at ``world_size``, merged with engine.deepspeed_extra."""
    t, e = cfg.train, cfg.engine
    ga = grad_accum_steps(t, world_size)
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer:
        if e.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer=True is invalid with engine.zero_stage=0: "
                              "optimizer offload needs ZeRO stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    conf: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # A client torch AdamW: no FusedAdam / CPUAdam JIT build, also with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
        "steps_per_print": 2**62,  # we log ourselves
    }
    merged = _deep_merge(conf, e.deepspeed_extra or {})
    for key in _LOCKED_KEYS:
        if merged.get(key) != conf[key]:
            raise ConfigError(f"engine.deepspeed_extra.{key}={merged.get(key)!r} conflicts with the batch sizes in "
                              f"train.* ({conf[key]!r}); set train.micro_batch_size / train.global_batch_size instead")
    if merged.get("zero_optimization", {}).get("stage", e.zero_stage) != e.zero_stage:
        raise ConfigError(f"engine.deepspeed_extra.zero_optimization.stage conflicts with engine.zero_stage="
                          f"{e.zero_stage}; set engine.zero_stage instead")
    for prec in ("bf16", "fp16"):
        if bool(merged.get(prec, {}).get("enabled")) != (e.precision == prec):
            raise ConfigError(f"engine.deepspeed_extra.{prec}.enabled conflicts with engine.precision="
                              f"{e.precision!r}; set engine.precision instead")
    return merged


# ---------------------------------------------------------------------------------------------
# Import-time setup and safe loading.

def _prepare_import(device: torch.device) -> None:
    """Pick DeepSpeed's accelerator from our device before it guesses, and quiet its logger."""
    want = "cpu" if device.type == "cpu" else "cuda"
    have = os.environ.get("DS_ACCELERATOR")
    if have and have != want:
        raise UserError(f"DS_ACCELERATOR={have!r} contradicts the training device {device}; unset it or set "
                        f"engine.device accordingly")
    os.environ["DS_ACCELERATOR"] = want
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    quiet_untested_optimizer_warning()


# ---------------------------------------------------------------------------------------------
# The engine.

class _GuardedAdamW(torch.optim.AdamW):
    """torch AdamW whose ``step()`` does nothing while ``hold`` is set (a globally skipped step)."""

    hold: bool = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.hold:
            return None
        return super().step(closure)


def _grad_check_of(optimizer: Any) -> str:
    """"deepspeed" when DeepSpeed's optimizer wrapper itself skips a step whose global gradient
    norm is non-finite (parameters and optimizer state untouched; the norm is all-reduced, so
    every rank agrees), else "norm" (no ZeRO wrapper: ZeRO-0, whose norm we take ourselves) or
    "hooks". Checked against deepspeed 0.19.8; tests/test_engines.py injects a NaN on one rank for
    every stage and checks that every rank skipped with the weights unchanged."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, (DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)):
        return "deepspeed"  # both always compute the norm and return early when it is invalid
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        # ZeRO 1/2 skip on an invalid norm unless the norm is switched off
        # (zero_optimization.compute_grad_norm) or, in bf16, bf16.check_grad_overflow is false.
        checks = optimizer.compute_grad_norm and (optimizer.dtype != torch.bfloat16 or optimizer.check_grad_overflow)
        return "deepspeed" if checks else "hooks"
    return "norm" if isinstance(optimizer, _GuardedAdamW) else "hooks"


def read_meta(engine_dir: Path) -> Optional[dict[str, Any]]:
    p = Path(engine_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: "Config", model: "ModelSource", dist_info: "DistInfo"):
        super().__init__(cfg, dist_info)
        e, t = cfg.engine, cfg.train
        self.ds_config = deepspeed_config(cfg, dist_info.world_size, dist_info.device.type)
        _prepare_import(dist_info.device)
        import deepspeed

        if dist_info.device.type == "cpu":
            disable_shm_comm()
        if not isinstance(model, nn.Module):
            model = self._build(model, deepspeed)
        self._num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3
        apply_activation_checkpointing(model, e.activation_checkpointing)
        if e.compile:
            from slam_pretrain.engine.fsdp_engine import blocks_of

            for block in blocks_of(model):
                block.compile()
        self._optimizer = _GuardedAdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                        eps=t.eps)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self._optimizer, config=self.ds_config,
                                                dist_init_required=False)
        self.model = self.ds.module
        # Per-group hyper-parameters (weight decay differs between the groups), re-applied after a
        # universal load (see load()).
        self._group_hparams = [{k: v for k, v in g.items() if k != "params"} for g in self._optimizer.param_groups]
        # How a non-finite gradient is caught (see the module doc): "deepspeed" (its optimizer
        # skips the step on a non-finite global norm by itself), "norm" (ZeRO-0: the norm we take
        # of the all-reduced gradients), "hooks" (a reduction per gradient during backward: only
        # when DeepSpeed's check is switched off), "none" under fp16, where scaled gradients
        # overflow by design and DeepSpeed's loss scaler skips the step and lowers the scale itself
        # (counted in loss_scale_skips, not "skipped").
        self._fp16 = e.precision == "fp16"
        self.grad_check = "none" if self._fp16 else _grad_check_of(self.ds.optimizer)
        self._grad_sums: list[torch.Tensor] = []  # "hooks": one fp32 scalar per gradient contribution
        self.loss_scale_skips = 0
        self._hooks = [p.register_hook(self._flag_grad) for p in self.model.parameters()
                       if p.requires_grad] if self.grad_check == "hooks" else []

    def _build(self, factory: Any, deepspeed: Any) -> nn.Module:
        """The model from ``factory``, never whole on the host: ZeRO-3 builds it inside
        ``zero.Init`` (each parameter is partitioned as soon as its module exists) and writes each
        rank's flat partition from ``initial_values``; ZeRO 0-2 keep full replicas anyway, so the
        model is built on meta and materialised directly on the device. Same seed, same weights as
        an eager build, at any world size."""
        seed = self.cfg.run.seed
        if self.cfg.engine.zero_stage != 3:
            model = build_on_meta(factory)
            model.to_empty(device=self.device)
            model.init_weights(seed=seed)
            return model
        from deepspeed import comm
        from deepspeed.accelerator import get_accelerator

        # Attach DeepSpeed's comm layer to our process group first (what deepspeed.initialize does
        # later): zero.Init reads the world size from it to check the batch sizes and to partition.
        comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, mem_efficient_linear=False), deferred_init():
            model = factory()
        check_initialisable(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                part = p.ds_tensor  # this rank's slice [r * n, (r + 1) * n) of the flat parameter, zero-padded
                start = min(part.ds_numel * comm.get_rank(group=p.ds_process_group), p.ds_numel)
                length = min(part.ds_numel, p.ds_numel - start)
                part.zero_()
                fill_flat(part.narrow(0, 0, length), start,
                          lambda a, b, name=name: model.initial_values(name, a, b, seed))
        return model

    def _flag_grad(self, g: torch.Tensor) -> None:
        # One reduction kernel per gradient; a sum propagates nan/inf (it only adds absurd |sum| > 3e38).
        # Checked once per step in optimizer_step, so no sync here.
        self._grad_sums.append(torch.sum(g.detach(), dtype=torch.float32))

    def _local_grad_bad(self) -> torch.Tensor:
        if not self._grad_sums:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        bad = ~torch.isfinite(torch.stack(self._grad_sums)).all()
        self._grad_sums.clear()
        return bad

    # -- the step ---------------------------------------------------------------------------
    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._begin_micro()
        _, loss = self.ds(input_ids, labels)
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        if self._micro + 1 < self.grad_accum:
            self.ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return self._end_micro(loss)

    def optimizer_step(self, lr: float, hold: bool = False) -> StepResult:
        self._check_boundary()
        bad = self._loss_bad | self._local_grad_bad()
        own_norm: Optional[float] = None
        if self.cfg.engine.zero_stage == 0:  # ZeRO-0 fp32 does not record the norm; grads are all-reduced here
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm_t = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
            if self.grad_check == "norm":  # the same on every rank (all-reduced gradients)
                bad = bad | ~torch.isfinite(norm_t)
            own_norm = float(norm_t.item())
        skip = all_reduce_any(bad) or hold  # one flag per step; no collective at all on one process
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.hold = skip
        try:
            self.ds.step()
        finally:
            self._optimizer.hold = False
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else (own_norm if own_norm is not None else float("nan"))
        if grad_norm < 0:  # DeepSpeed's "invalid norm" sentinel (-1)
            grad_norm = float("nan")
        ds_skipped = not self.ds.was_step_applied()  # DeepSpeed's own overflow check (global)
        if self._fp16 and ds_skipped and not skip:
            self.loss_scale_skips += 1
            ds_skipped = False
        skipped = skip or ds_skipped
        self._reset_step()
        return StepResult(grad_norm=grad_norm, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, loss = self.ds(input_ids, labels)
        return loss.detach().float()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    @property
    def num_params(self) -> int:
        return self._num_params

    # -- state ------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"zero_stage": self.cfg.engine.zero_stage, "world_size": self.dist.world_size,
                "precision": self.cfg.engine.precision}

    def save(self, dir: Path) -> None:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        dir = Path(dir)
        self.ds.save_checkpoint(str(dir), tag=TAG, save_latest=False,
                                client_state={UNIVERSAL_CHECKPOINT_INFO: {"universal_checkpoint_version": 0.2}})
        if self.dist.is_main:
            (dir / META_FILE).write_text(json.dumps(self._layout()))

    def load(self, dir: Path) -> None:
        from slam_pretrain.distributed import barrier

        dir = Path(dir)
        saved = read_meta(dir)
        if saved is None or not (dir / TAG).is_dir():
            raise UserError(f"{dir} is not a DeepSpeed engine state ({META_FILE} or {TAG}/ missing)")
        if saved == self._layout() or (saved["zero_stage"] == 0 and self.cfg.engine.zero_stage == 0
                                       and saved["precision"] == self.cfg.engine.precision):
            # Same layout (ZeRO-0 state is not partitioned, so any world size reads it).
            self._load_native(dir)
            return
        if 0 in (saved["zero_stage"], self.cfg.engine.zero_stage):
            raise UserError(f"cannot load the DeepSpeed state in {dir} (ZeRO-{saved['zero_stage']}, "
                            f"{saved['world_size']} process(es)) into ZeRO-{self.cfg.engine.zero_stage} with "
                            f"{self.dist.world_size}: universal conversion needs ZeRO 1-3 on both sides")
        udir = Path(self.cfg.run.out_dir) / "checkpoints" / ".universal" / dir.parent.name
        if self.dist.is_main:
            convert_to_universal(dir / TAG, udir)
        _wait_for_marker(udir, self.dist.is_main)
        barrier()
        self.ds._config.load_universal_checkpoint = True  # read at load time by DeepSpeed
        try:
            with ds_safe_load():
                path, _ = self.ds.load_checkpoint(str(udir), tag=TAG, load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"DeepSpeed could not load the universal checkpoint converted from {dir}")
        # Two fixes for DeepSpeed 0.19's ZeRO-3 universal loader: it copies group 0's hyper-parameters
        # onto every group, and gives every sub-group the same "step" tensor, which AdamW then
        # increments once per sub-group and step (wrong bias correction).
        for group, hparams in zip(self._optimizer.param_groups, self._group_hparams):
            group.update(hparams)
        for state in self._optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        barrier()
        if self.dist.is_main:
            shutil.rmtree(udir, ignore_errors=True)

    def _load_native(self, dir: Path) -> None:
        with ds_safe_load():
            path, _ = self.ds.load_checkpoint(str(dir), tag=TAG, load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not load the engine state in {dir}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}
        for p in self.model.parameters():  # a collective under ZeRO 1-3: same order on every rank
            hp = safe_get_full_fp32_param(p)  # the fp32 master weights; None without ZeRO / wrapper
            full[id(p)] = (hp if hp is not None else p).detach().float().cpu()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            p = params.get(name)
            if p is not None:
                out[name] = full[id(p)].clone()
            else:  # a buffer
                value = value.detach().cpu()
                out[name] = value.float() if value.is_floating_point() else value
        return out


# ---------------------------------------------------------------------------------------------
# Universal checkpoints.

_DONE, _FAILED = "CONVERTED", "FAILED"


def _wait_for_marker(udir: Path, is_main: bool) -> None:
    """Wait (file polling, not a timed collective: conversion can outlast the collective timeout)."""
    limit = float(os.environ.get("SLAM_UNIVERSAL_TIMEOUT_S", "7200"))
    start = time.monotonic()
    while True:
        if (udir / _FAILED).is_file():
            raise UserError((udir / _FAILED).read_text().strip())
        if (udir / _DONE).is_file():
            return
        if is_main or time.monotonic() - start > limit:
            raise UserError(f"universal checkpoint conversion into {udir} did not finish within {limit:.0f} s")
        time.sleep(0.5)


def convert_to_universal(src: Path, udir: Path) -> None:
    """Convert the DeepSpeed checkpoint ``src`` (…/engine/ds) into ``udir``/ds (+ latest_universal).

    Runs DeepSpeed's converter in a subprocess (it uses process pools and much memory). Writes a
    CONVERTED or FAILED marker that the other ranks wait for.
    """
    if udir.exists():
        shutil.rmtree(udir)
    udir.mkdir(parents=True)
    size = sum(f.stat().st_size for f in Path(src).glob("*optim_states.pt"))
    workers = 1 if size < 256 * 2**20 else max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-c", "from slam_pretrain.engine.deepspeed_engine import _universal_main; _universal_main()",
           "--input_folder", str(src), "--output_folder", str(udir / TAG),
           "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    log = udir / "convert.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    if rc != 0:
        tail = log.read_text()[-2000:].strip().splitlines()
        msg = (f"converting {src} to a universal checkpoint failed (exit {rc}); see {log}: "
               f"{tail[-1] if tail else ''}")
        (udir / _FAILED).write_text(msg)
        raise UserError(msg)
    (udir / "latest_universal").write_text(TAG)
    (udir / _DONE).write_text("ok")


def _universal_main() -> None:
    """Entry point of the converter subprocess: DeepSpeed's ds_to_universal under ds_safe_load."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    with ds_safe_load():
        ds_to_universal.main(args)


def consolidated_state_dict_ds(engine_dir: Path, engine_meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed engine state, in one process without a process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine_dir = Path(engine_dir)
    stage = int((read_meta(engine_dir) or engine_meta).get("zero_stage") or 0)
    with ds_safe_load():
        if stage == 0:
            sd = torch.load(engine_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout clean for CLIs
                sd = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=TAG)
    return {k: v.detach().float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
