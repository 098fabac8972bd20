"""Per-gradient statistics (TF's ``gradients`` / ``gradient_norm`` summaries): moments that combine over shards.

All gradients of a step are reduced in a few kernels, not a handful per gradient: :class:`GradientSegments`
concatenates the gradients of fewer than :data:`SEGMENT_LIMIT` elements into one flat tensor per device and
dtype, and reduces its segments (one per gradient) at once; a larger gradient is a segment of its own, reduced
in place (concatenating it would copy it, and its kernels' fixed costs are already small beside its bytes).
The spread is always a second pass around the mean (no cancellation of sum and sum of squares). The flat
groups are reduced in float64, so their moments equal the per-tensor float64 ``torch.var_mean`` /
``torch.aminmax`` ones to rounding. A large gradient is reduced in its own precision (float32 for 16- and
32-bit floats): converting millions of elements to float64 costs 10-30x the reductions. Its mean is the
float32 mean corrected by the sum of the deviations from it, so mean and spread are within about 1e-7 of the
spread of the float64 ones; a float32 gradient whose sum overflows float32 (elements near 1e38) gets an
infinite mean.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SEGMENT_LIMIT = 1 << 16  # elements: smaller gradients share a flat tensor, larger ones are reduced one by one

_CACHED_LAYOUTS = 8  # one per distinct set of gradients (optimizer, sharding)


@dataclass(frozen=True)
class SegmentGroup:
    """Gradients reduced together: one flat tensor of one device and dtype, a segment per gradient.

    ``positions`` are the gradients' positions in the step's list (``index``: the same, on the device);
    ``segment_ids`` (the segment of each flat element) is None for a single large gradient, which is reduced
    whole, with no copy.
    """

    positions: tuple[int, ...]
    index: Tensor
    lengths: Tensor
    counts: Tensor  # float64 numbers of elements
    segment_ids: Tensor | None

    def spread(self, values: Tensor) -> Tensor:
        """Per-segment ``values`` repeated over each segment's elements (broadcastable against the flat tensor)."""
        return values if self.segment_ids is None else values.index_select(0, self.segment_ids)

    def sum(self, values: Tensor) -> Tensor:
        """Per-segment sums of the flat ``values`` (0 for an empty segment)."""
        if self.segment_ids is None:
            return values.sum().reshape(1)
        return torch.segment_reduce(values, "sum", lengths=self.lengths, unsafe=True)

    def extreme(self, values: Tensor, reduce: str) -> Tensor:
        """Per-segment ``"amin"`` or ``"amax"`` of the flat ``values`` (NaN if a NaN is there; ±inf if empty)."""
        if self.segment_ids is None:
            return getattr(torch, reduce)(values).reshape(1)
        initial = torch.inf if reduce == "amin" else -torch.inf
        out = torch.full((len(self.positions),), initial, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.segment_ids, values, reduce)


@functools.lru_cache(maxsize=_CACHED_LAYOUTS)
def _layout(shapes: tuple[tuple[int, torch.dtype, torch.device], ...]) -> tuple[SegmentGroup, ...]:
    """The groups for gradients of these ``(numel, dtype, device)``: made once per distinct set of gradients."""
    small: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    groups = []
    for position, (numel, dtype, device) in enumerate(shapes):
        if numel >= SEGMENT_LIMIT:
            groups.append(_group((position,), [numel], device, segmented=False))
        else:
            small.setdefault((dtype, device), []).append(position)
    for (_, device), positions in small.items():
        groups.append(_group(tuple(positions), [shapes[p][0] for p in positions], device, segmented=True))
    return tuple(groups)


def _group(positions: tuple[int, ...], lengths: list[int], device: torch.device, segmented: bool) -> SegmentGroup:
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64, device=device)
    ids = None
    if segmented:
        ids = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), lengths_tensor, output_size=sum(lengths)
        )
    return SegmentGroup(
        positions,
        torch.tensor(positions, dtype=torch.int64, device=device),
        lengths_tensor,
        lengths_tensor.to(torch.float64),
        ids,
    )


class GradientSegments:
    """A step's gradients as a few flat tensors with segments, shared by the moments and the histograms.

    Building it concatenates the gradients under :data:`SEGMENT_LIMIT` elements (one copy of them); the
    layout (segment of each element) is cached per distinct set of gradient sizes, dtypes and devices.

    >>> segments = GradientSegments([torch.tensor([1.0, 3.0]), torch.tensor([[2.0]])])
    >>> segments.moments(torch.float64)[:, :3].tolist()  # count, mean, sum of squared deviations
    [[2.0, 2.0, 2.0], [1.0, 2.0, 0.0]]
    """

    def __init__(self, grads: Sequence[Tensor]) -> None:
        self.size = len(grads)
        self.device = grads[0].device
        self.groups = _layout(tuple((grad.numel(), grad.dtype, grad.device) for grad in grads))
        self.flats = [_flatten(grads, group) for group in self.groups]

    def __iter__(self) -> Iterator[tuple[SegmentGroup, Tensor]]:
        return iter(zip(self.groups, self.flats, strict=True))

    def moments(self, dtype: torch.dtype) -> Tensor:
        """Per-gradient ``[count, mean, m2, min, max]`` as ``(len(grads), 5)`` of ``dtype`` (:func:`local_moments`)."""
        rows = torch.empty(self.size, 5, dtype=torch.float64, device=self.device)
        for group, flat in self:
            block = _whole_moments(flat) if group.segment_ids is None else _segment_moments(group, flat)
            rows.index_copy_(0, group.index.to(self.device), block.reshape(-1, 5).to(self.device))
        return rows.to(dtype)


def _segment_moments(group: SegmentGroup, flat: Tensor) -> Tensor:
    """``(segments, 5)`` moments of a flat group, in float64."""
    values = flat.to(torch.float64)
    mean = torch.where(group.counts > 0, group.sum(values) / group.counts, 0.0)
    m2 = group.sum((values - group.spread(mean)).square_())
    return torch.stack([group.counts, mean, m2, group.extreme(values, "amin"), group.extreme(values, "amax")], 1)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a large gradient is reduced in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_blocks(flat: Tensor, shift: Tensor | None = None) -> Iterator[Tensor]:
    """The consecutive blocks of one large flat gradient, each written in :func:`reduction_dtype` into one reused
    scratch buffer (a block is valid until the next is taken, and may be changed in place); ``shift`` (one
    number, in the reduction dtype), when given, is subtracted on the way (one pass instead of a copy and a
    subtraction).

    Blocks are 2**18 elements on a CPU, where a float32 block (1 MiB) stays in cache between the passes over
    it, and a temporary the size of the gradient would be fresh memory every step, whose page faults cost
    more than the arithmetic; 2**22 on accelerators, where blocks only bound the scratch memory.
    """
    size = 1 << 18 if flat.device.type == "cpu" else 1 << 22
    scratch = torch.empty(min(size, len(flat)), dtype=reduction_dtype(flat.dtype), device=flat.device)
    # A one-element (not 0-d) shift makes a 16-bit block subtract in the scratch's float32, not in its own dtype.
    shift = None if shift is None else shift.to(scratch.dtype).reshape(1)
    for part in flat.split(len(scratch)):
        block = scratch[: len(part)]
        yield block.copy_(part) if shift is None else torch.sub(part, shift, out=block)


def _whole_moments(flat: Tensor) -> Tensor:
    """The ``[count, mean, m2, min, max]`` of one large gradient (float64), reduced in :func:`reduction_dtype`.

    The deviations ``d`` from the float32 mean ``shift`` are taken block by block; the sum of ``d`` corrects
    the mean, and ``m2 = sum(d**2) - sum(d)**2 / n`` cancels nothing, ``d`` having about zero mean.
    """
    count = flat.numel()
    shift = flat.sum(dtype=reduction_dtype(flat.dtype)) / count
    first = torch.zeros((), dtype=torch.float64, device=flat.device)
    squares = torch.zeros_like(first)
    for deviations in reduction_blocks(flat, shift):
        first += deviations.sum()
        squares += deviations.square_().sum()
    # A non-finite shift (an inf or NaN element) is the mean var_mean gives; the correction would be NaN.
    mean = torch.where(shift.isfinite(), shift + first / count, shift.double())
    low, high = torch.aminmax(flat)
    numbers = [torch.full_like(first, count), mean, squares - first.square() / count, low.double(), high.double()]
    return torch.stack(numbers)


def _flatten(grads: Sequence[Tensor], group: SegmentGroup) -> Tensor:
    if group.segment_ids is None:
        return grads[group.positions[0]].detach().reshape(-1)
    # torch's C++ concatenation of flattened tensors (what DDP's bucketing uses): no Python loop per gradient.
    # no_grad instead of a detach() per gradient: a gradient made with create_graph=True requires grad.
    with torch.no_grad():
        return torch._C._nn.flatten_dense_tensors([grads[p] for p in group.positions])


def local_moments(grads: Sequence[Tensor] | GradientSegments, dtype: torch.dtype) -> Tensor:
    """Per-gradient ``[count, mean, m2, min, max]`` (``m2``: sum of squared deviations) as ``(len(grads), 5)``.

    Moments of shards combine exactly with :func:`combine_moments`; an empty shard is ``[0, 0, 0, inf, -inf]``.
    A NaN gives NaN moments, an infinite element an infinite mean and NaN ``m2`` (as ``torch.var_mean``).
    """
    segments = grads if isinstance(grads, GradientSegments) else GradientSegments(grads)
    return segments.moments(dtype)


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
