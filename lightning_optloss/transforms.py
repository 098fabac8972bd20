"""Gradient transforms on plain lists of tensors: no Lightning, no trainer, no hidden state.

Each function does one step of TF's ``optimize_loss`` pipeline (noise → multipliers → clipping →
statistics) in place with ``torch._foreach_*`` kernels, so its cost grows with the bytes of the gradients,
not with a Python loop over parameters doing arithmetic. None of them copies a value to the host: the
results stay on the device until :mod:`lightning_optloss.transfers` fetches them once on a logged step.

Norm reductions accept ``all_reduce_sum``: for gradients sharded across processes (FSDP), the caller passes a
function that sums a tensor over the shards, so norms are those of the full parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_optloss.strategies import ShardLayout

AllReduceSum = Callable[[Tensor], Tensor]

_TRUNCATION = 2.0  # standard deviations, as tf.random.truncated_normal
_TRUNCATED_STD = 0.8796256610342398  # std of a standard normal truncated at ±2
_MASK64 = (1 << 64) - 1


def _norm_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def parameter_norms(grads: Sequence[Tensor], all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """The L2 norm of each gradient, as a 1-d tensor (float32, float64 if a gradient is float64).

    Half-precision gradients are reduced in float32. With ``all_reduce_sum`` the squared norms of the local
    shards are summed over processes first: exactly one collective for all parameters.
    """
    dtype = _norm_dtype(grads)
    device = grads[0].device
    norms: list[Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(position)
    for grad_dtype, positions in by_dtype.items():
        upcast = dtype if grad_dtype in (torch.float16, torch.bfloat16) else None
        group = torch._foreach_norm([grads[p] for p in positions], 2, dtype=upcast)
        for position, norm in zip(positions, group, strict=True):
            norms[position] = norm
    stacked = torch.stack([n.to(device, dtype) for n in norms])  # type: ignore[union-attr]
    if all_reduce_sum is not None:
        stacked = all_reduce_sum(stacked.square()).sqrt()
    return stacked


def global_norm(norms: Tensor) -> Tensor:
    """``sqrt(sum(norm_i ** 2))`` of per-parameter norms: TF's ``clip_ops.global_norm``."""
    return torch.linalg.vector_norm(norms)


def clip_by_global_norm_(grads: Sequence[Tensor], clip_norm: float, norm: Tensor) -> Tensor:
    """Scale ``grads`` in place by ``clip_norm / max(norm, clip_norm)``; return that factor (0-d tensor).

    Written as TF writes it (``clip_norm * min(1 / norm, 1 / clip_norm)``, plus ``norm - norm``), so a
    non-finite global norm makes every gradient NaN, as ``tf.clip_by_global_norm`` does, instead of zeroing
    the finite ones as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    inverse_clip = float(np.float32(1.0) / np.float32(clip_norm))
    factor = clip_norm * torch.clamp(norm.reciprocal(), max=inverse_clip) + (norm - norm)
    torch._foreach_mul_(list(grads), factor)
    return factor


def multiply_(grads: Sequence[Tensor], multipliers: Sequence[float]) -> None:
    """``grads[i] *= multipliers[i]`` in place; one foreach kernel per distinct multiplier, 1.0 skipped."""
    groups: dict[float, list[Tensor]] = {}
    for grad, multiplier in zip(grads, multipliers, strict=True):
        if multiplier != 1.0:
            groups.setdefault(multiplier, []).append(grad)
    for multiplier, group in groups.items():
        torch._foreach_mul_(group, multiplier)


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
    """
    count, mean, m2 = moments[:, 0], moments[:, 1], moments[:, 2]
    std = (m2 / count).clamp(min=0.0).sqrt()
    return torch.stack([mean, std, moments[:, 3], moments[:, 4], norms.to(moments.dtype)], dim=-1)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed from (seed, global step, parameter index), the same in every process."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ index) >> 1


def truncated_normal(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal samples cut at ±2 standard deviations (``tf.random.truncated_normal``), float32.

    On the CPU, out-of-range samples are redrawn (:func:`truncated_normal_by_redrawing`, TF's method, about
    1.6x the cost of ``torch.randn``); on accelerators the inverse CDF is used
    (:func:`truncated_normal_by_inverse_cdf`), which needs no host synchronisation. Both give the same
    distribution, not the same numbers.
    """
    if device.type == "cpu":
        return truncated_normal_by_redrawing(shape, generator, device)
    return truncated_normal_by_inverse_cdf(shape, generator, device)


def truncated_normal_by_redrawing(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Draw normals, redraw those beyond ±2 until none is left (reads the count: syncs on accelerators)."""
    sample = torch.randn(shape, generator=generator, device=device)
    flat = sample.view(-1)
    outside = (flat.abs() > _TRUNCATION).nonzero().squeeze(1)
    while outside.numel():
        redrawn = torch.randn(outside.numel(), generator=generator, device=device)
        flat[outside] = redrawn
        outside = outside[redrawn.abs() > _TRUNCATION]
    return sample


def truncated_normal_by_inverse_cdf(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """``sqrt(2) * erfinv(2u - 1)`` for ``u`` uniform between the CDF at -2 and at +2: no host sync."""
    bound = 0.5 * (1.0 + math.erf(_TRUNCATION / math.sqrt(2.0)))
    sample = torch.empty(shape, device=device).uniform_(1.0 - bound, bound, generator=generator)
    return sample.mul_(2.0).sub_(1.0).erfinv_().mul_(math.sqrt(2.0)).clamp_(-_TRUNCATION, _TRUNCATION)


class GradientNoise:
    """TF's gradient noise, ``g += truncated_normal(shape) * scale``, seeded so replicas agree.

    The noise added to parameter ``index`` at global step ``step`` is drawn from a generator seeded with
    :func:`noise_seed` ``(seed, step, index)``, so every data-parallel replica adds the same noise (TF drew
    unseeded noise per replica, and replicas drifted apart), a resumed run adds the noise the uninterrupted
    run would have, and noise never depends on the order in which parameters are visited. A sharded gradient
    gets its slice of the full parameter's noise, so results do not depend on the world size. Peak extra
    memory is the largest parameter's noise.

    Args:
        seed: Any integer in ``[0, 2**63)``.
    """

    truncated_std = _TRUNCATED_STD

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, shape: Sequence[int], step: int, index: int, device: torch.device) -> Tensor:
        """The unscaled float32 noise of parameter ``index`` at ``step``."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed, step, index))
        return truncated_normal(shape, generator, device)

    def add_(
        self,
        grads: Sequence[Tensor],
        indices: Sequence[int],
        step: int,
        scale: float,
        layouts: Sequence[ShardLayout | None] | None = None,
    ) -> None:
        """Add ``scale`` times the noise of ``indices[i]`` at ``step`` to ``grads[i]`` in place.

        ``layouts[i]``, when given and not None, says where the shard ``grads[i]`` sits in its parameter.
        """
        layouts = layouts or [None] * len(grads)
        for grad, index, layout in zip(grads, indices, layouts, strict=True):
            if layout is None:
                noise = self.sample(grad.shape, step, index, grad.device)
            else:
                noise = layout.local_part(self.sample(layout.full_shape, step, index, grad.device))
            grad.add_(noise, alpha=scale)

    def __getstate__(self) -> dict[str, object]:
        return {"seed": self.seed, "_generators": {}}  # generators do not pickle; they are re-made
