"""FSDP2 engine: ``fully_shard`` per block and at the root, torch AdamW, Distributed Checkpoint.

Order (torchtitan's): build (on the meta device when given a factory) -> activation checkpointing
-> ``torch.compile`` per block -> ``fully_shard`` on initial_block, every ef_blocks_A[i] /
ef_blocks_B[i], final_block, then the root (embedding, final norm and the tied LM head live in the
root's group) -> ``to_empty(device)`` + ``init_weights(run.seed)`` (meta builds only: each rank
allocates and fills its own shard). Parameters are sharded fp32 (the master weights);
``MixedPrecisionPolicy`` casts them to ``engine.precision`` for compute and reduces gradients in
fp32. fp16 is refused (it would need a sharded grad scaler); use bf16. One process in fp32 is not
sharded at all (see ``FSDPEngine.__init__``).

Checkpoints are DCP directories holding {"model": ..., "optim": ...} as sharded state dicts
keyed by parameter names, so ``load`` reshards to any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from slam_pretrain.engine.activation_checkpointing import apply_activation_checkpointing
from slam_pretrain.distributed import all_reduce_any
from slam_pretrain.engine.base import Engine, StepResult, build_on_meta
from slam_pretrain.errors import ConfigError, UserError
from slam_pretrain.engine.optim import build_optimizer

if TYPE_CHECKING:
    from concurrent.futures import Future

    from slam_pretrain.config import Config
    from slam_pretrain.distributed import DistInfo
    from slam_pretrain.engine.base import ModelSource

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The sharding / compile units: initial block, every EF block, final block."""
    return [model.initial_block, *model.ef_blocks_A, *model.ef_blocks_B, model.final_block]


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg: "Config", model: "ModelSource", dist_info: "DistInfo"):
        super().__init__(cfg, dist_info)
        e = cfg.engine
        if e.precision not in _DTYPES:
            raise ConfigError(f"engine.precision={e.precision!r} is invalid with engine.name='fsdp': use 'bf16' "
                              f"or 'fp32' (fp16 needs a loss scaler; engine.name='deepspeed' has one)")
        on_meta = not isinstance(model, nn.Module)
        if on_meta:  # a factory: shapes only until each rank materialises its own shard
            model = build_on_meta(model)
        else:
            model.to(self.device)
        self._num_params = sum(p.numel() for p in model.parameters())
        apply_activation_checkpointing(model, e.activation_checkpointing)
        if e.compile:
            for block in blocks_of(model):
                block.compile()  # in place: state-dict keys stay the same
        # One process in fp32: sharding would be all cost (an all-gather and a reduce-scatter per
        # block and micro-batch that copy, DTensor dispatch in every optimizer op) and no gain, so
        # the model stays plain. The checkpoint is the same DCP layout (plain tensors are saved whole
        # under the same keys), so it reshards to any world size. bf16 keeps fully_shard for its
        # MixedPrecisionPolicy (bf16 compute copies of fp32 parameters, fp32 gradient reduction).
        self.sharded = dist_info.world_size > 1 or _DTYPES[e.precision] is not None
        if e.context_parallel > 1:  # the (data x context) mesh; the model computes its chunks only
            from slam_pretrain.engine.context_parallel import apply_context_parallel, build_mesh

            apply_context_parallel(model, build_mesh(dist_info, e.context_parallel))
        if self.sharded:
            # Parameters are sharded over every rank, context ranks included (torchtitan's flattened
            # dp_shard x cp), and gradients averaged over them all (see engine/context_parallel.py).
            mesh = init_device_mesh(self.device.type, (dist_info.world_size,))
            mp = MixedPrecisionPolicy(param_dtype=_DTYPES[e.precision], reduce_dtype=torch.float32)
            for block in blocks_of(model):
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        if on_meta:
            # Allocate this rank's shards on the device (never the whole model on the host), then
            # fill them: the values depend on run.seed and the parameter names only.
            model.to_empty(device=self.device)
            model.init_weights(seed=cfg.run.seed)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.train)

    # -- the step ---------------------------------------------------------------------------
    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._begin_micro()
        _, loss = self.model(input_ids, labels)
        # Mean over micro-batches, like one big batch; FSDP averages over ranks in reduce-scatter.
        (loss / self.grad_accum).backward()
        return self._end_micro(loss)

    def optimizer_step(self, lr: float, hold: bool = False) -> StepResult:
        self._check_boundary()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):  # partial per-shard norms -> the global norm (a collective)
            norm = norm.full_tensor()
        # The norm is already global; the loss flag is per rank, so reduce (bad loss OR bad norm).
        skipped = all_reduce_any(self._loss_bad | ~torch.isfinite(norm)) or hold  # collective first: every rank
        grad_norm = float(norm.item())
        if not skipped:
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, norm, foreach=True)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_step()
        return StepResult(grad_norm=grad_norm, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, loss = self.model(input_ids, labels)
        return loss.detach()

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    @property
    def num_params(self) -> int:
        return self._num_params

    # -- state ------------------------------------------------------------------------------
    def save(self, dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(dir))

    def save_async(self, dir: Path) -> "Future":
        """``save`` that returns at once: the Future resolves when this rank's files are written and
        fsynced (on rank 0, once every rank's and ``.metadata`` are).

        The state is copied first (DCP's stager: fresh CPU memory, pinned and reused across saves
        on CUDA) so later steps cannot change what is written. The copy runs on the stager's thread
        while the next step's forward and backward run, which only read the weights; the optimizer
        step, the first thing that writes them, waits for it (a one-shot step pre-hook). DCP's
        background thread then writes the copy.
        """
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if getattr(self, "_ckpt_group", None) is None:
            # The background thread runs collectives (the save plan, the final gather); on the
            # default group they would interleave with the training step's collectives in another
            # order on each rank. A group of their own keeps them apart; gloo, as async save needs
            # a CPU backend (also when training runs on NCCL). Made at the first async save, which
            # every rank reaches at the same step.
            self._ckpt_group = dist.new_group(backend="gloo")
            cuda = self.device.type == "cuda"
            # One stager for the run: it keeps its buffers, so each save copies into the same memory
            # (CheckpointManager never starts a save before the previous one is written).
            self._ckpt_stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                             use_async_staging=True, use_non_blocking_copy=cuda))
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if self.device.type == "cuda":
            # The stager copies on a stream of its own, which does not wait for the compute stream:
            # the last optimizer step's kernels must be done first (the trainer's loss .item() has
            # usually waited for them already, so this costs nothing).
            torch.cuda.current_stream(self.device).synchronize()
        response = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(dir),
                                  process_group=self._ckpt_group, async_stager=self._ckpt_stager)
        staged = response.staging_completion
        hook: list = []

        def before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            hook.pop().remove()
            try:
                staged.result()
            except BaseException:  # noqa: BLE001 - the write's Future carries it to CheckpointManager.wait
                pass

        hook.append(self.optimizer.register_step_pre_hook(before_step))
        return response.upload_completion

    def load(self, dir: Path) -> None:
        if not (Path(dir) / ".metadata").is_file():
            raise UserError(f"{dir} is not an FSDP (Distributed Checkpoint) engine state: .metadata missing")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(dir))  # reshards to this world size
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # All-gathers every parameter on every rank (tests and small exports; the checkpoint path
        # never does this).
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().float().cpu().clone() for k, v in sd.items()}  # never alias live storage


def consolidated_state_dict_dcp(engine_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a DCP engine state, in one process without a process group.

    Reads only the "model.*" entries (not the optimizer) into tensors shaped from the metadata.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    engine_dir = Path(engine_dir)
    if not (engine_dir / ".metadata").is_file():
        raise UserError(f"{engine_dir} is not a Distributed Checkpoint directory: .metadata missing")
    meta = FileSystemReader(str(engine_dir)).read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            model[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load({"model": model}, checkpoint_id=str(engine_dir), no_dist=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in model.items()}
