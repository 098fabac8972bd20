"""Gradient histograms on the device (no host sync) and their trip through the one transfer of a record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss import add_transfer_hook
from lightning_optloss.gradients.histograms import HISTOGRAM_BINS, Histogram, histogram_table
from lightning_optloss.summaries import SummaryRecord


def _histogram(grad: torch.Tensor, bins: int = HISTOGRAM_BINS) -> Histogram:
    return Histogram.from_row("p", histogram_table([grad], bins)[0].tolist())


def test_counts_match_numpy_with_edges_from_min_to_max():
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    histogram = _histogram(grad, bins=10)
    expected_counts, expected_edges = np.histogram(grad.numpy(), bins=10)
    assert histogram.counts == expected_counts.tolist()
    np.testing.assert_allclose(histogram.edges, expected_edges, rtol=1e-6)
    assert histogram.edges[0] == pytest.approx(float(grad.min()), rel=1e-8)
    assert histogram.edges[-1] == pytest.approx(float(grad.max()), rel=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=200),
    st.integers(1, 40),
)
def test_counts_sum_to_the_number_of_elements_and_edges_ascend(values, bins):
    histogram = _histogram(torch.tensor(values, dtype=torch.float32), bins)
    assert sum(histogram.counts) == len(values)
    assert len(histogram.counts) == bins
    assert len(histogram.edges) == bins + 1
    assert histogram.edges == sorted(histogram.edges)
    assert histogram.edges[0] == pytest.approx(min(values), rel=1e-8, abs=1e-30)
    assert histogram.edges[-1] == pytest.approx(max(values), rel=1e-8, abs=1e-30)


def test_a_constant_gradient_is_one_full_bin():
    histogram = _histogram(torch.full((3, 4), 0.25))
    assert histogram.counts[0] == 12
    assert sum(histogram.counts) == 12
    assert set(histogram.edges) == {0.25}


def test_non_finite_gradients_give_null_edges_and_still_count_every_element():
    grad = torch.tensor([1.0, float("nan"), -2.0, float("inf")])
    histogram = _histogram(grad)
    assert histogram.edges == [None] * (HISTOGRAM_BINS + 1)
    assert sum(histogram.counts) == 4
    line = json.loads(histogram.to_json(7))
    assert line == {"step": 7, "param": "p", "edges": histogram.edges, "counts": histogram.counts}


def test_half_precision_and_multidimensional_gradients_are_counted():
    grads = [torch.randn(4, 5, 6).to(torch.bfloat16), torch.randn(3, dtype=torch.float64)]
    table = histogram_table(grads)
    assert table.shape == (2, HISTOGRAM_BINS + 2)
    assert table.dtype == torch.float64
    assert table[0, 2:].sum() == 120
    assert table[1, 2:].sum() == 3


def test_histograms_ride_in_the_single_transfer_of_the_record():
    transfers = []
    handle = add_transfer_hook(transfers.append)
    try:
        record = SummaryRecord(step=5, name="OptimizeLoss")
        record.add("loss", torch.tensor(0.5))
        record.add_rows(["a", "b"], torch.tensor([1.0, 2.0]))
        record.add_parameter_norms(["w", "b"], torch.tensor([3.0, 4.0]))
        grads = [torch.arange(10.0), torch.ones(3)]
        record.add_histograms(["w", "b"], histogram_table(grads, bins=5))
        summaries = record.resolve()
    finally:
        handle.remove()
    assert len(transfers) == 1
    assert summaries.metrics == {
        "OptimizeLoss/loss": 0.5,
        "OptimizeLoss/a": 1.0,
        "OptimizeLoss/b": 2.0,
        "OptimizeLoss/gradient_norm/w": 3.0,
        "OptimizeLoss/gradient_norm/b": 4.0,
    }
    assert summaries.scalars == {"loss": 0.5}
    assert summaries.parameter_norms == {"w": 3.0, "b": 4.0}
    assert summaries.nonfinite == {}
    first, second = summaries.histograms
    assert (first.param, first.counts, first.edges) == ("w", [2, 2, 2, 2, 2], [0.0, 1.8, 3.6, 5.4, 7.2, 9.0])
    assert (second.param, second.counts) == ("b", [3, 0, 0, 0, 0])


def test_bins_must_be_positive():
    with pytest.raises(ValueError, match="bins"):
        histogram_table([torch.ones(2)], bins=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_histogram_needs_no_host_synchronisation_on_cuda():
    grads = [torch.randn(1000, 37, device="cuda"), torch.randn(5, device="cuda", dtype=torch.float16)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        table = histogram_table(grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counts = table[:, 2:].sum(dim=1).cpu().tolist()
    assert counts == [37000.0, 5.0]
    expected, _ = np.histogram(grads[0].cpu().numpy(), bins=HISTOGRAM_BINS)
    assert np.abs(table[0, 2:].cpu().numpy() - expected).sum() <= 4  # float32 rounding at bin edges
