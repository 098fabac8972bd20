"""TF1's learning-rate schedules: closed forms, TF's float32 boundaries, the TF fixture, validation."""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import json
import math
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss.common import validation
from lightning_optloss.tf import decay

FIXTURE = Path(__file__).parent / "reference" / "fixtures" / "decay.json"
LR = 0.1
DECAY_STEPS = 10
STEPS = range(3 * DECAY_STEPS + 1)
SCHEDULES = [
    "exponential_decay",
    "piecewise_constant",
    "polynomial_decay",
    "natural_exp_decay",
    "inverse_time_decay",
    "cosine_decay",
    "cosine_decay_restarts",
    "linear_cosine_decay",
    "noisy_linear_cosine_decay",
]


def f32(value: float) -> float:
    return float(np.float32(value))


def assert_close_to_formula(actual: float, expected: float, learning_rate: float = LR, ulps_of_lr: float = 4.0) -> None:
    """Ours is TF's float32 result, the formula float64: a few float32 ulps of the rate's scale apart."""
    assert isinstance(actual, float)
    assert actual == pytest.approx(expected, rel=1e-6, abs=ulps_of_lr * 6e-8 * learning_rate)


# ---------------------------------------------------------------------------------------------------------
# The textbook formulas (float64, exact integer staircase/cycle/restart boundaries)
# ---------------------------------------------------------------------------------------------------------


def sgdr(lr: float, step: int, first: int, t_mul: float, m_mul: float, alpha: float) -> float:
    """SGDR: period i lasts first * t_mul**i steps and starts at m_mul**i; found by walking the periods."""
    start, length, i = 0.0, float(first), 0
    while step >= start + length:
        start, length, i = start + length, length * t_mul, i + 1
    cosine = 0.5 * m_mul**i * (1 + math.cos(math.pi * (step - start) / length))
    return lr * ((1 - alpha) * cosine + alpha)


def linear_cosine(lr: float, step: int, ds: int, periods: float, alpha: float, beta: float) -> float:
    step = min(step, ds)
    linear = (ds - step) / ds
    cosine = 0.5 * (1 + math.cos(math.pi * 2 * periods * step / ds))
    return lr * ((alpha + linear) * cosine + beta)


def polynomial(lr: float, step: int, ds: int, end: float, power: float, cycle: bool) -> float:
    if cycle:
        ds = ds * max(1, math.ceil(step / ds))
    else:
        step = min(step, ds)
    return (lr - end) * (1 - step / ds) ** power + end


@pytest.mark.parametrize("staircase", [False, True], ids=["continuous", "staircase"])
@pytest.mark.parametrize("rate", [0.5, 0.96])
def test_exponential_decay_follows_lr_times_rate_to_the_step_ratio(staircase: bool, rate: float) -> None:
    for step in STEPS:
        exponent = step // DECAY_STEPS if staircase else step / DECAY_STEPS
        actual = decay.exponential_decay(LR, step, DECAY_STEPS, rate, staircase=staircase)
        assert_close_to_formula(actual, LR * rate**exponent)


@pytest.mark.parametrize("staircase", [False, True], ids=["continuous", "staircase"])
def test_natural_exp_decay_follows_lr_times_exp_of_minus_rate_times_ratio(staircase: bool) -> None:
    for step in STEPS:
        ratio = step // DECAY_STEPS if staircase else step / DECAY_STEPS
        actual = decay.natural_exp_decay(LR, step, DECAY_STEPS, 0.5, staircase=staircase)
        assert_close_to_formula(actual, LR * math.exp(-0.5 * ratio))


@pytest.mark.parametrize("staircase", [False, True], ids=["continuous", "staircase"])
def test_inverse_time_decay_follows_lr_over_one_plus_rate_times_ratio(staircase: bool) -> None:
    for step in STEPS:
        ratio = step // DECAY_STEPS if staircase else step / DECAY_STEPS
        actual = decay.inverse_time_decay(LR, step, DECAY_STEPS, 0.5, staircase=staircase)
        assert_close_to_formula(actual, LR / (1 + 0.5 * ratio))


def test_piecewise_constant_takes_the_value_of_the_interval_closed_on_the_right() -> None:
    boundaries, values = [10, 20], [1.0, 0.5, 0.1]
    for step in STEPS:
        expected = values[bisect.bisect_left(boundaries, step)]
        assert_close_to_formula(decay.piecewise_constant(step, boundaries, values), expected)
    assert decay.piecewise_constant(10, boundaries, values) == 1.0
    assert decay.piecewise_constant(11, boundaries, values) == 0.5
    assert decay.piecewise_constant(10.5, [10.0, 20.0], values) == 0.5
    assert decay.piecewise_constant(-3, [0], [0.5, 1.0]) == 0.5
    assert decay.piecewise_constant(7, [], [0.25]) == 0.25


@pytest.mark.parametrize("cycle", [False, True], ids=["clamped", "cycle"])
@pytest.mark.parametrize(("end", "power"), [(0.0001, 1.0), (0.01, 2.0), (0.0, 0.5), (0.05, 3.0), (0.001, 0.7)])
def test_polynomial_decay_follows_its_formula(cycle: bool, end: float, power: float) -> None:
    for step in STEPS:
        actual = decay.polynomial_decay(LR, step, DECAY_STEPS, end, power, cycle)
        assert_close_to_formula(actual, polynomial(LR, step, DECAY_STEPS, end, power, cycle))


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_cosine_decay_follows_half_a_cosine_down_to_alpha(alpha: float) -> None:
    for step in STEPS:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, DECAY_STEPS) / DECAY_STEPS))
        actual = decay.cosine_decay(LR, step, DECAY_STEPS, alpha)
        assert_close_to_formula(actual, LR * ((1 - alpha) * cosine + alpha))


@pytest.mark.parametrize(
    ("t_mul", "m_mul", "alpha"), [(2.0, 1.0, 0.0), (1.0, 1.0, 0.0), (2.0, 0.5, 0.1), (1.5, 0.9, 0.0)]
)
def test_cosine_decay_restarts_follows_sgdr(t_mul: float, m_mul: float, alpha: float) -> None:
    for step in range(0, 8 * DECAY_STEPS + 1):
        actual = decay.cosine_decay_restarts(LR, step, DECAY_STEPS, t_mul, m_mul, alpha)
        # TF's fraction of the period, step / first_decay_steps (up to 8) less the restarts, keeps the
        # float32 ulps of that ratio: ~5e-7 absolute, not of the fraction.
        assert_close_to_formula(actual, sgdr(LR, step, DECAY_STEPS, t_mul, m_mul, alpha), ulps_of_lr=16.0)


@pytest.mark.parametrize(("periods", "alpha", "beta"), [(0.5, 0.0, 0.001), (2.0, 0.1, 0.01), (3.5, 0.2, 0.0)])
def test_linear_cosine_decay_follows_its_formula(periods: float, alpha: float, beta: float) -> None:
    for step in STEPS:
        actual = decay.linear_cosine_decay(LR, step, DECAY_STEPS, periods, alpha, beta)
        assert_close_to_formula(actual, linear_cosine(LR, step, DECAY_STEPS, periods, alpha, beta))


def test_noisy_linear_cosine_decay_without_variance_is_linear_cosine_decay() -> None:
    for step in STEPS:
        noisy = decay.noisy_linear_cosine_decay(LR, step, DECAY_STEPS, initial_variance=0.0, seed=3)
        assert noisy == decay.linear_cosine_decay(LR, step, DECAY_STEPS)


def test_noisy_linear_cosine_decay_adds_standard_normal_noise_scaled_by_its_std() -> None:
    """eps_t = std * z: recovered z over 2000 steps has mean ~0 and std ~1 (deterministic, not flaky)."""
    ds, variance = 10**6, 0.04  # cosine factor ~1 and variance_decay 0: a constant std of 0.2
    zs = []
    for step in range(2000):
        noisy = decay.noisy_linear_cosine_decay(1.0, step, ds, variance, 0.0, beta=0.0, seed=11)
        cosine = 0.5 * (1 + math.cos(math.pi * step / ds))
        zs.append((noisy / cosine - (ds - step) / ds) / math.sqrt(variance))
    assert abs(float(np.mean(zs))) < 0.1
    assert abs(float(np.std(zs)) - 1.0) < 0.1


def test_noisy_linear_cosine_decay_noise_is_pinned_across_runs_and_python_versions() -> None:
    """The noise depends on (seed, step) only, through random.Random's guaranteed random() sequence."""
    expected = {
        (0, 0): 0.10973715782165527,
        (0, 5): -0.0007800475577823818,  # TF's noise is not clipped either: the rate can be negative
        (7, 3): 0.10373548418283463,
        (-7, 3): 0.054662417620420456,
    }
    for (seed, step), value in expected.items():
        assert decay.noisy_linear_cosine_decay(LR, step, DECAY_STEPS, seed=seed) == value


# ---------------------------------------------------------------------------------------------------------
# Where TF's float32 arithmetic (in TF1's graph-optimized form) is not the textbook formula: values taken
# from TF 2.21's tf.compat.v1.train.* in a graph session, one schedule per graph.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "kwargs", "steps", "tf_values"),
    [
        # floor(41 * float32(1/41)) is 0: TF1 decays one step late at this multiple.
        (decay.exponential_decay, {"decay_steps": 41, "decay_rate": 0.5, "staircase": True},
         [40, 41, 42], [1.0, 1.0, 0.5]),
        (decay.inverse_time_decay, {"decay_steps": 41, "decay_rate": 1.0, "staircase": True},
         [40, 41, 42], [1.0, 1.0, 0.5]),
        (decay.natural_exp_decay, {"decay_steps": 41, "decay_rate": 1.0, "staircase": True},
         [40, 41, 42], [1.0, 1.0, 0.3678794503211975]),
        # ceil(21 * float32(1/7)) is 4: the fourth cycle (28 steps long) starts at step 21, not 22.
        (decay.polynomial_decay, {"decay_steps": 7, "end_learning_rate": 0.0, "cycle": True},
         [20, 21, 22], [0.0476190447807312, 0.25, 0.2142857313156128]),
        (decay.polynomial_decay, {"decay_steps": 1000, "end_learning_rate": 0.0, "cycle": True},
         [2999, 3000, 3001], [0.0003333091735839844, 0.25, 0.249750018119812]),
        # float32 log(243) / log(3) is 5: TF restarts at step 121, where float64 (4.999...) would not.
        (decay.cosine_decay_restarts, {"first_decay_steps": 1, "t_mul": 3.0},
         [120, 121, 122], [0.00037601590156555176, 1.0, 0.9999582171440125]),
        # ... and float32 log(8192) * float32(1/log(2)) is below 13: TF restarts one step late here.
        (decay.cosine_decay_restarts, {"first_decay_steps": 1, "t_mul": 2.0},
         [8190, 8191, 8192], [1.4901161193847656e-07, 0.0, 1.0]),
        (decay.cosine_decay_restarts, {"first_decay_steps": 41, "t_mul": 4.0},
         [40, 41, 42], [0.0014671087265014648, 0.0, 0.9999082684516907]),
        (decay.cosine_decay_restarts, {"first_decay_steps": 41, "t_mul": 1.0},
         [40, 41, 42], [0.0014671087265014648, 0.0, 0.9985328912734985]),
    ],
)  # fmt: skip
def test_boundaries_fall_where_tensorflow_puts_them(
    fn: Callable[..., float], kwargs: dict, steps: list[int], tf_values: list[float]
) -> None:
    # Bit-identical with glibc; the tolerance is for other C libraries' cosf, the branches differ far more.
    assert [fn(1.0, step, **kwargs) for step in steps] == pytest.approx(tf_values, rel=1e-6, abs=1e-12)


C_LIBRARY_FLOAT32 = decay._FROM_C_LIBRARY


@pytest.mark.skipif(sys.platform != "linux", reason="TF's kernels call glibc's cosf, checked on Linux")
def test_float32_functions_are_the_c_librarys_on_linux() -> None:
    assert C_LIBRARY_FLOAT32


@pytest.mark.skipif(not C_LIBRARY_FLOAT32, reason="bit-identical with TF only with the C library's cosf")
def test_end_of_a_cosine_has_tensorflow_float32_value_not_the_float64_one() -> None:
    """1 + cos(x) with cos(x) near -1: TF's float32 is 5.5e-5 off the exact value at step 99 of 100."""
    assert decay.cosine_decay(0.7, 94, 100) == 0.006199449300765991
    assert decay.cosine_decay(0.7, 99, 100) == 0.00017271339311264455
    exact = 0.7 * 0.5 * (1 + math.cos(math.pi * 99 / 100))
    assert decay.cosine_decay(0.7, 99, 100) == pytest.approx(exact, rel=1e-4)
    assert decay.cosine_decay(0.7, 99, 100) != pytest.approx(exact, rel=1e-5)
    assert decay.linear_cosine_decay(0.1, 72, 100, 3.5, 0.2, 0.0) == 0.00018924665346276015


def test_results_are_float32_values_like_tensorflow_tensors() -> None:
    assert decay.exponential_decay(0.1, 0, 10, 0.5) == f32(0.1) == 0.10000000149011612
    assert decay.piecewise_constant(0, [1], [0.1, 0.2]) == f32(0.1)


# ---------------------------------------------------------------------------------------------------------
# The TF fixture (tests/tf/reference/make_tf_reference.py)
# ---------------------------------------------------------------------------------------------------------


def fixture_schedules() -> list[Any]:
    if not FIXTURE.exists():
        return [pytest.param(None, id="fixture-missing")]
    return [pytest.param(entry, id=entry["id"]) for entry in json.loads(FIXTURE.read_text())["schedules"]]


@pytest.mark.parametrize("schedule", fixture_schedules())
def test_matches_tensorflow_fixture(schedule: dict | None) -> None:
    assert schedule is not None, f"{FIXTURE} is missing: run tests/tf/reference/make_tf_reference.py"
    fn = getattr(decay, schedule["fn"])
    kwargs = schedule["kwargs"]
    if schedule["learning_rate"] is None:
        ours = [fn(step, **kwargs) for step in schedule["steps"]]
    else:
        ours = [fn(schedule["learning_rate"], step, **kwargs) for step in schedule["steps"]]
    if decay._FROM_C_LIBRARY:  # TF's own cosf/logf/expf: bit-identical to TF1 graph mode
        assert ours == schedule["values"]
    else:  # math's functions rounded to float32 are within an ulp
        np.testing.assert_allclose(ours, schedule["values"], rtol=1e-6, atol=0.0)


def test_tensorflow_fixture_covers_every_schedule() -> None:
    assert FIXTURE.exists(), f"{FIXTURE} is missing: run tests/tf/reference/make_tf_reference.py"
    covered = {entry["fn"] for entry in json.loads(FIXTURE.read_text())["schedules"]}
    assert covered == set(SCHEDULES)


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    decay_steps=st.integers(2, 60),
    k=st.integers(0, 50),
    rate=st.floats(0.05, 0.99),
)
def test_exponential_staircase_is_constant_between_multiples_of_decay_steps(
    decay_steps: int, k: int, rate: float
) -> None:
    first = decay.exponential_decay(LR, k * decay_steps + 1, decay_steps, rate, staircase=True)
    for step in range(k * decay_steps + 1, (k + 1) * decay_steps):
        assert decay.exponential_decay(LR, step, decay_steps, rate, staircase=True) == first
    assert first == pytest.approx(LR * rate**k, rel=1e-5)
    # Exactly at a multiple TF's float32 ratio decides: the new rate, or (one step late) the previous one.
    at_multiple = decay.exponential_decay(LR, k * decay_steps, decay_steps, rate, staircase=True)
    assert at_multiple == first or (k > 0 and at_multiple == pytest.approx(LR * rate ** (k - 1), rel=1e-5))


@settings(max_examples=40, deadline=None)
@given(
    learning_rate=st.floats(1e-5, 10.0),
    decay_steps=st.integers(1, 500),
    alpha=st.floats(0.0, 1.0),
)
def test_cosine_decay_is_non_increasing_and_ends_at_alpha_times_lr(
    learning_rate: float, decay_steps: int, alpha: float
) -> None:
    rates = [decay.cosine_decay(learning_rate, s, decay_steps, alpha) for s in range(decay_steps + 3)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert rates[0] == pytest.approx(learning_rate, rel=1e-6)
    for rate in rates[decay_steps:]:
        assert rate == pytest.approx(alpha * learning_rate, rel=1e-6, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    learning_rate=st.floats(1e-4, 1.0),
    end_fraction=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
    power=st.floats(0.0, 4.0),
    decay_steps=st.integers(1, 100),
    step=st.integers(0, 10**7),
)
def test_polynomial_decay_with_cycle_stays_between_end_and_initial_rate(
    learning_rate: float, end_fraction: float, power: float, decay_steps: int, step: int
) -> None:
    end = learning_rate * end_fraction
    rate = decay.polynomial_decay(learning_rate, step, decay_steps, end, power, cycle=True)
    assert f32(end) <= rate
    assert rate <= f32(learning_rate) * (1 + 2**-23)  # (lr - end) + end in float32 may round up an ulp


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), step=st.integers(0, 4 * 10**8))
def test_noisy_linear_cosine_decay_is_deterministic_per_seed_and_step(seed: int, step: int) -> None:
    # decay_steps 1e9 and variance_decay 0: the noise (std 1) is not lost to a vanishing cosine factor.
    call = functools.partial(decay.noisy_linear_cosine_decay, 1.0, step, 10**9, 1.0, 0.0)
    assert call(seed=seed) == call(seed=seed) == call(seed=np.int64(seed))
    assert call(seed=seed) != call(seed=seed + 1)


def test_noisy_linear_cosine_decay_differs_across_seeds_and_steps() -> None:
    by_seed = {decay.noisy_linear_cosine_decay(LR, 2, DECAY_STEPS, seed=seed) for seed in range(-50, 50)}
    by_step = {decay.noisy_linear_cosine_decay(LR, step, 10**6, seed=0) for step in range(100)}
    assert len(by_seed) == 100
    assert len(by_step) == 100


# ---------------------------------------------------------------------------------------------------------
# Interface: signatures, pickling, accepted global steps
# ---------------------------------------------------------------------------------------------------------

TF_SIGNATURES = {
    "exponential_decay": "(learning_rate, global_step, decay_steps, decay_rate, staircase=False, name=None)",
    "piecewise_constant": "(x, boundaries, values, name=None)",
    "polynomial_decay": "(learning_rate, global_step, decay_steps, end_learning_rate=0.0001, power=1.0, "
    "cycle=False, name=None)",
    "natural_exp_decay": "(learning_rate, global_step, decay_steps, decay_rate, staircase=False, name=None)",
    "inverse_time_decay": "(learning_rate, global_step, decay_steps, decay_rate, staircase=False, name=None)",
    "cosine_decay": "(learning_rate, global_step, decay_steps, alpha=0.0, name=None)",
    "cosine_decay_restarts": "(learning_rate, global_step, first_decay_steps, t_mul=2.0, m_mul=1.0, "
    "alpha=0.0, name=None)",
    "linear_cosine_decay": "(learning_rate, global_step, decay_steps, num_periods=0.5, alpha=0.0, "
    "beta=0.001, name=None)",
    "noisy_linear_cosine_decay": "(learning_rate, global_step, decay_steps, initial_variance=1.0, "
    "variance_decay=0.55, num_periods=0.5, alpha=0.0, beta=0.001, name=None, seed=0)",
}


def test_all_lists_the_nine_schedules_and_the_warmups() -> None:
    assert sorted(decay.__all__) == sorted([*SCHEDULES, "linear_warmup", "warmup_cosine_decay"])


@pytest.mark.parametrize("name", SCHEDULES)
def test_signature_is_tensorflows(name: str) -> None:
    signature = inspect.signature(getattr(decay, name))
    plain = signature.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    assert str(plain) == TF_SIGNATURES[name]


def test_name_is_accepted_and_ignored() -> None:
    assert decay.cosine_decay(LR, 3, 10, name="lr") == decay.cosine_decay(LR, 3, 10)
    assert decay.piecewise_constant(3, [1], [1.0, 0.5], name="pc") == 0.5


PARTIALS = {
    "exponential_decay": {"decay_steps": 3, "decay_rate": 0.5, "staircase": True},
    "piecewise_constant": {"boundaries": [2, 4], "values": [1.0, 0.5, 0.1]},
    "polynomial_decay": {"decay_steps": 3, "cycle": True},
    "natural_exp_decay": {"decay_steps": 3, "decay_rate": 0.5},
    "inverse_time_decay": {"decay_steps": 3, "decay_rate": 0.5},
    "cosine_decay": {"decay_steps": 3, "alpha": 0.1},
    "cosine_decay_restarts": {"first_decay_steps": 3, "m_mul": 0.5},
    "linear_cosine_decay": {"decay_steps": 3},
    "noisy_linear_cosine_decay": {"decay_steps": 3, "seed": 5},
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_partial_pickles_and_computes_the_same_after_unpickling(name: str) -> None:
    partial = functools.partial(getattr(decay, name), **PARTIALS[name])
    restored = pickle.loads(pickle.dumps(partial))
    args = (5,) if name == "piecewise_constant" else (LR, 5)
    assert restored(*args) == partial(*args)


@pytest.mark.parametrize(
    "step", [5, np.int64(5), np.int32(5), np.uint8(5), torch.tensor(5), torch.tensor(5, dtype=torch.int32)]
)
def test_integer_scalars_of_numpy_and_torch_are_accepted_as_global_step(step: Any) -> None:
    assert decay.cosine_decay(LR, step, DECAY_STEPS) == decay.cosine_decay(LR, 5, DECAY_STEPS)


def test_global_step_is_required() -> None:
    for name in SCHEDULES:
        if name == "piecewise_constant":
            with pytest.raises(ValueError, match=r"^x is required for piecewise_constant\.$"):
                decay.piecewise_constant(None, [1], [1.0, 0.5])
            continue
        fn = functools.partial(getattr(decay, name), **PARTIALS[name])
        with pytest.raises(ValueError, match=rf"^global_step is required for {name}\.$"):
            fn(LR, None)


# ---------------------------------------------------------------------------------------------------------
# Validation: every error names the function, the argument and the value
# ---------------------------------------------------------------------------------------------------------

EXP = {"learning_rate": LR, "global_step": 3, "decay_steps": 10, "decay_rate": 0.5}
RESTARTS = {"learning_rate": LR, "global_step": 3, "first_decay_steps": 10}
BASE = {"learning_rate": LR, "global_step": 3, "decay_steps": 10}
PIECEWISE = {"x": 3, "boundaries": [10, 20], "values": [1.0, 0.5, 0.1]}
INVALID = [
    ("exponential_decay", EXP, "global_step", -1),
    ("exponential_decay", EXP, "global_step", 1.5),
    ("exponential_decay", EXP, "global_step", 3.0),
    ("exponential_decay", EXP, "global_step", True),
    ("exponential_decay", EXP, "global_step", "3"),
    ("exponential_decay", EXP, "global_step", 2**63),
    ("exponential_decay", EXP, "global_step", torch.tensor(3.0)),
    ("exponential_decay", EXP, "learning_rate", -0.1),
    ("exponential_decay", EXP, "learning_rate", math.inf),
    ("exponential_decay", EXP, "learning_rate", math.nan),
    ("exponential_decay", EXP, "learning_rate", "0.1"),
    ("exponential_decay", EXP, "decay_steps", 0),
    ("exponential_decay", EXP, "decay_steps", -10),
    ("exponential_decay", EXP, "decay_rate", -0.5),
    ("exponential_decay", EXP, "staircase", "yes"),
    ("natural_exp_decay", EXP, "decay_steps", 0),
    ("natural_exp_decay", EXP, "decay_rate", math.inf),
    ("inverse_time_decay", EXP, "decay_steps", 0.0),
    ("inverse_time_decay", EXP, "decay_rate", -1.0),
    ("polynomial_decay", BASE, "decay_steps", 0),
    ("polynomial_decay", BASE, "end_learning_rate", -0.1),
    ("polynomial_decay", BASE, "power", -1.0),
    ("polynomial_decay", BASE, "cycle", 1),
    ("cosine_decay", BASE, "global_step", -3),
    ("cosine_decay", BASE, "decay_steps", -1),
    ("cosine_decay", BASE, "alpha", 1.5),
    ("cosine_decay", BASE, "alpha", -0.1),
    ("cosine_decay_restarts", RESTARTS, "first_decay_steps", 0),
    ("cosine_decay_restarts", RESTARTS, "t_mul", 0.0),
    ("cosine_decay_restarts", RESTARTS, "t_mul", -2.0),
    ("cosine_decay_restarts", RESTARTS, "t_mul", math.inf),
    ("cosine_decay_restarts", RESTARTS, "m_mul", -1.0),
    ("cosine_decay_restarts", RESTARTS, "alpha", 2.0),
    ("linear_cosine_decay", BASE, "num_periods", -0.5),
    ("linear_cosine_decay", BASE, "alpha", math.nan),
    ("linear_cosine_decay", BASE, "beta", -0.001),
    ("noisy_linear_cosine_decay", BASE, "initial_variance", -1.0),
    ("noisy_linear_cosine_decay", BASE, "variance_decay", math.nan),
    ("noisy_linear_cosine_decay", BASE, "seed", 1.5),
    ("noisy_linear_cosine_decay", BASE, "seed", True),
    ("piecewise_constant", PIECEWISE, "x", True),
    ("piecewise_constant", PIECEWISE, "x", math.nan),
    ("piecewise_constant", PIECEWISE, "values", [1.0, 0.5]),
    ("piecewise_constant", PIECEWISE, "values", [1.0, 0.5, 0.1, 0.01]),
    ("piecewise_constant", PIECEWISE, "boundaries", [20, 10]),
    ("piecewise_constant", PIECEWISE, "boundaries", [10, 10]),
    ("piecewise_constant", PIECEWISE, "boundaries", "10"),
]


@pytest.mark.parametrize(
    ("name", "arguments", "argument", "value"),
    INVALID,
    ids=[f"{name}-{argument}={value!r}" for name, _, argument, value in INVALID],
)
def test_invalid_argument_is_named_with_its_value(name: str, arguments: dict, argument: str, value: Any) -> None:
    with pytest.raises(ValueError) as error:
        getattr(decay, name)(**{**arguments, argument: value})
    message = str(error.value)
    assert message.startswith(f"{name}: `{argument}` must be ")
    assert f"got {validation.show(value)}." in message


@pytest.mark.parametrize(
    ("values", "boundaries", "argument", "value"),
    [
        ([1.0, -0.5, 0.1], [10, 20], "values[1]", -0.5),
        ([1.0, math.inf, 0.1], [10, 20], "values[1]", math.inf),
        ([1.0, 0.5, 0.1], [10, math.nan], "boundaries[1]", math.nan),
    ],
)
def test_piecewise_constant_names_the_bad_element(values: list, boundaries: list, argument: str, value: float) -> None:
    pattern = rf"^piecewise_constant: `{re.escape(argument)}` must be .*; got {value}\.$"
    with pytest.raises(ValueError, match=pattern):
        decay.piecewise_constant(3, boundaries, values)


def test_cosine_decay_restarts_with_shrinking_periods_stops_where_tensorflow_gives_nan() -> None:
    """t_mul < 1: all periods together last first_decay_steps / (1 - t_mul) = 20 steps; TF gives NaN after."""
    assert decay.cosine_decay_restarts(1.0, 19, 10, t_mul=0.5) == 0.6545090675354004  # TF's value
    pattern = r"^cosine_decay_restarts: `global_step` must be < .* = 20 .*; got 20\.$"
    with pytest.raises(ValueError, match=pattern):
        decay.cosine_decay_restarts(1.0, 20, 10, t_mul=0.5)
