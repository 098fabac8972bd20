"""The segment kernels (all gradients' moments and histograms at once) against per-tensor references."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optloss.gradients import statistics
from lightning_optloss.gradients.histograms import histogram_table
from lightning_optloss.gradients.statistics import SEGMENT_LIMIT, GradientSegments

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _mixed_gradients(seed: int) -> list[torch.Tensor]:
    """Gradients of every dtype, 0-d, empty, small and above the segment limit, some with a large mean."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(), (0,), (3, 0), (1,), (7,), (32, 32), (5, 3, 2), (SEGMENT_LIMIT + 3,), (300,), (2, 2)]
    grads = []
    for position, shape in enumerate(shapes * 2):
        dtype = DTYPES[position % len(DTYPES)]
        offset = 1e3 if position % 3 == 0 else 0.0  # a mean far above the spread: sums of squares would cancel
        scale = 10.0 ** (position % 5 - 2)
        grads.append((torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype))
    return grads


def _reference_moments(grad: torch.Tensor) -> list[float]:
    values = grad.reshape(-1).double()
    if values.numel() == 0:
        return [0.0, 0.0, 0.0, math.inf, -math.inf]
    variance, mean = torch.var_mean(values, correction=0)
    return [values.numel(), float(mean), float(variance) * values.numel(), float(values.min()), float(values.max())]


def _reference_histogram(grad: torch.Tensor, bins: int, low: float, high: float) -> list[float]:
    """One tensor at a time, in the dtype the table bins in (float32, float64 for float64 gradients)."""
    values = grad.reshape(-1)
    values = values if values.dtype == torch.float64 else values.float()
    low_t, high_t = torch.tensor(low, dtype=values.dtype), torch.tensor(high, dtype=values.dtype)
    width = (high_t - low_t) / bins
    position = (values - low_t) / (width if width > 0 else torch.ones_like(width))
    index = position.nan_to_num(0.0, posinf=bins - 1, neginf=0.0).clamp(0, bins - 1).long()
    counts = torch.bincount(index, minlength=bins)
    return [float(low_t), float(high_t), *counts.double().tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moments_equal_the_per_tensor_float64_reference(seed):
    grads = _mixed_gradients(seed)
    moments = statistics.local_moments(grads, torch.float64)
    expected = torch.tensor([_reference_moments(grad) for grad in grads], dtype=torch.float64)
    torch.testing.assert_close(moments[:, [0, 3, 4]], expected[:, [0, 3, 4]], rtol=0, atol=0)  # exact
    _assert_mean_and_m2_close(moments, expected, grads)


def _assert_mean_and_m2_close(moments: torch.Tensor, expected: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Flat groups are reduced in float64 (mean to 1e-12, m2 to 1e-9); a gradient above the segment limit in
    its own precision (float32 for 16- and 32-bit floats): its mean within 1e-7 of its spread, m2 to 1e-6."""
    large = torch.tensor([grad.numel() >= SEGMENT_LIMIT and grad.dtype != torch.float64 for grad in grads])
    assert large.any() and (~large).any()
    spread = (expected[:, 2] / expected[:, 0].clamp(min=1)).sqrt()
    torch.testing.assert_close(moments[~large, 1], expected[~large, 1], rtol=1e-12, atol=0)
    torch.testing.assert_close(moments[~large, 2], expected[~large, 2], rtol=1e-9, atol=1e-300)
    assert ((moments[large, 1] - expected[large, 1]).abs() <= 1e-7 * spread[large]).all()
    torch.testing.assert_close(moments[large, 2], expected[large, 2], rtol=1e-6, atol=0)


def test_float32_moments_are_the_float64_ones_rounded():
    grads = _mixed_gradients(3)
    moments = statistics.local_moments(grads, torch.float32)
    assert moments.dtype == torch.float32
    torch.testing.assert_close(moments, statistics.local_moments(grads, torch.float64).float(), rtol=0, atol=0)


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_moments_of_shards_combine_into_the_whole_gradients(parts):
    grads = _mixed_gradients(4)
    shards = [[grad.reshape(-1).tensor_split(parts)[i] for grad in grads] for i in range(parts)]
    combined = statistics.combine_moments(torch.stack([statistics.local_moments(s, torch.float64) for s in shards]))
    whole = statistics.local_moments(grads, torch.float64)
    nonempty = whole[:, 0] > 0
    torch.testing.assert_close(combined[nonempty][:, [0, 3, 4]], whole[nonempty][:, [0, 3, 4]], rtol=0, atol=0)
    _assert_mean_and_m2_close(combined[nonempty], whole[nonempty], [g for g in grads if g.numel()])
    assert combined[~nonempty, 0].eq(0).all() and combined[~nonempty, 3:].isinf().all()


def test_non_finite_gradients_give_what_var_mean_and_aminmax_give():
    grads = [torch.tensor([1.0, math.nan, 2.0]), torch.tensor([1.0, math.inf]), torch.tensor([3.0, 4.0])]
    moments = statistics.local_moments(grads, torch.float32)
    assert moments[0, 1:].isnan().all()
    assert moments[1, 1] == math.inf and moments[1, 2].isnan() and moments[1, 4] == math.inf
    assert moments[2].tolist() == [2.0, 3.5, 0.5, 3.0, 4.0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bins", [1, 7, 30, 256, 257])  # up to 256 bins a large gradient is a CPU bincount
def test_histograms_equal_the_per_tensor_reference(seed, bins):
    grads = [grad for grad in _mixed_gradients(seed) if grad.numel()]
    table = histogram_table(grads, bins)
    for row, grad in zip(table.tolist(), grads, strict=True):
        values = grad.reshape(-1).float() if grad.dtype != torch.float64 else grad.reshape(-1)
        assert row == _reference_histogram(grad, bins, float(values.min()), float(values.max()))


def test_histograms_of_shards_over_the_whole_range_add_up_to_the_whole_histograms():
    grads = _mixed_gradients(5)
    segments = GradientSegments(grads)
    bounds = segments.moments(torch.float32)[:, 3:5]
    whole = histogram_table(segments, bounds=bounds)
    shards = [[grad.reshape(-1).tensor_split(3)[i] for grad in grads] for i in range(3)]
    counts = sum(histogram_table(shard, bounds=bounds)[:, 2:] for shard in shards)
    torch.testing.assert_close(counts, whole[:, 2:], rtol=0, atol=0)
    sizes = torch.tensor([grad.numel() for grad in grads], dtype=torch.float64)
    torch.testing.assert_close(whole[:, 2:].sum(1), sizes, rtol=0, atol=0)
    assert whole[sizes == 0, 2:].eq(0).all()


def test_histograms_equal_torch_histc_where_edges_are_exact():
    # Integers over [0, 64] in 16 bins of width 4: every position is exact, so the bins are histc's.
    generator = torch.Generator().manual_seed(6)
    grads = [torch.randint(0, 65, (n,), generator=generator).float() for n in (50, 2, 1000, SEGMENT_LIMIT)]
    for grad in grads:
        grad[0], grad[-1] = 0.0, 64.0
    table = histogram_table(grads, bins=16)
    for row, grad in zip(table, grads, strict=True):
        assert row[:2].tolist() == [0.0, 64.0]
        assert row[2:].tolist() == torch.histc(grad, 16, 0.0, 64.0).tolist()


def test_the_segment_layout_is_reused_for_the_same_gradients():
    grads = _mixed_gradients(7)
    first, second = GradientSegments(grads), GradientSegments([grad.clone() for grad in grads])
    assert first.groups is second.groups
    assert sum(len(group.positions) for group in first.groups) == len(grads)
    assert {group.segment_ids is None for group in first.groups} == {True, False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_gradient_with_its_mean_far_above_its_spread_keeps_both(dtype):
    generator = torch.Generator().manual_seed(8)
    grads = [
        (torch.randn(SEGMENT_LIMIT * 4, generator=generator, dtype=torch.float64) * 1e-2 + 1e3).to(dtype),
        torch.randn(3, 5, generator=generator).to(dtype),
    ]
    moments = statistics.local_moments(grads, torch.float64)
    expected = torch.tensor([_reference_moments(grad) for grad in grads], dtype=torch.float64)
    torch.testing.assert_close(moments[:, [0, 3, 4]], expected[:, [0, 3, 4]], rtol=0, atol=0)
    _assert_mean_and_m2_close(moments, expected, grads)


def test_a_large_non_finite_gradient_gives_what_var_mean_and_aminmax_give():
    nan, inf = torch.zeros(SEGMENT_LIMIT), torch.zeros(SEGMENT_LIMIT)
    nan[5], inf[7] = math.nan, math.inf
    moments = statistics.local_moments([nan, inf], torch.float32)
    assert moments[0, 1:].isnan().all()
    assert moments[1, 1] == math.inf and moments[1, 2].isnan() and moments[1, 4] == math.inf and moments[1, 3] == 0


def test_gradients_that_require_grad_give_the_same_summaries_without_a_graph():
    # backward(create_graph=True) leaves gradients that require grad; their summaries must not build a graph.
    grads = [grad.float() for grad in _mixed_gradients(9) if grad.numel()]
    tracked = [grad.clone().requires_grad_() * 1.0 for grad in grads]
    moments, table = statistics.local_moments(tracked, torch.float64), histogram_table(tracked)
    assert not moments.requires_grad and not table.requires_grad
    assert torch.equal(moments, statistics.local_moments(grads, torch.float64))
    assert torch.equal(table, histogram_table(grads))
