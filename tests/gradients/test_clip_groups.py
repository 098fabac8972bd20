"""Per-group clipping (clip_groups_by_global_norm_) and its name resolver, on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss.gradients import clipping
from lightning_optloss.gradients.norms import parameter_norms

NAMES = ["encoder.embed.weight", "encoder.layer1.weight", "encoder.layer1.bias", "head.weight", "head.bias", "scale"]


def _grads(seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4, 4), (4,), (3, 4), (3,), ()]
    return [torch.randn(shape, generator=generator) * scale for shape in shapes]


def _clip(grads, group_of, clip_norms):
    norms = parameter_norms(grads)
    return clipping.clip_groups_by_global_norm_(grads, group_of, clip_norms, norms)


def test_each_group_is_clipped_as_torch_clip_grad_norm_clips_it_alone():
    grads = _grads(scale=3.0)
    group_of = [0, 0, 0, 1, 1, -1]
    clip_norms = [2.0, 0.5]
    params = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    for group, clip_norm in enumerate(clip_norms):
        torch.nn.utils.clip_grad_norm_([params[i] for i, g in enumerate(group_of) if g == group], clip_norm)
    assert not torch.equal(params[0].grad, grads[0]) and not torch.equal(params[3].grad, grads[3])  # both clip
    _clip(grads, group_of, clip_norms)
    for grad, param in zip(grads, params, strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-7)


def test_returns_the_groups_norms_before_clipping_and_their_factors():
    grads = _grads(scale=3.0)
    group_of = [0, 0, 1, 1, 1, -1]
    before = [grad.clone() for grad in grads]
    group_norms, factors = _clip(grads, group_of, [1.0, 100.0])
    for group, clip_norm in enumerate([1.0, 100.0]):
        members = [before[i] for i, g in enumerate(group_of) if g == group]
        norm = float(torch.linalg.vector_norm(torch.cat([m.reshape(-1) for m in members])))
        assert float(group_norms[group]) == pytest.approx(norm, rel=1e-6)
        assert float(factors[group]) == pytest.approx(min(1.0, clip_norm / norm), rel=1e-6)
    assert factors[1] == 1.0  # under its clip norm: untouched
    for i in (2, 3, 4):
        assert torch.equal(grads[i], before[i])


def test_unclipped_gradients_are_untouched():
    grads = _grads(scale=100.0)
    before = [grad.clone() for grad in grads]
    _clip(grads, [-1, 0, -1, -1, 0, -1], [0.1])
    for i in (0, 2, 3, 5):
        assert torch.equal(grads[i], before[i])


def test_a_group_without_gradients_has_norm_zero_and_factor_one():
    grads = _grads()
    group_norms, factors = _clip(grads, [0] * 6, [1.0, 2.0])
    assert float(group_norms[1]) == 0.0 and float(factors[1]) == 1.0


def test_a_non_finite_group_is_nan_and_the_others_are_clipped_normally():
    grads = _grads(scale=10.0)
    grads[3][0, 0] = math.inf
    _clip(grads, [0, 0, 0, 1, 1, -1], [1.0, 1.0])
    assert torch.isnan(grads[3]).all() and torch.isnan(grads[4]).all()  # TF's clip_by_global_norm, per group
    clipped = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[:3]]))
    assert float(clipped) == pytest.approx(1.0, rel=1e-6)


def test_float64_norms_and_gradients():
    grads = [grad.double() for grad in _grads(scale=5.0)]
    _clip(grads, [0, 0, 1, 1, 1, 1], [1.0, 2.0])
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[2:]]))
    assert grads[0].dtype == torch.float64 and float(norm) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("group_of", [[0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, -2]])
def test_a_group_index_out_of_range_is_an_error(group_of):
    with pytest.raises(ValueError, match=r"`group_of\[5\]` must be -1 or a group index in \[0, 2\); got -?2"):
        _clip(_grads(), group_of, [1.0, 1.0])


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="got 6, 5 and 6"):
        _clip(_grads(), [0] * 5, [1.0])


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(-1, 2), min_size=6, max_size=6),
    clip_norms=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_every_group_ends_within_its_clip_norm(groups, clip_norms, scale, seed):
    grads = _grads(seed, scale)
    before = [grad.clone() for grad in grads]
    _, factors = _clip(grads, groups, clip_norms)
    for group, clip_norm in enumerate(clip_norms):
        members = [grads[i].reshape(-1) for i, g in enumerate(groups) if g == group]
        if members:
            assert float(torch.linalg.vector_norm(torch.cat(members))) <= clip_norm * (1 + 1e-5)
        assert float(factors[group]) <= 1.0 + 1e-6
    for i, g in enumerate(groups):
        if g == -1:
            assert torch.equal(grads[i], before[i])


# ------------------------------------------------------------------ resolve_clip_groups


def test_resolve_gives_each_name_its_first_matching_pattern_or_minus_one():
    patterns = {"encoder.layer1.*": 1.0, "encoder.*": 5.0, "*.bias": 0.5}
    assert clipping.resolve_clip_groups("OptimizeLoss", patterns, NAMES) == [1, 0, 0, -1, 2, -1]


def test_resolve_is_case_sensitive():
    with pytest.raises(ValueError, match=r"'Head\.\*', which matches no parameter name"):
        clipping.resolve_clip_groups("OptimizeLoss", {"Head.*": 1.0}, NAMES)


def test_a_pattern_that_matches_nothing_is_an_error_naming_close_names():
    with pytest.raises(ValueError) as error:
        clipping.resolve_clip_groups("OptimizeLoss", {"encoder.*": 1.0, "head.weigth": 2.0}, NAMES)
    message = str(error.value)
    assert message.startswith("OptimizeLoss: `clip_gradients` has the pattern 'head.weigth'")
    assert "close names: 'head.weight'" in message


def test_a_pattern_far_from_every_name_lists_the_names():
    with pytest.raises(ValueError, match=r"the names are 'encoder\.embed\.weight', 'encoder\.layer1\.weight'"):
        clipping.resolve_clip_groups("OptimizeLoss", {"zzz*": 1.0}, NAMES)


def test_a_pattern_shadowed_by_an_earlier_one_is_an_error():
    with pytest.raises(ValueError) as error:
        clipping.resolve_clip_groups("OptimizeLoss", {"encoder.*": 1.0, "encoder.layer1.*": 5.0}, NAMES)
    message = str(error.value)
    assert "'encoder.layer1.*', which matches only parameters that an earlier pattern takes" in message
    assert "'encoder.layer1.weight' goes to 'encoder.*'" in message


def test_the_argument_name_can_be_given():
    with pytest.raises(ValueError, match=r"^Owner: `clip_groups` has the pattern 'x'"):
        clipping.resolve_clip_groups("Owner", {"x": 1.0}, NAMES, argument="clip_groups")


@pytest.mark.parametrize(
    ("patterns", "shown"),
    [
        ({"encoder.*": 0.0}, "`clip_gradients['encoder.*']` must be a finite number > 0.0; got 0.0"),
        ({"encoder.*": -1.0}, "`clip_gradients['encoder.*']` must be a finite number > 0.0; got -1.0"),
        ({"encoder.*": math.nan}, "`clip_gradients['encoder.*']` must be a finite number > 0.0; got nan"),
        ({"encoder.*": "1"}, "`clip_gradients['encoder.*']` must be a finite number > 0.0; got '1'"),
        ({"encoder.*": True}, "`clip_gradients['encoder.*']` must be a finite number > 0.0; got True"),
        ({}, "`clip_gradients` must be a non-empty dict {parameter-name glob: clip norm > 0}; got {}"),
        ([("encoder.*", 1.0)], "`clip_gradients` must be a non-empty dict"),
        ({3: 1.0}, "(keys are non-empty strings); got 3"),
        ({"": 1.0}, "(keys are non-empty strings); got ''"),
    ],
)
def test_invalid_patterns_are_rejected_naming_the_pattern_and_value(patterns, shown):
    with pytest.raises(ValueError) as error:
        clipping.resolve_clip_groups("OptimizeLoss", patterns, NAMES)
    assert str(error.value).startswith("OptimizeLoss: ")
    assert shown in str(error.value)


def test_resolved_groups_feed_the_transform():
    patterns = {"encoder.*": 1.0, "head.*": 0.1}
    group_of = clipping.resolve_clip_groups("OptimizeLoss", patterns, NAMES)
    grads = _grads(scale=10.0)
    _clip(grads, group_of, list(patterns.values()))
    head = torch.linalg.vector_norm(torch.cat([grads[3].reshape(-1), grads[4].reshape(-1)]))
    assert float(head) == pytest.approx(0.1, rel=1e-6)
