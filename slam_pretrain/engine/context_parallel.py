"""Context parallelism, the engine's side: the 2-D (data x context) mesh and the collective.

``engine.context_parallel: K`` splits every sequence over K ranks (the model's side, the layout
and why SLAM needs so little communication: ``slam_pretrain/model/sequence_shard.py``). Ranks form
a (world / K) x K mesh, row-major as torchrun numbers them: rank = data_rank * K + context_rank,
so the K ranks of a sequence are neighbours (one node, where NVLink is, when K <= GPUs per node).

- The ranks of one context group read the same rows (``data_parallel``): the loader is split over
  world / K data ranks, and the global batch counts rows of those.
- FSDP2 shards parameters over all world ranks (torchtitan's flattened ``dp_shard x cp``) and
  averages gradients over them; each context rank's loss is its share of the row's mean times K
  (``SequenceShard.local_targets``), so that average is the data-parallel mean of whole rows.
- The one collective is ``all_gather_single`` of torch's functional collectives, which carries
  gradients (backward: reduce-scatter), runs on gloo and NCCL, and can be traced by torch.compile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from slam_pretrain.errors import ConfigError
from slam_pretrain.model.sequence_shard import SequenceShard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from slam_pretrain.distributed import DistInfo


def data_parallel(rank: int, world_size: int, context_parallel: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size): the ranks of one context group share it."""
    if context_parallel < 1 or world_size % context_parallel:
        raise ConfigError(f"engine.context_parallel={context_parallel} is invalid for {world_size} process(es): "
                          f"it must divide the world size (the world is data-parallel ranks x context ranks)")
    return rank // context_parallel, world_size // context_parallel


def build_mesh(dist_info: "DistInfo", context_parallel: int) -> "DeviceMesh":
    """The ("dp", "cp") device mesh of the world: (world / K) x K, row-major."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = data_parallel(dist_info.rank, dist_info.world_size, context_parallel)[1]
    return init_device_mesh(dist_info.device.type, (dp, context_parallel), mesh_dim_names=("dp", "cp"))


def apply_context_parallel(model: nn.Module, mesh: "DeviceMesh") -> SequenceShard:
    """Set ``model.sequence_shard`` for the mesh's "cp" dimension; returns it."""
    import torch.distributed._functional_collectives as funcol

    cp_mesh = mesh["cp"]
    group = cp_mesh.get_group()

    def gather(x: torch.Tensor) -> torch.Tensor:  # x -> [K, *x.shape], gradients flow back to each piece
        out = funcol.all_gather_single_autograd(x.contiguous().unsqueeze(0), gather_dim=0, group=group)
        return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out

    shard = SequenceShard(size=cp_mesh.size(), rank=cp_mesh.get_local_rank(), gather=gather)
    model.sequence_shard = shard
    return shard
