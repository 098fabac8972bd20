"""linear_warmup and warmup_cosine_decay against Hugging Face's formulas, written out (no transformers)."""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optloss.tf import decay

LR = 0.1


def f32(value: float) -> float:
    return float(np.float32(value))


def assert_close(actual: float, expected: float, learning_rate: float = LR) -> None:
    """Ours is float32 (TF's cosine included), the formula float64: a few float32 ulps of the rate apart."""
    assert isinstance(actual, float)
    assert actual == pytest.approx(expected, rel=1e-6, abs=4 * 6e-8 * learning_rate)


def hf_cosine_with_warmup(lr: float, step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """transformers.get_cosine_schedule_with_warmup's lr_lambda (num_cycles=0.5) times the base rate."""
    if step < num_warmup_steps:
        return lr * float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def hf_linear_with_warmup(lr: float, step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """transformers.get_linear_schedule_with_warmup's lr_lambda times the base rate."""
    if step < num_warmup_steps:
        return lr * float(step) / float(max(1, num_warmup_steps))
    return lr * max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


@pytest.mark.parametrize(("warmup", "total"), [(5, 25), (1, 10), (10, 11), (100, 1100), (0, 20)])
def test_warmup_cosine_decay_is_hugging_faces_cosine_with_warmup(warmup, total):
    for step in range(total + 1):
        ours = decay.warmup_cosine_decay(LR, step, warmup, total - warmup)
        assert_close(ours, hf_cosine_with_warmup(LR, step, warmup, total))


def test_warmup_boundaries():
    rates = [decay.warmup_cosine_decay(LR, step, 4, 10) for step in range(7)]
    assert rates[0] == 0.0  # the first update does not move the weights (as Hugging Face's)
    assert rates[1:4] == [f32(LR * 0.25), f32(LR * 0.5), f32(LR * 0.75)]
    assert rates[4] == f32(LR)  # the peak, at step warmup_steps: cosine_decay's step 0
    assert rates[5] == decay.cosine_decay(LR, 1, 10)
    assert rates[6] == decay.cosine_decay(LR, 2, 10)


def test_after_decay_steps_the_rate_stays_at_alpha_where_hugging_faces_rises_again():
    warmup, decay_steps = 2, 8
    for step in range(10, 18):
        assert decay.warmup_cosine_decay(LR, step, warmup, decay_steps, alpha=0.1) == f32(f32(LR) * f32(0.1))
        assert decay.warmup_cosine_decay(LR, step, warmup, decay_steps) == 0.0
    assert hf_cosine_with_warmup(LR, 14, warmup, warmup + decay_steps) > 0.0  # documented difference


def test_alpha_is_the_floor_of_the_cosine_part():
    for step in range(3, 15):
        expected = decay.cosine_decay(LR, step - 3, 10, alpha=0.2)
        assert decay.warmup_cosine_decay(LR, step, 3, 10, alpha=0.2) == expected


def test_linear_warmup_of_polynomial_decay_is_hugging_faces_linear_with_warmup():
    warmup, total = 5, 30
    schedule = decay.linear_warmup(
        functools.partial(decay.polynomial_decay, decay_steps=total - warmup, end_learning_rate=0.0), warmup
    )
    for step in range(total + 3):
        assert_close(schedule(LR, step), hf_linear_with_warmup(LR, step, warmup, total))


def test_linear_warmup_ramps_to_the_schedules_first_value_then_delays_the_schedule():
    inner = functools.partial(decay.exponential_decay, decay_steps=10, decay_rate=0.5)
    schedule = decay.linear_warmup(inner, 8)
    for step in range(8):
        assert schedule(LR, step) == f32(inner(LR, 0) * step / 8)
    for step in range(8, 40):
        assert schedule(LR, step) == inner(LR, step - 8)


def test_linear_warmup_ramps_to_a_schedule_that_does_not_start_at_the_rate():
    inner = functools.partial(decay.noisy_linear_cosine_decay, decay_steps=10, seed=3)
    schedule = decay.linear_warmup(inner, 4)
    assert inner(LR, 0) != f32(LR)
    assert schedule(LR, 2) == f32(inner(LR, 0) * 0.5)
    assert schedule(LR, 4) == inner(LR, 0)  # continuous at the boundary


def test_zero_warmup_steps_is_the_schedule_itself():
    inner = functools.partial(decay.cosine_decay, decay_steps=10)
    schedule = decay.linear_warmup(inner, 0)
    assert [schedule(LR, s) for s in range(15)] == [inner(LR, s) for s in range(15)]
    assert [decay.warmup_cosine_decay(LR, s, 0, 10) for s in range(15)] == [inner(LR, s) for s in range(15)]


def test_warmup_cosine_decay_equals_linear_warmup_of_cosine_decay():
    composed = decay.linear_warmup(functools.partial(decay.cosine_decay, decay_steps=20, alpha=0.05), 7)
    for step in range(40):
        assert decay.warmup_cosine_decay(LR, step, 7, 20, alpha=0.05) == composed(LR, step)


@settings(max_examples=60, deadline=None)
@given(learning_rate=st.floats(1e-6, 10.0), warmup=st.integers(1, 10_000), fraction=st.floats(0.0, 1.0))
def test_warmup_is_a_float32_linear_ramp(learning_rate, warmup, fraction):
    step = min(int(fraction * warmup), warmup - 1)
    rate = decay.warmup_cosine_decay(learning_rate, step, warmup, 100)
    assert rate == f32(f32(learning_rate) * step / warmup)
    assert rate <= decay.warmup_cosine_decay(learning_rate, step + 1, warmup, 100)


def test_everything_pickles():
    schedule = decay.linear_warmup(functools.partial(decay.cosine_decay, decay_steps=10), 3)
    assert pickle.loads(pickle.dumps(schedule))(LR, 5) == schedule(LR, 5)
    partial = functools.partial(decay.warmup_cosine_decay, warmup_steps=3, decay_steps=10)
    assert pickle.loads(pickle.dumps(partial))(LR, 5) == partial(LR, 5)


def test_global_step_is_required():
    with pytest.raises(ValueError, match=r"^global_step is required for warmup_cosine_decay\.$"):
        decay.warmup_cosine_decay(LR, None, 3, 10)
    with pytest.raises(ValueError, match=r"^global_step is required for linear_warmup\.$"):
        decay.linear_warmup(functools.partial(decay.cosine_decay, decay_steps=10), 3)(LR, None)


def test_linear_warmup_validates_at_construction():
    with pytest.raises(ValueError, match=r"linear_warmup: `schedule` must be a decay function") as error:
        decay.linear_warmup(0.1, 5)
    assert "0.1" in str(error.value)


@pytest.mark.parametrize("value", [-1, 1.5, True, None, "5", 2**63])
def test_linear_warmup_rejects_bad_warmup_steps(value):
    with pytest.raises(ValueError, match="linear_warmup: `warmup_steps` must be an integer >= 0") as error:
        decay.linear_warmup(functools.partial(decay.cosine_decay, decay_steps=10), value)
    assert repr(value) in str(error.value)


VALID = {"learning_rate": LR, "global_step": 3, "warmup_steps": 5, "decay_steps": 10}


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("learning_rate", -0.1),
        ("learning_rate", math.nan),
        ("global_step", -1),
        ("global_step", 2.0),
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("warmup_steps", False),
        ("decay_steps", 0),
        ("decay_steps", -10),
        ("decay_steps", math.inf),
        ("alpha", -0.1),
        ("alpha", 1.5),
    ],
)
def test_warmup_cosine_decay_rejects_bad_arguments_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        decay.warmup_cosine_decay(**{**VALID, argument: value})
    assert str(error.value).startswith("warmup_cosine_decay: ")
    assert repr(value) in str(error.value)
