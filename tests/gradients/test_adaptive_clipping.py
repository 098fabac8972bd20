"""adaptive_clipping_fn on plain tensors, against TF's formulas written out in NumPy float32."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lightning_optloss import adaptive_clipping_fn
from lightning_optloss.common.tags import ADAPTIVE_MAX_NORM as MAX_NORM_TAG

F = np.float32


def tf_adaptive_factors(norms, std_factor=2.0, decay=0.95, static_max_norm=None, step_aware=False, eps=1e-8):
    """TF's _adaptive_max_norm and adaptive_clipping_fn, step by step, in float32."""
    mean, sq_mean = F(0.0), F(0.0)
    factors, max_norms = [], []
    for step, norm in enumerate(norms):
        norm = F(norm)
        log_norm = F(np.log(norm + F(eps)))
        d = F(decay)
        one_minus = F(1.0 - decay)
        if step_aware:
            d = min(d, F(step) / (F(step) + F(1.0)))
            one_minus = F(1.0) - d
        mean = F(mean - (mean - log_norm) * one_minus)
        sq_mean = F(sq_mean - (sq_mean - log_norm * log_norm) * one_minus)
        std = F(np.sqrt(max(F(eps), F(sq_mean - mean * mean))))
        max_norm = F(np.exp(mean + F(std_factor) * std))
        factor = F(1.0) if norm < max_norm else F(np.exp(mean) / norm)
        if static_max_norm is not None:
            factor = min(F(static_max_norm) / norm, factor)
        factors.append(factor)
        max_norms.append(max_norm)
    return factors, max_norms


def _pairs(norm: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two gradients whose global norm is ``norm``."""
    a = torch.tensor([3.0, 0.0]) * (norm / 5.0)
    b = torch.tensor([[0.0, 4.0]]) * (norm / 5.0)
    return [(a, torch.zeros(2)), (b, torch.zeros(1, 2))]


NORMS = [1.0, 2.0, 50.0, 1.5, 0.7, 300.0, 2.2, 2.0, 1e-3, 8.0, 8.0, 9.0]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"global_step": True},
        {"std_factor": 1.0, "decay": 0.9, "global_step": True},
        {"static_max_norm": 0.5, "global_step": True},
        {"static_max_norm": 3.0},
    ],
    ids=["fixed-decay", "step-aware", "std1-decay0.9", "static-step-aware", "static-fixed"],
)
def test_factors_and_max_norms_match_tf_formulas(options):
    clip = adaptive_clipping_fn(report_summary=True, **options)
    expected, expected_max = tf_adaptive_factors(
        NORMS,
        std_factor=options.get("std_factor", 2.0),
        decay=options.get("decay", 0.95),
        static_max_norm=options.get("static_max_norm"),
        step_aware=options.get("global_step") is not None,
    )
    for step, norm in enumerate(NORMS):
        pairs = _pairs(norm)
        before = [g.clone() for g, _ in pairs]
        out = clip(pairs, global_step=step)
        factor = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g, _ in out]))) / norm
        assert factor == pytest.approx(float(expected[step]), rel=1e-5), step
        for (grad, _), original in zip(out, before, strict=True):
            torch.testing.assert_close(grad, original * float(expected[step]), rtol=1e-5, atol=1e-8)
        assert float(clip.summaries()[MAX_NORM_TAG]) == pytest.approx(float(expected_max[step]), rel=1e-5)


def test_clipping_happens_for_an_outlier_norm():
    clip = adaptive_clipping_fn(global_step=True)
    for step in range(10):
        clip(_pairs(1.0), global_step=step)
    out = clip(_pairs(100.0), global_step=10)
    clipped = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g, _ in out])))
    # Rescaled to exp(mean), where the mean already includes the outlier's log with weight 1 - 10/11.
    assert clipped == pytest.approx(math.exp(math.log(100.0) / 11), rel=1e-4)


def test_given_global_norm_is_used_instead_of_recomputing():
    clip = adaptive_clipping_fn()
    pairs = _pairs(1.0)
    clip(pairs, global_norm=torch.tensor(10.0))
    expected, _ = tf_adaptive_factors([10.0])
    assert float(pairs[0][0][0]) == pytest.approx(0.6 * float(expected[0]), rel=1e-5)


def test_non_finite_norm_leaves_the_moving_averages_unchanged():
    clip = adaptive_clipping_fn()
    clip(_pairs(2.0))
    mean, sq_mean = clip.mean.clone(), clip.sq_mean.clone()
    pairs = _pairs(1.0)
    pairs[0][0][0] = math.inf
    clip(pairs)
    assert torch.equal(clip.mean, mean) and torch.equal(clip.sq_mean, sq_mean)
    clip(_pairs(2.0))
    assert math.isfinite(float(clip.mean))


def test_state_dict_round_trips_through_weights_only_load():
    clip = adaptive_clipping_fn(global_step=True)
    for step, norm in enumerate(NORMS[:5]):
        clip(_pairs(norm), global_step=step)
    buffer = io.BytesIO()
    torch.save(clip.state_dict(), buffer)
    buffer.seek(0)
    restored = adaptive_clipping_fn(global_step=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for step, norm in enumerate(NORMS[5:], start=5):
        a, b = clip(_pairs(norm), global_step=step), restored(_pairs(norm), global_step=step)
        for (ga, _), (gb, _) in zip(a, b, strict=True):
            assert torch.equal(ga, gb)


def test_step_aware_clip_needs_the_global_step():
    clip = adaptive_clipping_fn(global_step=True)
    with pytest.raises(ValueError, match="global_step"):
        clip(_pairs(1.0))


def test_no_summary_without_report_summary():
    clip = adaptive_clipping_fn()
    clip(_pairs(1.0))
    assert clip.summaries() == {}


def test_repr_shows_the_configuration():
    assert "static_max_norm=0.5" in repr(adaptive_clipping_fn(static_max_norm=0.5))


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("std_factor", -1.0),
        ("std_factor", "2"),
        ("decay", 1.0),
        ("decay", -0.1),
        ("decay", math.nan),
        ("static_max_norm", 0.0),
        ("static_max_norm", -2.0),
        ("global_step", False),
        ("report_summary", 1),
        ("epsilon", 0.0),
        ("name", 3),
    ],
)
def test_invalid_arguments_are_rejected_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        adaptive_clipping_fn(**{argument: value})
    assert "adaptive_clipping_fn" in str(error.value)
    assert repr(value) in str(error.value) or str(value) in str(error.value)
