"""Per-gradient statistics (TF's ``gradients`` / ``gradient_norm`` summaries): moments that combine over shards."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def local_moments(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Per-gradient ``[count, mean, m2, min, max]`` (``m2``: sum of squared deviations) as ``(len(grads), 5)``.

    Moments of shards combine exactly with :func:`combine_moments`; an empty shard is ``[0, 0, 0, inf, -inf]``.
    """
    rows = []
    for grad in grads:
        values = grad.detach().reshape(-1).to(dtype)
        if values.numel() == 0:
            rows.append(torch.tensor([0.0, 0.0, 0.0, math.inf, -math.inf], dtype=dtype, device=grad.device))
            continue
        variance, mean = torch.var_mean(values, correction=0)
        low, high = torch.aminmax(values)
        count = torch.full((), values.numel(), dtype=dtype, device=grad.device)
        rows.append(torch.stack([count, mean, variance * count, low, high]))
    return torch.stack(rows)


def combine_moments(parts: Tensor) -> Tensor:
    """Combine ``(shards, n, 5)`` moments of the shards of ``n`` tensors into ``(n, 5)`` (Chan et al.)."""
    count = parts[..., 0].sum(0)
    mean = (parts[..., 0] * parts[..., 1]).sum(0) / count
    m2 = parts[..., 2].sum(0) + (parts[..., 0] * (parts[..., 1] - mean).square()).sum(0)
    return torch.stack([count, mean, m2, parts[..., 3].amin(0), parts[..., 4].amax(0)], dim=-1)


def gradient_statistics(moments: Tensor, norms: Tensor) -> Tensor:
    """Per-gradient ``[mean, std, min, max, norm]`` from :func:`local_moments` rows and the gradients' norms.

    ``std`` is the population standard deviation, as TF's histogram summaries (``sum`` and ``sum_squares``)
    give it.

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.norms import parameter_norms
        >>> from lightning_optloss.gradients.statistics import gradient_statistics, local_moments
        >>> grads = [torch.tensor([1.0, 3.0])]
        >>> gradient_statistics(local_moments(grads, torch.float64), parameter_norms(grads))  # mean std min max norm
        tensor([[2.0000, 1.0000, 1.0000, 3.0000, 3.1623]], dtype=torch.float64)
    """
    count, mean, m2 = moments[:, 0], moments[:, 1], moments[:, 2]
    std = (m2 / count).clamp(min=0.0).sqrt()
    return torch.stack([mean, std, moments[:, 3], moments[:, 4], norms.to(moments.dtype)], dim=-1)
