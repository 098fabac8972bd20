"""Gradient norms on plain lists of tensors: per-parameter L2 norms in one kernel, and TF's global norm.

Norm reductions accept ``all_reduce_sum``: for gradients sharded across processes (FSDP), the caller passes a
function that sums a tensor over the shards, so norms are those of the full parameters. Nothing here copies a
value to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_optloss.common import foreach

AllReduceSum = Callable[[Tensor], Tensor]


def _norm_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def parameter_norms(grads: Sequence[Tensor], all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """The L2 norm of each gradient, as a 1-d tensor (float32, float64 if a gradient is float64).

    Half-precision gradients are reduced in float32. With ``all_reduce_sum`` the squared norms of the local
    shards are summed over processes first: exactly one collective for all parameters.

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.norms import global_norm, parameter_norms
        >>> norms = parameter_norms([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])])
        >>> norms, global_norm(norms)
        (tensor([ 5., 12.]), tensor(13.))
    """
    device = grads[0].device
    if {grad.dtype for grad in grads} in ({torch.float32}, {torch.float64}):  # the common case: one kernel
        try:
            stacked = torch.stack(foreach.norm(list(grads), 2))
        except RuntimeError:  # gradients on several devices: the general path below
            pass
        else:
            return stacked if all_reduce_sum is None else all_reduce_sum(stacked.square()).sqrt()
    dtype = _norm_dtype(grads)
    norms: list[Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(position)
    for grad_dtype, positions in by_dtype.items():
        upcast = dtype if grad_dtype in (torch.float16, torch.bfloat16) else None
        group = foreach.norm([grads[p] for p in positions], 2, dtype=upcast)
        for position, norm in zip(positions, group, strict=True):
            norms[position] = norm
    stacked = torch.stack([n.to(device, dtype) for n in norms])  # type: ignore[union-attr]
    if all_reduce_sum is not None:
        stacked = all_reduce_sum(stacked.square()).sqrt()
    return stacked


def global_norm(norms: Tensor) -> Tensor:
    """``sqrt(sum(norm_i ** 2))`` of per-parameter norms: TF's ``clip_ops.global_norm``."""
    return torch.linalg.vector_norm(norms)
