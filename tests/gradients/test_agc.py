"""agc_clipping_fn on plain tensors, against the paper's unit-wise formula written out in NumPy."""

from __future__ import annotations

import math
import pickle
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss import UnitwiseClipping, agc_clipping_fn
from lightning_optloss.common import validation
from lightning_optloss.common.tags import AGC_CLIPPED_FRACTION as CLIPPED_FRACTION_TAG


def agc_reference(grad: torch.Tensor, param: torch.Tensor, clip_factor: float, eps: float) -> tuple[np.ndarray, int]:
    """Section 4.1 of Brock et al. 2021, one unit at a time in float64: (clipped gradient, units clipped).

    A unit is a row (dim 0) of a tensor with ndim >= 2, else the whole tensor.
    """
    g = grad.double().numpy().copy()
    w = param.double().numpy()
    units = [(g, w)] if g.ndim <= 1 else [(g[i], w[i]) for i in range(g.shape[0])]
    clipped = 0
    for g_unit, w_unit in units:
        g_norm = math.sqrt(float((g_unit**2).sum()))
        w_norm = max(math.sqrt(float((w_unit**2).sum())), eps)
        if g_norm / w_norm > clip_factor:  # never true for a zero gradient
            g_unit *= clip_factor * w_norm / g_norm
            clipped += 1
    return g, clipped


def _rows_scaled(param: torch.Tensor, ratios: list[float], seed: int = 0) -> torch.Tensor:
    """A gradient whose row i has norm ratios[i] * ||param row i||."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(param.shape, generator=generator)
    rows = grad.reshape(grad.shape[0], -1)
    w_rows = param.reshape(param.shape[0], -1)
    for i, ratio in enumerate(ratios):
        rows[i] *= ratio * w_rows[i].norm() / rows[i].norm()
    return grad


def _check_against_reference(pairs, clip, clip_factor, eps=1e-3, names=None):
    expected = [agc_reference(grad, param, clip_factor, eps) for grad, param in pairs]
    before = [grad.clone() for grad, _ in pairs]
    out = clip(pairs) if names is None else clip(pairs, names=names)
    for (grad, _), (want, _), original in zip(out, expected, before, strict=True):
        np.testing.assert_allclose(grad.double().numpy(), want, rtol=2e-6, atol=1e-12)
        unchanged = np.isclose(want, original.double().numpy(), rtol=0, atol=0).all()
        if unchanged:
            assert torch.equal(grad, original)  # factor exactly 1: bit for bit
    clipped = sum(count for _, count in expected)
    units = sum(grad.shape[0] if grad.ndim >= 2 else 1 for grad, _ in pairs)
    assert float(clip.summaries()[CLIPPED_FRACTION_TAG]) == pytest.approx(clipped / units)
    return clipped


def test_conv_weight_rows_over_the_threshold_are_clipped_and_rows_under_it_are_not():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, 3, 3, generator=generator)
    grad = _rows_scaled(weight, [0.5, 0.05, 0.2, 0.0999, 3.0, 0.01])
    clip = agc_clipping_fn(clip_factor=0.1)
    clipped = _check_against_reference([(grad, weight)], clip, 0.1)
    assert clipped == 3
    ratios = torch.linalg.vector_norm(grad.reshape(6, -1), dim=1) / torch.linalg.vector_norm(
        weight.reshape(6, -1), dim=1
    )
    torch.testing.assert_close(ratios, torch.tensor([0.1, 0.05, 0.1, 0.0999, 0.1, 0.01]))


def test_linear_weight_is_clipped_per_output_row():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 7, generator=generator)
    grad = _rows_scaled(weight, [0.02, 0.011, 0.009, 1.0], seed=3)
    assert _check_against_reference([(grad, weight)], agc_clipping_fn(), 0.01) == 3


def test_bias_is_one_unit():
    bias = torch.tensor([1.0, -2.0, 2.0])  # norm 3
    grad = torch.tensor([0.0, 0.3, 0.4])  # norm 0.5 > 0.1 * 3
    clip = agc_clipping_fn(clip_factor=0.1)
    clip([(grad, bias)])
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.18, 0.24]))  # scaled to norm 0.3, direction kept
    assert float(clip.summaries()[CLIPPED_FRACTION_TAG]) == 1.0


def test_scalar_parameter_is_one_unit():
    pairs = [(torch.tensor(5.0), torch.tensor(2.0))]
    _check_against_reference(pairs, agc_clipping_fn(clip_factor=0.5), 0.5)
    assert float(pairs[0][0]) == pytest.approx(1.0)


def test_zero_initialised_parameters_are_clipped_at_clip_factor_times_eps():
    bias = torch.zeros(5)
    weight = torch.zeros(3, 4)
    grad_bias = torch.full((5,), 1.0)
    grad_weight = torch.ones(3, 4)
    grad_weight[1] = 1e-7  # norm 2e-7 < 0.01 * 1e-3: under the threshold
    clip = agc_clipping_fn(clip_factor=0.01, eps=1e-3)
    _check_against_reference([(grad_bias, bias), (grad_weight, weight)], clip, 0.01)
    assert float(grad_bias.norm()) == pytest.approx(1e-5, rel=1e-6)
    row_norms = torch.linalg.vector_norm(grad_weight, dim=1)
    torch.testing.assert_close(row_norms, torch.tensor([1e-5, 2e-7, 1e-5]))


def test_zero_gradient_rows_stay_zero_without_nan():
    weight = torch.zeros(3, 2)  # also zero weights: 0 / max(0, eps) is 0, not clipped
    grad = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    clip = agc_clipping_fn(clip_factor=1.0, eps=1.0)
    clip([(grad, weight)])
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [0.6, 0.8], [0.0, 0.0]]))
    zero = [(torch.zeros(4), torch.zeros(4))]
    clip(zero)
    assert torch.equal(zero[0][0], torch.zeros(4))
    assert float(clip.summaries()[CLIPPED_FRACTION_TAG]) == 0.0


def test_several_parameters_of_mixed_shapes_in_one_call():
    generator = torch.Generator().manual_seed(4)
    shapes = [(8, 3, 3, 3), (8,), (10, 8), (10,), (), (2, 5, 3)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [
        torch.randn(shape, generator=generator) * scale
        for shape, scale in zip(shapes, [0.05, 0.5, 0.001, 2, 1, 0.3], strict=True)
    ]
    _check_against_reference(list(zip(grads, params, strict=True)), agc_clipping_fn(clip_factor=0.05), 0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(dtype):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 6, generator=generator).to(dtype)
    grad = _rows_scaled(weight.float(), [0.5, 0.001, 0.2, 0.05]).to(dtype)
    expected, _ = agc_reference(grad, weight, 0.1, 1e-3)
    agc_clipping_fn(clip_factor=0.1)([(grad, weight)])
    assert grad.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-2
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=tolerance, atol=1e-12)


def test_returns_the_same_pairs_with_gradients_scaled_in_place_and_none_passed_through():
    weight, grad = torch.ones(2, 2), torch.ones(2, 2)
    pairs = [(grad, weight), (None, torch.ones(3))]
    out = agc_clipping_fn()(pairs)
    assert len(out) == 2
    assert out[0][0] is grad and out[0][1] is weight and out[1][0] is None
    assert torch.equal(weight, torch.ones(2, 2))  # parameters are read, never written


def test_a_call_with_no_gradient_changes_nothing():
    clip = agc_clipping_fn()
    param = torch.ones(3)
    out = clip([(None, param)])
    assert len(out) == 1 and out[0][0] is None and out[0][1] is param
    assert clip.summaries() == {}


def test_non_finite_gradients_stay_non_finite_and_other_rows_are_clipped_as_usual():
    weight = torch.ones(3, 2)
    grad = torch.tensor([[math.nan, 1.0], [10.0, 0.0], [0.001, 0.0]])
    agc_clipping_fn(clip_factor=0.1)([(grad, weight)])
    assert math.isnan(grad[0, 0])
    torch.testing.assert_close(grad[1:], torch.tensor([[0.1 * math.sqrt(2), 0.0], [0.001, 0.0]]))


# ------------------------------------------------------------------ exclude and names


NAMES = ["stem.weight", "stem.bias", "head.weight", "head.bias"]


def _model_pairs(seed: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    return [(torch.randn(s, generator=generator), torch.randn(s, generator=generator) * 0.01) for s in shapes]


def head_predicate(name: str) -> bool:
    return name.startswith("head.")


@pytest.mark.parametrize("exclude", ["head.*", ["head.weight", "head.b*"], ("nothing", "head.*"), head_predicate])
def test_excluded_parameters_are_untouched(exclude):
    pairs = _model_pairs()
    before = [grad.clone() for grad, _ in pairs]
    clip = agc_clipping_fn(exclude=exclude)
    clip(pairs, names=NAMES)
    assert torch.equal(pairs[2][0], before[2]) and torch.equal(pairs[3][0], before[3])
    for (grad, param), original in zip(pairs[:2], before[:2], strict=True):
        expected, _ = agc_reference(original, param, 0.01, 1e-3)
        np.testing.assert_allclose(grad.double().numpy(), expected, rtol=2e-6)
    assert float(clip.summaries()[CLIPPED_FRACTION_TAG]) == 1.0  # 5 units of stem, all clipped


def test_globs_are_case_sensitive_and_star_crosses_dots():
    clip = agc_clipping_fn(exclude=["encoder.*", "*.Bias"])
    assert clip.is_excluded("encoder.layer.0.weight")
    assert not clip.is_excluded("decoder.bias")
    assert clip.is_excluded("decoder.Bias")


def test_exclude_needs_the_names_keyword():
    with pytest.raises(ValueError, match="needs the `names` keyword"):
        agc_clipping_fn(exclude="head.*")(_model_pairs())


def test_names_must_align_with_the_pairs():
    with pytest.raises(ValueError, match="4 pairs, got 3 names"):
        agc_clipping_fn(exclude="head.*")(_model_pairs(), names=NAMES[:3])


def test_names_are_not_needed_without_exclude():
    # Without exclude, the names change nothing: both calls clip every unit exactly as the reference.
    without, with_names = _model_pairs(), _model_pairs()
    originals = [grad.clone() for grad, _ in without]
    clip = agc_clipping_fn()
    clip(without)
    fraction_without = float(clip.summaries()[CLIPPED_FRACTION_TAG])
    clip(with_names, names=NAMES)
    assert float(clip.summaries()[CLIPPED_FRACTION_TAG]) == fraction_without == 1.0  # all 8 units
    for (grad, param), (named, _), original in zip(without, with_names, originals, strict=True):
        assert torch.equal(grad, named)
        expected, _ = agc_reference(original, param, 0.01, 1e-3)
        np.testing.assert_allclose(grad.double().numpy(), expected, rtol=2e-6)


def test_validate_names_rejects_a_glob_that_matches_nothing_and_names_close_ones():
    clip = agc_clipping_fn(exclude=["head.*", "hed.weight"])
    with pytest.raises(ValueError, match=r"agc_clipping_fn: `exclude` has the pattern 'hed.weight'.*'head.weight'"):
        clip.validate_names(NAMES)
    agc_clipping_fn(exclude="head.*").validate_names(NAMES)
    agc_clipping_fn(exclude=head_predicate).validate_names(NAMES)  # a predicate cannot be checked


def test_the_clip_declares_its_contract_keywords_and_keeps_no_state():
    clip = agc_clipping_fn()
    assert clip.keywords == {"names", "all_reduce_sum"}
    for keyword in clip.keywords:  # the declaration matches the signature
        assert validation.accepts_keyword(clip, keyword)
    assert clip.needs_whole_rows
    assert clip.state_dict() == {}


# ------------------------------------------------------------------ sharded (FSDP Shard(0)), simulated


class FakeProcessGroup:
    """all_reduce_sum across threads, one per simulated process, counting the calls."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)
        self.inputs: dict[int, torch.Tensor] = {}
        self.calls = 0

    def all_reduce_sum(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.inputs[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.inputs[r] for r in sorted(self.inputs))
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return total

        return reduce


def test_sharded_gradients_are_clipped_as_the_whole_ones_with_one_collective():
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 3, 2, 2), (5,), (3, 4), (3,), ()]
    params = [torch.randn(s, generator=generator) for s in shapes]
    scales = [0.05, 2.0, 0.001, 0.5, 9.0]
    grads = [torch.randn(s, generator=generator) * scale for s, scale in zip(shapes, scales, strict=True)]
    whole = [(g.clone(), p) for g, p in zip(grads, params, strict=True)]
    reference = agc_clipping_fn(clip_factor=0.1)
    reference(whole)

    def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return tensor if tensor.ndim == 0 else tensor.tensor_split(2)[rank]  # FSDP2's Shard(0); 0-d replicated

    group = FakeProcessGroup(2)
    local = {
        rank: [(shard(g.clone(), rank), shard(p, rank)) for g, p in zip(grads, params, strict=True)] for rank in (0, 1)
    }
    clips = {rank: agc_clipping_fn(clip_factor=0.1) for rank in (0, 1)}
    threads = [
        threading.Thread(target=lambda r=rank: clips[r](local[r], all_reduce_sum=group.all_reduce_sum(r)))
        for rank in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert group.calls == 1
    for position, (grad, _) in enumerate(whole):
        if grad.ndim == 0:
            for rank in (0, 1):
                torch.testing.assert_close(local[rank][position][0], grad)
        else:
            rebuilt = torch.cat([local[rank][position][0] for rank in (0, 1)])
            torch.testing.assert_close(rebuilt, grad, rtol=1e-6, atol=1e-9)
    for rank in (0, 1):
        torch.testing.assert_close(
            clips[rank].summaries()[CLIPPED_FRACTION_TAG], reference.summaries()[CLIPPED_FRACTION_TAG]
        )


# ------------------------------------------------------------------ properties


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(
        st.one_of(
            st.tuples(),
            st.tuples(st.integers(1, 5)),
            st.tuples(st.integers(1, 5), st.integers(1, 4)),
            st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
        ),
        min_size=1,
        max_size=5,
    ),
    grad_scale=st.floats(1e-4, 1e3),
    param_scale=st.sampled_from([0.0, 1e-5, 1e-2, 1.0, 10.0]),
    clip_factor=st.floats(1e-3, 1.0),
    eps=st.floats(1e-6, 1e-1),
    seed=st.integers(0, 2**16),
)
def test_every_unit_ends_within_clip_factor_times_its_parameter_norm(
    shapes, grad_scale, param_scale, clip_factor, eps, seed
):
    generator = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(s, generator=generator) * grad_scale, torch.randn(s, generator=generator) * param_scale)
        for s in shapes
    ]
    before = [grad.clone() for grad, _ in pairs]
    agc_clipping_fn(clip_factor=clip_factor, eps=eps)(pairs)
    for (grad, param), original in zip(pairs, before, strict=True):
        g_units = grad.reshape(grad.shape[0], -1) if grad.ndim >= 2 else grad.reshape(1, -1)
        w_units = param.reshape(param.shape[0], -1) if param.ndim >= 2 else param.reshape(1, -1)
        o_units = original.reshape(g_units.shape)
        limits = clip_factor * torch.linalg.vector_norm(w_units, dim=1).clamp_min(eps)
        g_norms = torch.linalg.vector_norm(g_units, dim=1)
        assert (g_norms <= limits * (1 + 1e-5)).all()
        # Directions are kept: each unit is a non-negative multiple of the original, at most 1.
        for g_unit, o_unit in zip(g_units, o_units, strict=True):
            scale = float(g_unit.norm() / o_unit.norm()) if o_unit.norm() > 0 else 1.0
            assert scale <= 1 + 1e-6
            torch.testing.assert_close(g_unit, o_unit * scale, rtol=1e-5, atol=1e-30)


# ------------------------------------------------------------------ pickling, repr, validation


@pytest.mark.parametrize("exclude", [None, "head.*", head_predicate])
def test_pickles_and_clips_the_same_after_unpickling(exclude):
    clip = agc_clipping_fn(clip_factor=0.02, exclude=exclude)
    clip(_model_pairs(), names=NAMES)  # caches and summaries do not stop pickling
    restored = pickle.loads(pickle.dumps(clip))
    assert isinstance(restored, UnitwiseClipping)
    a, b = _model_pairs(8), _model_pairs(8)
    clip(a, names=NAMES)
    restored(b, names=NAMES)
    for (ga, _), (gb, _) in zip(a, b, strict=True):
        assert torch.equal(ga, gb)


def test_repr_shows_the_configuration():
    assert repr(agc_clipping_fn(0.05, exclude="head.*")) == (
        "agc_clipping_fn(clip_factor=0.05, eps=0.001, exclude=('head.*',))"
    )


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("clip_factor", 0.0),
        ("clip_factor", -0.01),
        ("clip_factor", math.nan),
        ("clip_factor", math.inf),
        ("clip_factor", "0.01"),
        ("clip_factor", True),
        ("eps", 0.0),
        ("eps", -1e-3),
        ("eps", math.inf),
        ("eps", None),
        ("exclude", 3),
        ("exclude", b"head.*"),
        ("exclude", ["head.*", 3]),
        ("exclude", [""]),
    ],
)
def test_invalid_arguments_are_rejected_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        agc_clipping_fn(**{argument: value})
    assert str(error.value).startswith("agc_clipping_fn: ")
    assert repr(value) in str(error.value)
