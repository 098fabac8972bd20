"""Gradient histograms computed on the device, without a host synchronisation.

TF's ``gradients`` summary wrote a histogram per variable. MLflow has no histogram type, so
lightning_optloss keeps TF's statistics as metrics and also counts each gradient into a fixed number of
equal bins over ``[min, max]`` of that step's gradient. :func:`histogram_table` does it with fixed-size
tensors only (segment minima and maxima, arithmetic, ``index_add_``): no ``torch.histc`` with tensor bounds and no
``bincount`` on accelerators (both read a value back to size their work), so the table rides along in the one
device-to-host copy of a logged step, and :class:`Histogram` turns the copied numbers into edges and counts.
On a CPU, where such a read costs nothing, a large gradient's bins are counted with ``bincount``.

Artifact format (``optimize_loss/histograms/gradients.jsonl``): one JSON object per line, one line per
logged step and parameter, in step order::

    {"step": 0, "param": "features.0.weight", "edges": [31 floats], "counts": [30 ints]}

``edges`` are ascending, from the gradient's minimum to its maximum (``bins + 1`` of them, all equal to the
value when every element is); ``counts[i]`` counts the elements in ``[edges[i], edges[i + 1])``, the last bin
closed, and the counts sum to the parameter's number of elements. Edges are written with 9 significant
digits (float32 values exactly); bins are assigned in float32 (float64 for float64 gradients), so an element
within rounding of an edge may be counted in the neighbouring bin. A non-finite gradient gives ``null``
edges (its counts still sum to the number of elements).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_optloss.gradients.statistics import (
    GradientSegments,
    SegmentGroup,
    reduction_blocks,
    reduction_dtype,
)

HISTOGRAM_BINS = 30


def histogram_table(
    grads: Sequence[Tensor] | GradientSegments, bins: int = HISTOGRAM_BINS, bounds: Tensor | None = None
) -> Tensor:
    """Per gradient, ``[min, max, count_0, ..., count_{bins-1}]``: a ``(len(grads), bins + 2)`` float64 tensor.

    ``bounds`` (``(len(grads), 2)``: min and max per gradient), when given, replaces each gradient's own
    range: the shards of a sharded gradient then bin over the full gradient's range, and their counts add up.
    ``grads`` may be the :class:`~lightning_optloss.gradients.statistics.GradientSegments` the moments were
    taken from (no second concatenation).

    Computed on the gradients' device with no host synchronisation, in a few kernels for all gradients: the
    bin of each element of a flat group (segment ``s``: bin ``s * bins + b``) is counted with one
    ``index_add_`` (a large gradient on a CPU: ``bincount`` of uint8 bins, up to 256 bins). Peak extra memory
    is about 12 bytes per element of the flat group (the gradients under
    :data:`~lightning_optloss.gradients.statistics.SEGMENT_LIMIT` elements together); a larger gradient is
    binned block by block (:func:`~lightning_optloss.gradients.statistics.reduction_blocks`).

    >>> histogram_table([torch.tensor([0.0, 1.0, 1.0, 4.0])], bins=2).tolist()
    [[0.0, 4.0, 3.0, 1.0]]
    """
    if bins < 1:
        raise ValueError(f"histogram_table: `bins` must be an integer >= 1; got {bins!r}.")
    segments = grads if isinstance(grads, GradientSegments) else GradientSegments(grads)
    table = torch.empty(segments.size, bins + 2, dtype=torch.float64, device=segments.device)
    for group, flat in segments:
        table.index_copy_(0, group.index.to(segments.device), _group_histograms(group, flat, bins, bounds))
    return table


def _group_histograms(group: SegmentGroup, flat: Tensor, bins: int, bounds: Tensor | None) -> Tensor:
    """The rows of :func:`histogram_table` for one group of gradients."""
    dtype = reduction_dtype(flat.dtype)
    values = None if group.segment_ids is None else flat.to(dtype)  # a large gradient is binned block by block
    if bounds is not None:
        low, high = bounds.to(flat.device, dtype).index_select(0, group.index).unbind(1)
    elif values is None:
        low, high = (extreme.to(dtype).reshape(1) for extreme in torch.aminmax(flat))
    else:
        low, high = group.extreme(values, "amin"), group.extreme(values, "amax")
    width = (high - low) / bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    if values is None:
        counts = _whole_histogram(flat, bins, low, width)
    else:
        index = _bin_positions_((values - group.spread(low)) / group.spread(width), bins).to(torch.int64)
        index.add_(group.segment_ids, alpha=bins)
        one = torch.ones((), dtype=torch.int64, device=flat.device)
        counts = torch.zeros(len(group.positions) * bins, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, index, one.expand(len(index)))
    edges = torch.stack([low, high], 1).to(torch.float64)
    return torch.cat([edges, counts.view(-1, bins).to(torch.float64)], 1).to(flat.device)


def _bin_positions_(position: Tensor, bins: int) -> Tensor:
    """``(value - low) / width`` made a bin position in place: NaN and -inf to bin 0, +inf and the maximum (which
    may round to ``bins``) to the last bin."""
    return position.nan_to_num_(0.0, posinf=bins - 1, neginf=0.0).clamp_(0, bins - 1)


def _whole_histogram(flat: Tensor, bins: int, low: Tensor, width: Tensor) -> Tensor:
    """The ``bins`` int64 counts of one large gradient, block by block (the same arithmetic as a flat group)."""
    counts = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    # On a CPU, bincount of uint8 bins counts 3-4x faster than index_add_ of int64 ones; it reads its largest
    # bin back, a host read that only a CPU gets for free. float32 -> int16 -> uint8 takes a quarter of the
    # time of a direct float32 -> uint8 conversion (torch does not vectorise the latter).
    by_bincount = flat.device.type == "cpu" and bins <= 256
    for block in reduction_blocks(flat, low):
        position = _bin_positions_(block.div_(width), bins)
        if by_bincount:
            counts += torch.bincount(position.to(torch.int16).to(torch.uint8), minlength=bins)
        else:
            counts.index_add_(0, position.to(torch.int64), torch.ones_like(counts[0]).expand(len(block)))
    return counts


@dataclass(frozen=True)
class Histogram:
    """One parameter's gradient histogram at one step, on the host."""

    param: str
    edges: list[float | None]
    counts: list[int]

    @classmethod
    def from_row(cls, param: str, row: Sequence[float]) -> Histogram:
        """Build from a row of :func:`histogram_table` copied to the host."""
        low, high, *counts = row
        bins = len(counts)
        if math.isfinite(low) and math.isfinite(high):
            exact = [low + (high - low) * i / bins for i in range(bins)] + [high]
            edges: list[float | None] = [float(f"{edge:.9g}") for edge in exact]
        else:
            edges = [None] * (bins + 1)
        return cls(param, edges, [int(count) for count in counts])

    def to_json(self, step: int) -> str:
        """The artifact line (without the newline) for this histogram at ``step``."""
        return json.dumps({"step": step, "param": self.param, "edges": self.edges, "counts": self.counts})
