"""TF's gradient multipliers on plain lists of tensors: ``grads[i] *= multipliers[i]``, one kernel per factor."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_optloss.common import foreach


def multiply_(grads: Sequence[Tensor], multipliers: Sequence[float]) -> None:
    """``grads[i] *= multipliers[i]`` in place; one foreach kernel per distinct multiplier, 1.0 skipped.

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.multipliers import multiply_
        >>> grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> multiply_(grads, [0.5, 1.0])
        >>> grads
        [tensor([0.5000, 1.0000]), tensor([3.])]
    """
    for multiplier, group in group_by_multiplier(grads, multipliers).items():
        if multiplier != 1.0:
            foreach.mul_(group, multiplier)


def group_by_multiplier(grads: Sequence[Tensor], multipliers: Sequence[float] | None) -> dict[float, list[Tensor]]:
    if multipliers is None:
        return {1.0: list(grads)}
    groups: dict[float, list[Tensor]] = {}
    for grad, multiplier in zip(grads, multipliers, strict=True):
        groups.setdefault(multiplier, []).append(grad)
    return groups
