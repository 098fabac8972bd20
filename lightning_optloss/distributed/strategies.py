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
- FSDP1 (``FSDPStrategy``, ``use_orig_params=True``): each parameter's gradient is a 1-d slice of a sharded
  flat gradient, a range of the flattened parameter (:class:`FlatShardLayout`); handled as FSDP2's shards.
- DeepSpeed ZeRO 1/2/3: ``p.grad`` is None at the hook; DeepSpeed's safe accessors give the full gradients
  (ZeRO 1/2) or each process's partition (ZeRO 3), and the processed ones are written back; the pipeline runs
  at the gradient accumulation boundary only.

What a strategy cannot combine with OptimizeLoss is refused at ``setup`` (:meth:`GradientAccess.check`),
rather than clipping or logging wrong values; XLA is refused altogether.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from lightning_optloss.common import validation
from lightning_optloss.common.parameters import NamedParameter
from lightning_optloss.distributed import _deepspeed_private, _torch_private
from lightning_optloss.gradients.contract import ClipTransform


@dataclass(frozen=True)
class ShardLayout:
    """Where this process's shard of a gradient sits in the full gradient (a
    :class:`~lightning_optloss.gradients.contract.Layout`).

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


@dataclass(frozen=True)
class FlatShardLayout:
    """A shard that is one range of its flattened parameter: FSDP1's flat parameters.

    Attributes:
        full_shape: The shape of the whole parameter.
        start: The first element of the flattened parameter that this process holds.
        stop: One past the last (``start == stop``: this process holds none of it).
        group: The process group over which the shards of this parameter are summed.
    """

    full_shape: torch.Size
    start: int
    stop: int
    group: dist.ProcessGroup

    def local_part(self, full: Tensor) -> Tensor:
        return full.reshape(-1)[self.start : self.stop]

    def flat_range(self) -> tuple[int, int]:
        return self.start, self.stop


Layout = ShardLayout | FlatShardLayout


class GradientAccess:
    """Gradients held whole by every process: one device, or DDP (already averaged there)."""

    keeps_rows_whole = True  # every row along dim 0 of a >= 2-d gradient lies on one process (see needs_whole_rows)
    params_final_after_step = True  # the module's parameters hold the update when the optimizer's step ends

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def attach(self, model: nn.Module) -> None:
        """Learn how the strategy's wrapped ``model`` holds its parameters (at the start of fit)."""

    def parameter_name(self, name: str) -> str:
        """The user's name of a parameter of the LightningModule (wrappers' prefixes removed)."""
        return name

    def full_sizes(self, params: Sequence[nn.Parameter]) -> list[int]:
        """The number of elements of each whole parameter (local shards count as their parameter)."""
        return [param.numel() for param in params]

    def check(
        self, owner: str, trainer: pl.Trainer, clip: ClipTransform | None, on_nonfinite: str, skip_spikes: bool = False
    ) -> None:
        """At ``setup``: raise ``ValueError`` for what this strategy cannot combine with OptimizeLoss (a clip
        that ``needs_whole_rows`` where rows are split, ...), warn about what it does differently.
        ``skip_spikes``: whether steps are skipped on spikes."""
        if clip is not None and clip.needs_whole_rows and not self.keeps_rows_whole:
            raise ValueError(
                f"{owner}: clip_gradients={validation.show(clip)} clips rows of parameters, which "
                f"{type(self.strategy).__name__} splits across processes (flat shards); use DDP, FSDP2 "
                "(ModelParallelStrategy with fully_shard) or DeepSpeed ZeRO 1/2, which keep every row on one process."
            )

    def optimized_parameters(self, optimizer: Any) -> list[Tensor]:
        """The parameters of the module that ``optimizer`` (an entry of ``trainer.optimizers``) updates."""
        return [param for group in optimizer.param_groups for param in group["params"]]

    def params_by_optimizer(
        self, owner: str, optimizers: Sequence[Any], params: Sequence[NamedParameter]
    ) -> list[tuple[Any, list[NamedParameter]]]:
        """The processed parameters each of ``optimizers`` (``trainer.optimizers``) updates; an error for any
        parameter that none updates."""
        pairs = []
        unclaimed = {entry.index: entry for entry in params}
        for optimizer in optimizers:
            held = {id(p) for p in self.optimized_parameters(optimizer)}
            mine = [entry for entry in params if id(entry.param) in held]
            if mine:
                pairs.append((optimizer, mine))
                for entry in mine:
                    unclaimed.pop(entry.index, None)
        if unclaimed:
            names = ", ".join(repr(entry.name) for entry in unclaimed.values())
            raise ValueError(
                f"{owner}: `variables` includes parameters that no optimizer of the Trainer updates: {names}. "
                "Pass only optimized parameters (configure_optimizers(..., variables=...) chooses those)."
            )
        return pairs

    def torch_optimizer(self, optimizer: Any) -> Optimizer:
        """The torch optimizer inside an entry of ``trainer.optimizers``: the one schedulers hold, and whose
        step (hooks after it) is the update."""
        return optimizer

    def at_optimizer_step(self) -> bool:
        """Whether the gradients are complete: false on DeepSpeed's accumulating micro-batches."""
        return True

    def write_back(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
        """Store processed gradients where the optimizer reads them (nothing to do where they were views)."""

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        """The tensors to read and modify in place (``None`` where a parameter got no gradient)."""
        return [param.grad for param in params]

    def local_params(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """The parameters as the tensors this process holds (what clip callables receive)."""
        return list(params)

    def layouts(self, params: Sequence[nn.Parameter]) -> list[Layout | None]:
        """Each gradient's shard layout, ``None`` for whole gradients."""
        return [None] * len(params)

    def uniform_sum(self, layouts: Sequence[Layout | None]) -> Callable[[Tensor], Tensor] | None:
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

    def sum_over_shards(self, values: Tensor, layouts: Sequence[Layout | None]) -> Tensor:
        """``values[i]`` (one entry per parameter) summed over the shards of parameter ``i``."""
        return values

    def combine_over_shards(
        self, values: Tensor, layouts: Sequence[Layout | None], combine: Callable[[Tensor], Tensor]
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


class ShardedGradientAccess(GradientAccess):
    """Gradients sharded over processes: per-parameter values are summed or combined over each one's shards."""

    def sum_over_shards(self, values: Tensor, layouts: Sequence[Layout | None]) -> Tensor:
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
        self, values: Tensor, layouts: Sequence[Layout | None], combine: Callable[[Tensor], Tensor]
    ) -> Tensor:
        values = values.clone()
        for group, positions in _positions_by_group(layouts).items():
            index = torch.tensor(positions, device=values.device)
            part = values.index_select(0, index).contiguous()
            shards = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, part, group=group)
            values.index_copy_(0, index, combine(torch.stack(shards)))
        return values


class DTensorGradientAccess(ShardedGradientAccess):
    """Gradients that are DTensors (FSDP2, tensor parallelism): local shards plus their layouts."""

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        grads = []
        for param in params:
            grad = param.grad
            grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
        return grads

    def local_params(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        return [param.to_local() if isinstance(param, DTensor) else param for param in params]

    def layouts(self, params: Sequence[nn.Parameter]) -> list[Layout | None]:
        return [_layout(param.grad) if isinstance(param.grad, DTensor) else None for param in params]


@dataclass(frozen=True)
class _FlatSlice:
    """Where an original parameter's shard lies in its FSDP1 flat parameter on this process."""

    flat_param: nn.Parameter
    offset: int | None  # in the local shard of the flat parameter; None: not on this process
    layout: FlatShardLayout


class FlatParameterGradientAccess(ShardedGradientAccess):
    """FSDP1 (``FSDPStrategy``, ``use_orig_params=True``): each parameter's gradient is a 1-d slice of a
    sharded flat gradient, a range of the flattened parameter, possibly empty on some processes.

    ``p.grad`` of an original parameter is a view into its flat parameter's gradient (None where this
    process holds none of it; then an empty tensor stands in, so that every process processes the same
    parameters and runs the same collectives). ``NO_SHARD`` keeps whole gradients, handled as under DDP.
    """

    keeps_rows_whole = False

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._slices: dict[int, _FlatSlice] = {}

    def attach(self, model: nn.Module) -> None:
        self._slices = {}
        for shard in _torch_private.fsdp_flat_shards(model):
            layout = FlatShardLayout(shard.shape, shard.start, shard.stop, shard.process_group)
            self._slices[id(shard.param)] = _FlatSlice(shard.flat_param, shard.offset, layout)

    def parameter_name(self, name: str) -> str:
        return _torch_private.fsdp_parameter_name(name)

    def full_sizes(self, params: Sequence[nn.Parameter]) -> list[int]:
        sizes = []
        for param in params:
            flat = self._slices.get(id(param))
            sizes.append(param.numel() if flat is None else math.prod(flat.layout.full_shape))
        return sizes

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        grads = []
        for param in params:
            flat = self._slices.get(id(param))
            if flat is None or param.grad is not None:
                grads.append(param.grad)
                continue
            flat_grad = flat.flat_param.grad
            if flat_grad is None:  # the same on every process: the flat gradient is reduce-scattered
                grads.append(None)
            elif flat.offset is None:
                grads.append(flat_grad.new_empty(0))
            else:
                grads.append(flat_grad[flat.offset : flat.offset + flat.layout.stop - flat.layout.start])
        return grads

    def layouts(self, params: Sequence[nn.Parameter]) -> list[Layout | None]:
        return [flat.layout if (flat := self._slices.get(id(param))) else None for param in params]


class DeepSpeedGradientAccess(ShardedGradientAccess):
    """DeepSpeed ZeRO 1, 2 and 3 (``DeepSpeedStrategy``), through DeepSpeed's safe gradient accessors.

    Lightning calls ``on_before_optimizer_step`` on every micro-batch, and DeepSpeed reduces the gradients only
    at the accumulation boundary: the pipeline runs there only (``is_gradient_accumulation_boundary``), once
    per real optimizer step. ``p.grad`` is None at the hook:

    - ZeRO 1 and 2: every parameter's full fp32 gradient is assembled with ``safe_get_full_grad`` (an
      all-reduce per parameter, which every process runs in the same order), processed like DDP's whole
      gradients, and stored back with ``safe_set_full_grad`` (each process writes its own partition). The
      hook then holds every full gradient at once.
    - ZeRO 3: each process works on its partition only (``safe_get_local_grad`` / ``safe_set_local_grad``),
      a range of the flattened parameter as for FSDP1; norms take one all-reduce.

    The update is the client optimizer's step inside the engine (ZeRO's wrappers hold it): the global step
    advances after it, before Lightning steps the schedulers; ``update_ops`` run at the end of the batch, once
    the engine has written the updated parameters into the module. Refused at ``setup``: ``16-mixed`` and
    ``16-true`` (DeepSpeed's own loss scaler keeps the gradients scaled at the hook), ``on_nonfinite="skip"``
    (the engine's step cannot be skipped from a callback) and DeepSpeed's ``gradient_clipping`` together with
    ``clip_gradients``.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.zero_stage = int(strategy.config.get("zero_optimization", {}).get("stage", 0))
        self.keeps_rows_whole = self.zero_stage < 3
        # The client optimizer steps DeepSpeed's flat fp32 partitions; the engine copies them into the module after.
        self.params_final_after_step = False
        self._engine: Any = None

    def check(
        self, owner: str, trainer: pl.Trainer, clip: ClipTransform | None, on_nonfinite: str, skip_spikes: bool = False
    ) -> None:
        super().check(owner, trainer, clip, on_nonfinite, skip_spikes)
        precision = str(trainer.precision_plugin.precision)
        if precision.startswith("16") or self.strategy.config.get("fp16", {}).get("enabled"):
            raise ValueError(
                f"{owner}: DeepSpeed with precision={precision!r} keeps the gradients multiplied by its own loss "
                "scale until its step, so noise, clipping and summaries would see scaled values; use "
                "precision='bf16-mixed' or '32-true' with DeepSpeed."
            )
        if on_nonfinite == "skip":
            raise ValueError(
                f"{owner}: on_nonfinite='skip' cannot skip DeepSpeed's step (it runs inside the engine); use "
                "on_nonfinite='warn' or 'raise' with DeepSpeed."
            )
        if skip_spikes:
            raise ValueError(
                f"{owner}: skip_spikes cannot skip DeepSpeed's step (it runs inside the engine); leave it unset "
                "with DeepSpeed, or use DDP or FSDP2."
            )
        if clip is not None and self.strategy.config.get("gradient_clipping"):
            raise ValueError(
                f"{owner}: clip_gradients={clip!r} and DeepSpeed's gradient_clipping="
                f"{self.strategy.config['gradient_clipping']} would clip twice; keep one of them."
            )
        if trainer.accumulate_grad_batches > 1:
            rank_zero_warn(
                f"{owner}: with DeepSpeed and accumulate_grad_batches={trainer.accumulate_grad_batches}, Lightning "
                "divides each micro-batch's loss by accumulate_grad_batches and DeepSpeed's backward divides it "
                "again, so the gradients OptimizeLoss sees (and the optimizer applies) are 1/"
                f"{trainer.accumulate_grad_batches} of the accumulated mean that other strategies give: clip "
                "thresholds, noise and the logged gradient norms act on that scale."
            )

    def attach(self, model: nn.Module) -> None:
        self._engine = model

    def full_sizes(self, params: Sequence[nn.Parameter]) -> list[int]:
        return [_deepspeed_private.full_numel(param) for param in params]

    def optimized_parameters(self, optimizer: Any) -> list[Tensor]:
        # DeepSpeed has one optimizer; its param groups hold flat partitions, not the module's parameters.
        return [param for param in self._engine.module.parameters() if param.requires_grad]

    def torch_optimizer(self, optimizer: Any) -> Optimizer:
        return getattr(optimizer, "optimizer", optimizer)  # ZeRO's wrappers hold the client optimizer

    def at_optimizer_step(self) -> bool:
        return bool(self._engine.is_gradient_accumulation_boundary())

    def local_grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        if self.zero_stage < 3:
            return [safe_get_full_grad(param) for param in params]
        grads = []
        for param in params:
            partition = safe_get_local_grad(param)
            layout = self._partition(param)
            grads.append(None if partition is None else partition[: layout.stop - layout.start])
        return grads

    def local_params(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        if self.zero_stage < 3:
            return list(params)
        return [
            _deepspeed_private.partition(param)[: (layout := self._partition(param)).stop - layout.start]
            for param in params
        ]

    def layouts(self, params: Sequence[nn.Parameter]) -> list[Layout | None]:
        if self.zero_stage < 3:
            return [None] * len(params)
        return [self._partition(param) for param in params]

    def write_back(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

        for param, grad in zip(params, grads, strict=True):
            if self.zero_stage < 3:
                safe_set_full_grad(param, grad)
                continue
            # The padded partition: the buffer that ``grad`` is the start of, or (offloaded, or not float32)
            # a new copy of it.
            partition = safe_get_local_grad(param)
            if partition.data_ptr() != grad.data_ptr():
                partition[: grad.numel()].copy_(grad)
            safe_set_local_grad(param, partition)

    @staticmethod
    def _partition(param: nn.Parameter) -> FlatShardLayout:
        """ZeRO-3: rank ``r`` holds elements ``[r * P, (r + 1) * P)`` of the flattened parameter, ``P`` the
        (padded) partition size, cut at the parameter's size."""
        group = _deepspeed_private.process_group(param)
        size, numel = _deepspeed_private.partition_size(param), _deepspeed_private.full_numel(param)
        start = min(numel, dist.get_rank(group=group) * size)
        return FlatShardLayout(_deepspeed_private.full_shape(param), start, min(numel, start + size), group)


def _positions_by_group(layouts: Sequence[Layout | None]) -> dict[dist.ProcessGroup, list[int]]:
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
    return _torch_private.flattened_mesh_group(mesh, names)


def gradient_access(owner: str, strategy: Strategy) -> GradientAccess:
    """The :class:`GradientAccess` for ``strategy``, or an error naming what is supported."""
    if isinstance(strategy, ModelParallelStrategy):
        return DTensorGradientAccess(strategy)
    if isinstance(strategy, FSDPStrategy):
        if strategy.kwargs.get("use_orig_params") is False:
            raise ValueError(
                f"{owner}: FSDPStrategy(use_orig_params=False) hides the module's parameters in flat parameters, "
                "so gradients cannot be processed or summarised per parameter; use use_orig_params=True "
                "(Lightning's default) or FSDP2 (ModelParallelStrategy with fully_shard)."
            )
        return FlatParameterGradientAccess(strategy)
    if isinstance(strategy, DeepSpeedStrategy):
        return DeepSpeedGradientAccess(strategy)
    unsupported = (XLAStrategy, SingleDeviceXLAStrategy)
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, unsupported):
        return GradientAccess(strategy)
    raise ValueError(
        f"{owner}: the Trainer's strategy is {type(strategy).__name__}, which lightning_optloss does not "
        "support; supported: one device, 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', 'fsdp' "
        "(FSDPStrategy with use_orig_params=True), ModelParallelStrategy (FSDP2 via fully_shard, tensor "
        "parallelism) and DeepSpeedStrategy (ZeRO 1, 2, 3). It refuses rather than clipping or logging wrong "
        "values."
    )


def loss_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The AMP ``GradScaler`` of the Trainer's precision (``16-mixed``), which skips inf/NaN steps itself."""
    return getattr(trainer.precision_plugin, "scaler", None)


def check_whole_tensor_loading(owner: str, strategy: Strategy) -> None:
    """Refuse strategies whose processes do not hold whole parameters and optimizer states.

    Loading values from outside (a TF checkpoint) copies whole tensors into every process: right for one
    device and DDP (every replica loads the same values); FSDP1, FSDP2 and DeepSpeed shard parameters and
    optimizer states (or wrap the optimizer), and are refused at ``setup``, before anything is changed.
    """
    unsupported = (XLAStrategy, SingleDeviceXLAStrategy, DeepSpeedStrategy)  # DeepSpeedStrategy is a DDPStrategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, unsupported):
        return
    sharded = {
        ModelParallelStrategy: "FSDP2 (ModelParallelStrategy) shards parameters and optimizer states into DTensors",
        FSDPStrategy: "FSDP1 (FSDPStrategy) flattens and shards parameters and optimizer states",
        DeepSpeedStrategy: "DeepSpeed wraps the optimizer and partitions its states",
    }
    reason = next((text for cls, text in sharded.items() if isinstance(strategy, cls)), "it is not supported")
    raise ValueError(
        f"{owner}: the Trainer's strategy is {type(strategy).__name__}: {reason}. Loading whole tensors is "
        "supported on one device and with DDP ('ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true')."
    )
