"""autoclip_fn on plain tensors, against the paper's Algorithm 1 written out with np.percentile."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch

from lightning_optloss import AutoClipping, autoclip_fn
from lightning_optloss.common.tags import AUTOCLIP_THRESHOLD as THRESHOLD_TAG

# torch.nanquantile interpolates in float32 (the buffer's dtype): its weight (q * (n - 1)) % 1 is a float32,
# so a threshold between far-apart norms is a few float32 ulps off np.percentile's float64.
RTOL = 5e-6
NORMS = [1.0, 4.0, 2.0, 0.5, 30.0, 3.0, 3.0, 0.0, 7.0, 1.5, 2.5, 100.0, 0.2, 5.0]


def autoclip_reference(norms: list[float], percentile: float, history: int | None = None) -> tuple[list, list]:
    """Algorithm 1 of Seetharaman et al. 2020: append the norm, take the percentile, clip (float64).

    ``history=None`` keeps every norm, as the paper; otherwise the last ``history``.
    """
    seen: list[float] = []
    thresholds, factors = [], []
    for norm in norms:
        if math.isfinite(norm):
            seen.append(norm)
        kept = seen if history is None else seen[-history:]
        threshold = float(np.percentile(kept, percentile))
        thresholds.append(threshold)
        factors.append(threshold / norm if norm > threshold else 1.0)
    return thresholds, factors


def _pairs(norm: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two gradients whose global norm is ``norm``."""
    return [
        (torch.tensor([3.0, 0.0]) * (norm / 5.0), torch.zeros(2)),
        (torch.tensor([[0.0, 4.0]]) * (norm / 5.0), torch.zeros(1, 2)),
    ]


def _run(clip: AutoClipping, norms: list[float], use_global_norm: bool = False) -> tuple[list, list]:
    thresholds, factors = [], []
    for norm in norms:
        pairs = _pairs(norm)
        before = [grad.clone() for grad, _ in pairs]
        clip(pairs, global_norm=torch.tensor(norm)) if use_global_norm else clip(pairs)
        ratio = [
            float(grad.norm() / original.norm()) if original.norm() > 0 else 1.0
            for (grad, _), original in zip(pairs, before, strict=True)
        ]
        assert ratio[0] == pytest.approx(ratio[1], rel=1e-6)  # one factor for every gradient
        factors.append(ratio[0])
        thresholds.append(float(clip.summaries()[THRESHOLD_TAG]))
    return thresholds, factors


@pytest.mark.parametrize("percentile", [0, 10, 25, 50, 90, 100, 33.3])
def test_matches_np_percentile_of_the_whole_history_while_it_fits(percentile):
    clip = autoclip_fn(percentile=percentile, history=100)
    thresholds, factors = _run(clip, NORMS)
    expected_thresholds, expected_factors = autoclip_reference(NORMS, percentile)
    np.testing.assert_allclose(thresholds, expected_thresholds, rtol=RTOL)
    np.testing.assert_allclose(factors, expected_factors, rtol=2 * RTOL)


@pytest.mark.parametrize("history", [1, 3, 5])
def test_keeps_only_the_last_history_norms_beyond_the_buffer(history):
    clip = autoclip_fn(percentile=25, history=history)
    thresholds, factors = _run(clip, NORMS)
    expected_thresholds, expected_factors = autoclip_reference(NORMS, 25, history=history)
    np.testing.assert_allclose(thresholds, expected_thresholds, rtol=RTOL)
    np.testing.assert_allclose(factors, expected_factors, rtol=2 * RTOL)
    assert int(clip.count) == len(NORMS)


def test_history_one_never_clips():
    # The current norm is in the history before the percentile is taken (Algorithm 1).
    _, factors = _run(autoclip_fn(percentile=0, history=1), NORMS)
    assert factors == [1.0] * len(NORMS)


def test_first_call_never_clips():
    _, factors = _run(autoclip_fn(percentile=0), [1e6])
    assert factors == [1.0]


def test_the_given_global_norm_is_used():
    clip = autoclip_fn(percentile=50)
    _run(clip, [1.0, 1.0])
    pairs = _pairs(1.0)
    clip(pairs, global_norm=torch.tensor(10.0))  # history [1, 1, 10]: median 1, factor 1 / 10
    assert float(clip.summaries()[THRESHOLD_TAG]) == 1.0
    torch.testing.assert_close(pairs[0][0], torch.tensor([0.06, 0.0]))
    _, factors = _run(autoclip_fn(percentile=10), NORMS, use_global_norm=True)
    np.testing.assert_allclose(factors, autoclip_reference(NORMS, 10)[1], rtol=2 * RTOL)


def test_non_finite_norms_are_not_appended_and_their_gradients_become_nan():
    clip = autoclip_fn(percentile=50, history=4)
    _run(clip, [1.0, 2.0, 3.0])
    norms, count = clip.norms.clone(), clip.count.clone()
    pairs = _pairs(1.0)
    pairs[0][0][0] = math.inf
    clip(pairs)
    assert torch.equal(clip.norms.nan_to_num(-1), norms.nan_to_num(-1)) and torch.equal(clip.count, count)
    assert all(torch.isnan(grad).all() for grad, _ in pairs)  # as tf.clip_by_global_norm
    thresholds, factors = _run(clip, [4.0, 8.0])
    expected_thresholds, expected_factors = autoclip_reference([1.0, 2.0, 3.0, math.inf, 4.0, 8.0], 50, history=4)
    np.testing.assert_allclose(thresholds, expected_thresholds[-2:], rtol=RTOL)
    np.testing.assert_allclose(factors, expected_factors[-2:], rtol=2 * RTOL)


def test_zero_norms_do_not_make_nan():
    clip = autoclip_fn(percentile=10)
    pairs = [(torch.zeros(3), torch.zeros(3))]
    clip(pairs)
    clip(pairs)
    assert torch.equal(pairs[0][0], torch.zeros(3))


def test_float64_gradients_keep_their_dtype():
    clip = autoclip_fn(percentile=0)
    _run(clip, [1.0])
    grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    clip([(grad, torch.zeros(2, dtype=torch.float64))])
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_none_gradients_pass_through():
    clip = autoclip_fn()
    param = torch.zeros(2)
    out = clip([(None, param)])
    assert out[0][0] is None and out[0][1] is param
    assert clip.summaries() == {} and int(clip.count) == 0


# ------------------------------------------------------------------ state, pickling


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("split", [3, 9])  # before and after the ring buffer (history 5) wraps
def test_state_dict_round_trips_through_weights_only_load_into_a_fresh_instance(split):
    clip = autoclip_fn(percentile=30, history=5)
    _run(clip, NORMS[:split])
    restored = autoclip_fn(percentile=30, history=5)
    restored.load_state_dict(_round_trip(clip.state_dict()))
    assert _run(restored, NORMS[split:]) == _run(clip, NORMS[split:])


def test_state_dict_is_a_snapshot():
    clip = autoclip_fn(history=3)
    _run(clip, [1.0])
    state = clip.state_dict()
    _run(clip, [2.0, 3.0])
    assert int(state["count"]) == 1 and torch.isnan(state["norms"][1:]).all()
    assert set(state) == {"norms", "count"}
    assert state["norms"].dtype == torch.float32 and state["count"].dtype == torch.int64


def test_loading_state_does_not_alias_the_given_tensors():
    clip = autoclip_fn(history=3)
    state = autoclip_fn(history=3).state_dict()
    clip.load_state_dict(state)
    _run(clip, [1.0])
    assert int(state["count"]) == 0 and torch.isnan(state["norms"]).all()


def test_loading_a_history_of_another_size_is_an_error():
    state = autoclip_fn(history=4).state_dict()
    with pytest.raises(ValueError, match=r"autoclip_fn: the saved history has shape \(4,\).*history=5"):
        autoclip_fn(history=5).load_state_dict(state)


def test_pickles_with_its_history():
    clip = autoclip_fn(percentile=20, history=4)
    _run(clip, NORMS[:6])
    restored = pickle.loads(pickle.dumps(clip))
    assert isinstance(restored, AutoClipping)
    assert _run(restored, NORMS[6:]) == _run(clip, NORMS[6:])


def test_repr_shows_the_configuration():
    assert repr(autoclip_fn(25, 50)) == "autoclip_fn(percentile=25.0, history=50)"


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("percentile", -1),
        ("percentile", 100.5),
        ("percentile", math.nan),
        ("percentile", "10"),
        ("percentile", True),
        ("percentile", None),
        ("history", 0),
        ("history", -5),
        ("history", 1.5),
        ("history", 1000.0),
        ("history", True),
        ("history", "1000"),
    ],
)
def test_invalid_arguments_are_rejected_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        autoclip_fn(**{argument: value})
    assert str(error.value).startswith("autoclip_fn: ")
    assert repr(value) in str(error.value)
