"""Gradient histograms computed on the device, without a host synchronisation.

TF's ``gradients`` summary wrote a histogram per variable. MLflow has no histogram type, so
lightning_optloss keeps TF's statistics as metrics and also counts each gradient into a fixed number of
equal bins over ``[min, max]`` of that step's gradient. :func:`histogram_table` does it with fixed-size
tensors only (``aminmax``, arithmetic, ``index_add_``): no ``torch.histc`` with tensor bounds and no
``bincount`` (both read a value back to size their work), so the table rides along in the one
device-to-host copy of a logged step, and :class:`Histogram` turns the copied numbers into edges and counts.

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

HISTOGRAM_BINS = 30


def histogram_table(grads: Sequence[Tensor], bins: int = HISTOGRAM_BINS, bounds: Tensor | None = None) -> Tensor:
    """Per gradient, ``[min, max, count_0, ..., count_{bins-1}]``: a ``(len(grads), bins + 2)`` float64 tensor.

    ``bounds`` (``(len(grads), 2)``: min and max per gradient), when given, replaces each gradient's own
    range: the shards of a sharded gradient then bin over the full gradient's range, and their counts add up.

    Computed on the gradients' device with no host synchronisation. Peak extra memory is about 8 bytes per
    element of the largest gradient (its bin indices and positions), freed before the next gradient.

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.histograms import histogram_table
        >>> histogram_table([torch.tensor([0.0, 0.1, 0.2, 1.0])], bins=4)  # min, max, then 4 counts
        tensor([[0., 1., 3., 0., 0., 1.]], dtype=torch.float64)
    """
    if bins < 1:
        raise ValueError(f"histogram_table: `bins` must be an integer >= 1; got {bins!r}.")
    rows = []
    for position, grad in enumerate(grads):
        values = grad.detach().reshape(-1)
        if values.dtype != torch.float64:
            values = values.float()
        if bounds is None:
            low, high = torch.aminmax(values)
        else:
            low, high = bounds[position].to(values.device, values.dtype).unbind()
        width = (high - low) / bins
        position = (values - low) / torch.where(width > 0, width, torch.ones_like(width))
        index = position.nan_to_num_(0.0, posinf=bins - 1, neginf=0.0).clamp_(0, bins - 1).to(torch.int32)
        del position
        one = torch.ones((), dtype=torch.int64, device=values.device)
        counts = torch.zeros(bins, dtype=torch.int64, device=values.device).index_add_(0, index, one.expand(len(index)))
        rows.append(torch.cat([torch.stack([low, high]).to(torch.float64), counts.to(torch.float64)]))
    return torch.stack(rows)


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
