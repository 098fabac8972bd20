"""Everything OptimizeLoss knows about Lightning's strategies lives here.

The callback asks this module for a :class:`GradientAccess` and never looks at the strategy itself: which
tensors hold the gradients this process may modify, where a sharded gradient sits in the full parameter,
how to sum a per-parameter quantity over the shards of each parameter, and how to average the loss over
data-parallel replicas.

- One device: gradients are whole; nothing to reduce.
- DDP (``ddp``, ``ddp_spawn``, ``ddp_find_unused_parameters_true``): gradients at ``on_before_optimizer_step``
  are already averaged over replicas and whole on every process, so the pipeline runs identically on each
  replica without a collective; only the logged loss is averaged.
- FSDP2 and tensor parallelism (``ModelParallelStrategy`` with ``fully_shard``/DTensor): gradients are
  DTensors. The pipeline works on the local shards; norms sum squared shard norms over the mesh dimensions
  the parameter is sharded on (one ``all_reduce`` for all parameters); noise for a shard is the matching
  slice of the noise of the full parameter, so results do not depend on the world size.
- FSDP1 (``FSDPStrategy``) and DeepSpeed hold gradients in flat buffers or outside ``p.grad``; they are
  refused with an error until they are verified on GPUs, rather than clipping or logging wrong values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class ShardLayout:
    """Where this process's shard of a gradient sits in the full gradient.

    Attributes:
        full_shape: The shape of the whole parameter.
        mesh_dims: ``(mesh dimension, tensor dimension)`` for every ``Shard`` placement, in mesh order.
        coordinate: This process's coordinate in the device mesh.
        mesh_sizes: The size of each mesh dimension.
        group: The process group over which the shards of this parameter are summed.
    """

    full_shape: torch.Size
    mesh_dims: tuple[tuple[int, int], ...]
    coordinate: tuple[int, ...]
    mesh_sizes: tuple[int, ...]
    group: dist.ProcessGroup

    def local_part(self, full: Tensor) -> Tensor:
        """The part of ``full`` (shaped like the whole parameter) that this process holds.

        DTensor's ``Shard(d)`` splits like ``torch.chunk`` (later shards smaller or empty), applied per mesh
        dimension in order.
        """
        part = full
        for mesh_dim, tensor_dim in self.mesh_dims:
            chunks = torch.chunk(part, self.mesh_sizes[mesh_dim], dim=tensor_dim)
            index = self.coordinate[mesh_dim]
            part = chunks[index] if index < len(chunks) else part.narrow(tensor_dim, 0, 0)
        return part

    def flat_range(self) -> tuple[int, int] | None:
        """``(start, stop)`` of this shard in the flattened full parameter, None unless it is one range.

        A shard is one range when the parameter is sharded on its first dimension over one mesh dimension
        (FSDP2's ``Shard(0)``): rows ``[i * ceil(n / k), (i + 1) * ceil(n / k))``, cut at ``n``.
        """
        if len(self.mesh_dims) != 1 or self.mesh_dims[0][1] != 0 or not self.full_shape:
            return None
        mesh_dim = self.mesh_dims[0][0]
        rows, parts = self.full_shape[0], self.mesh_sizes[mesh_dim]
        per_part = -(-rows // parts)
        row_size = math.prod(self.full_shape[1:])
        first = min(rows, self.coordinate[mesh_dim] * per_part)
        return first * row_size, min(rows, first + per_part) * row_size


class GradientAccess:
    """Gradients held whole by every process: one device, or DDP (already averaged there)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        """The tensors to read and modify in place (``None`` where a parameter got no gradient)."""
        return [param.grad for param in params]

    def local_params(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """The parameters as the tensors this process holds (what clip callables receive)."""
        return list(params)

    def layouts(self, params: Sequence[nn.Parameter]) -> list[ShardLayout | None]:
        """Each gradient's shard layout, ``None`` for whole gradients."""
        return [None] * len(params)

    def uniform_sum(self, layouts: Sequence[ShardLayout | None]) -> Callable[[Tensor], Tensor] | None:
        """A function summing a tensor over the shards, for clip callables that take ``all_reduce_sum``.

        None when no gradient is sharded. It needs every gradient sharded over the same processes; a mix is
        refused, because the callable cannot tell which of its values to sum.
        """
        groups = {layout.group if layout is not None else None for layout in layouts}
        if groups == {None}:
            return None
        if len(groups) > 1:
            raise ValueError(
                "OptimizeLoss: a clip callable that takes `all_reduce_sum` (e.g. agc_clipping_fn) needs every "
                "processed parameter sharded over the same processes, or none; this step mixes "
                f"{len(groups)} layouts. Shard every module with fully_shard, or restrict `variables`."
            )
        (group,) = groups

        def all_reduce_sum(values: Tensor) -> Tensor:
            values = values.clone()
            dist.all_reduce(values, group=group)
            return values

        return all_reduce_sum

    def sum_over_shards(self, values: Tensor, layouts: Sequence[ShardLayout | None]) -> Tensor:
        """``values[i]`` (one entry per parameter) summed over the shards of parameter ``i``."""
        return values

    def combine_over_shards(
        self, values: Tensor, layouts: Sequence[ShardLayout | None], combine: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """Rows ``values[i]`` (per-shard statistics of parameter ``i``) combined over the parameter's shards.

        ``combine`` maps the rows of all shards, ``(shards, p, m)``, to ``(p, m)``.
        """
        return values

    def mean_over_replicas(self, value: Tensor) -> Tensor:
        """``value`` averaged over the data-parallel replicas (the logged loss)."""
        if self.strategy.world_size == 1:
            return value
        return self.strategy.reduce(value, reduce_op="mean")


class DTensorGradientAccess(GradientAccess):
    """Gradients that are DTensors (FSDP2, tensor parallelism): local shards plus their layouts."""

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        grads = []
        for param in params:
            grad = param.grad
            grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
        return grads

    def local_params(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        return [param.to_local() if isinstance(param, DTensor) else param for param in params]

    def layouts(self, params: Sequence[nn.Parameter]) -> list[ShardLayout | None]:
        return [_layout(param.grad) if isinstance(param.grad, DTensor) else None for param in params]

    def sum_over_shards(self, values: Tensor, layouts: Sequence[ShardLayout | None]) -> Tensor:
        positions_by_group = _positions_by_group(layouts)
        if not positions_by_group:
            return values
        values = values.clone()
        for group, positions in positions_by_group.items():
            if len(positions) == len(layouts):
                dist.all_reduce(values, group=group)
            else:
                index = torch.tensor(positions, device=values.device)
                part = values.index_select(0, index)
                dist.all_reduce(part, group=group)
                values.index_copy_(0, index, part)
        return values

    def combine_over_shards(
        self, values: Tensor, layouts: Sequence[ShardLayout | None], combine: Callable[[Tensor], Tensor]
    ) -> Tensor:
        values = values.clone()
        for group, positions in _positions_by_group(layouts).items():
            index = torch.tensor(positions, device=values.device)
            part = values.index_select(0, index).contiguous()
            shards = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, part, group=group)
            values.index_copy_(0, index, combine(torch.stack(shards)))
        return values


def _positions_by_group(layouts: Sequence[ShardLayout | None]) -> dict[dist.ProcessGroup, list[int]]:
    positions_by_group: dict[dist.ProcessGroup, list[int]] = {}
    for position, layout in enumerate(layouts):
        if layout is not None:
            positions_by_group.setdefault(layout.group, []).append(position)
    return positions_by_group


def _layout(grad: DTensor) -> ShardLayout | None:
    mesh = grad.device_mesh
    mesh_dims = tuple(
        (mesh_dim, placement.dim) for mesh_dim, placement in enumerate(grad.placements) if isinstance(placement, Shard)
    )
    if not mesh_dims:
        return None
    return ShardLayout(
        full_shape=grad.shape,
        mesh_dims=mesh_dims,
        coordinate=tuple(mesh.get_coordinate()),
        mesh_sizes=tuple(mesh.size(dim) for dim in range(mesh.ndim)),
        group=_shard_group(mesh, [mesh_dim for mesh_dim, _ in mesh_dims]),
    )


def _shard_group(mesh: DeviceMesh, mesh_dims: list[int]) -> dist.ProcessGroup:
    """The processes that hold the other shards of a parameter sharded on ``mesh_dims``."""
    if len(mesh_dims) == 1:
        return mesh.get_group(mesh_dims[0])
    # Sharded on several mesh dimensions (FSDP2 x tensor parallel): the flattened sub-mesh of those.
    names = tuple(mesh.mesh_dim_names[dim] for dim in mesh_dims)
    return mesh[names]._flatten().get_group()


def gradient_access(owner: str, strategy: Strategy) -> GradientAccess:
    """The :class:`GradientAccess` for ``strategy``, or an error naming what is supported."""
    if isinstance(strategy, ModelParallelStrategy):
        return DTensorGradientAccess(strategy)
    unsupported = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, unsupported):
        return GradientAccess(strategy)
    raise ValueError(
        f"{owner}: the Trainer's strategy is {type(strategy).__name__}, which this version of lightning_optloss "
        "does not support yet; supported: one device, 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true' and "
        "ModelParallelStrategy (FSDP2 via fully_shard, tensor parallelism). For FSDP use FSDP2: "
        "Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)) with fully_shard "
        "in configure_model. It refuses rather than clipping or logging wrong values."
    )


def loss_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The AMP ``GradScaler`` of the Trainer's precision (``16-mixed``), which skips inf/NaN steps itself."""
    return getattr(trainer.precision_plugin, "scaler", None)
