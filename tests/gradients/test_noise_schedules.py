"""annealed_noise_scale: sigma_t of Neelakantan et al. 2015, written out, and the truncated-normal correction."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss import AnnealedNoiseScale, annealed_noise_scale
from lightning_optloss.gradients.noise import GradientNoise, truncated_normal

TRUNCATED_STD = 0.8796256610342398


def paper_sigma(eta: float, gamma: float, t: int) -> float:
    """Section 2 of the paper: N(0, sigma_t^2) with sigma_t^2 = eta / (1 + t)^gamma."""
    return math.sqrt(eta / (1 + t) ** gamma)


@pytest.mark.parametrize("eta", [0.01, 0.3, 1.0])  # the paper's three values
@pytest.mark.parametrize("step", [0, 1, 2, 10, 999, 10**6])
def test_sigma_t_is_the_papers(eta, step):
    assert annealed_noise_scale(eta=eta)(step) == pytest.approx(paper_sigma(eta, 0.55, step), rel=1e-15)


def test_known_values():
    scale = annealed_noise_scale()  # eta 0.01, gamma 0.55
    assert scale(0) == pytest.approx(0.1)
    assert scale(1) == pytest.approx(0.1 * 2**-0.275)
    assert scale(99) == pytest.approx(0.1 * 100**-0.275)


def test_match_paper_std_divides_by_the_truncated_normals_std():
    plain, matched = annealed_noise_scale(eta=0.3), annealed_noise_scale(eta=0.3, match_paper_std=True)
    for step in (0, 5, 500):
        assert matched(step) == pytest.approx(plain(step) / TRUNCATED_STD, rel=1e-15)


def test_the_constant_is_the_std_of_a_normal_truncated_at_two_sigma():
    # Var of N(0, 1) cut at +-a: 1 - 2 a phi(a) / (2 Phi(a) - 1).
    a = 2.0
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    assert math.sqrt(1 - 2 * a * phi / mass) == pytest.approx(TRUNCATED_STD, rel=1e-12)
    assert GradientNoise.truncated_std == TRUNCATED_STD


def test_with_match_paper_std_optimize_losss_noise_has_std_sigma_t():
    scale = annealed_noise_scale(eta=0.3, match_paper_std=True)
    sigma = paper_sigma(0.3, 0.55, 7)
    generator = torch.Generator().manual_seed(0)
    noise = truncated_normal((200_000,), generator, torch.device("cpu")) * scale(7)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.01)


@settings(max_examples=50, deadline=None)
@given(eta=st.floats(1e-6, 10.0), gamma=st.floats(0.0, 2.0), step=st.integers(0, 10**9))
def test_never_increases_with_the_step(eta, gamma, step):
    scale = annealed_noise_scale(eta=eta, gamma=gamma)
    assert scale(step + 1) <= scale(step)
    assert scale(step) == pytest.approx(paper_sigma(eta, gamma, step), rel=1e-12)


def test_gamma_zero_is_constant():
    scale = annealed_noise_scale(eta=0.04, gamma=0.0)
    assert scale(0) == scale(10**9) == pytest.approx(0.2)


@pytest.mark.parametrize("step", [np.int64(3), np.int32(3), torch.tensor(3), 3])
def test_integer_scalars_are_accepted_as_the_step(step):
    assert annealed_noise_scale()(step) == annealed_noise_scale()(3)


def test_returns_a_python_float():
    assert type(annealed_noise_scale()(torch.tensor(4))) is float


def test_pickles():
    scale = annealed_noise_scale(eta=0.3, gamma=0.6, match_paper_std=True)
    restored = pickle.loads(pickle.dumps(scale))
    assert isinstance(restored, AnnealedNoiseScale)
    assert restored(12) == scale(12)
    assert repr(restored) == "annealed_noise_scale(eta=0.3, gamma=0.6, match_paper_std=True)"


@pytest.mark.parametrize("step", [-1, 1.5, True, None, "3"])
def test_invalid_steps_are_rejected(step):
    with pytest.raises(ValueError, match="annealed_noise_scale: `global_step` must be an integer >= 0") as error:
        annealed_noise_scale()(step)
    assert repr(step) in str(error.value)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("eta", 0.0),
        ("eta", -0.01),
        ("eta", math.inf),
        ("eta", "0.01"),
        ("eta", None),
        ("gamma", -0.55),
        ("gamma", math.nan),
        ("gamma", True),
        ("match_paper_std", 1),
        ("match_paper_std", "yes"),
    ],
)
def test_invalid_arguments_are_rejected_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        annealed_noise_scale(**{argument: value})
    assert str(error.value).startswith("annealed_noise_scale: ")
    assert repr(value) in str(error.value)
