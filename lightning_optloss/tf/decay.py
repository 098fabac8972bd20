"""TF1's learning-rate schedules (``tf.compat.v1.train.*``) as plain Python functions.

Each function has TF's signature (argument names, order and defaults, the trailing ``name=None``
included), takes Python numbers and returns a Python float. Use one as ``learning_rate_decay_fn`` with
:func:`functools.partial`, which pickles (spawn-based strategies need that)::

    decay_fn = functools.partial(decay.exponential_decay, decay_steps=1000, decay_rate=0.5)
    decay_fn(0.1, global_step)  # -> float

**Float32, as TF1 computes it.** TF turns the Python numbers into float32 tensors and computes every step
in float32, in the graph that TF1's optimizer (grappler) has rewritten: a division by a constant becomes a
multiplication by its float32 reciprocal, and constant factors are multiplied together first (``pi *
(step / decay_steps)`` is ``step * float32(pi * float32(1 / decay_steps))``). These functions do the
same operations in the same order, each rounded to float32 (with :mod:`struct`; ``cos``, ``log`` and
``exp`` are the C library's ``cosf``, ``logf``, ``expf``, which TF's kernels call), and return the float32
result as a Python float: ``0.1`` at step 0 reads ``0.10000000149011612``, as TF's tensor does. On Linux
the values are bit-identical to TF 2.21's ``tf.compat.v1.train.*`` evaluated in a graph session (one
schedule per graph, as in training), but for rare 1-ulp differences of ``pow``. Float64 would not do:

- near the end of a cosine the formula is ``1 + cos(x)`` with ``cos(x)`` close to ``-1``: one float32 ulp
  of ``cos`` or of ``x`` there is a large part of the result (5.5e-5 relative at step 99 of 100, more
  towards the end of longer schedules), so float64 values are that far from TF's;
- the staircase, cycle and restart boundaries (``floor``/``ceil`` of the step ratio, the restart index
  of :func:`cosine_decay_restarts`, which TF computes with logarithms) must take TF's branch. TF's ratio
  ``21 * float32(1 / 7)`` is ``3.0000002``, so ``polynomial_decay(..., decay_steps=7, cycle=True)`` starts
  its fourth cycle at step 21, not 22; and in float64 ``log(243) / log(3)`` is ``4.999999999999999``, so
  ``cosine_decay_restarts(lr, 121, 1, t_mul=3.0)`` would give ``0`` where TF restarts at ``lr``.

(TF2 in eager mode skips grappler, so its values differ from TF1's by an ulp here and there, and so at a
few of these boundaries: there ``polynomial_decay`` with ``decay_steps=7, cycle=True`` gives
``end_learning_rate`` at step 21.)

``name`` is accepted for signature compatibility and unused. Arguments are checked on every call
(cheaply): errors are ``ValueError`` naming the function, the argument, what is accepted and the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_optloss.common import validation
from lightning_optloss.tf.schedule_math import (
    _FROM_C_LIBRARY as _FROM_C_LIBRARY,
)
from lightning_optloss.tf.schedule_math import (
    _PI,
    _cos,
    _cosine,
    _decay_arguments,
    _exp,
    _exponent,
    _f32,
    _flag,
    _pow32,
    _ratio,
    _reciprocal,
    _restart,
    _standard_normal,
    _start,
    _steps,
)

# Beyond TF, in their own module and reachable here too (``_linear_warmup`` for pickles made before the split).
from lightning_optloss.tf.warmup import _linear_warmup as _linear_warmup
from lightning_optloss.tf.warmup import linear_warmup, warmup_cosine_decay

__all__ = [
    "cosine_decay",
    "cosine_decay_restarts",
    "exponential_decay",
    "inverse_time_decay",
    "linear_cosine_decay",
    "linear_warmup",
    "natural_exp_decay",
    "noisy_linear_cosine_decay",
    "piecewise_constant",
    "polynomial_decay",
    "warmup_cosine_decay",
]


def exponential_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    decay_rate: float,
    staircase: bool = False,
    name: str | None = None,
) -> float:
    """Exponential decay of the learning rate (``tf.compat.v1.train.exponential_decay``).

    ::

        decayed_learning_rate = learning_rate * decay_rate ^ (global_step / decay_steps)

    With ``staircase=True``, ``global_step / decay_steps`` is an integer division (``floor``), and the rate
    drops every ``decay_steps`` steps.

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0. See the formula.
        decay_rate: The decay rate, a finite number >= 0.
        staircase: If True, decay at discrete intervals.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    Examples:
        >>> from lightning_optloss import decay
        >>> decay.exponential_decay(0.1, 1000, decay_steps=1000, decay_rate=0.5)  # float32, as TF
        0.05000000074505806
        >>> decay.exponential_decay(0.1, 999, decay_steps=1000, decay_rate=0.5, staircase=True)
        0.10000000149011612

        As a ``learning_rate_decay_fn``, bind everything but the rate and the step (it pickles, a lambda does not):

        >>> import functools
        >>> schedule = functools.partial(decay.exponential_decay, decay_steps=1000, decay_rate=0.5)
        >>> schedule(0.1, 2000)
        0.02500000037252903
    """
    owner = "exponential_decay"
    step, lr, steps, rate = _decay_arguments(owner, learning_rate, global_step, decay_steps, decay_rate)
    return _f32(lr * _pow32(rate, _exponent(owner, step, steps, staircase)))


def piecewise_constant(
    x: int | float,
    boundaries: Sequence[int | float],
    values: Sequence[float],
    name: str | None = None,
) -> float:
    """Piecewise constant from boundaries and interval values (``tf.compat.v1.train.piecewise_constant``).

    ::

        values[0]   if x <= boundaries[0]
        values[i]   if boundaries[i - 1] < x <= boundaries[i]
        values[-1]  if x > boundaries[-1]

    Example: a rate of 1.0 for the first 100001 steps, 0.5 for the next 10000 and 0.1 after:
    ``piecewise_constant(global_step, [100000, 110000], [1.0, 0.5, 0.1])``.

    Unlike the other schedules it takes no ``learning_rate``; as a ``learning_rate_decay_fn`` wrap it,
    e.g. ``lambda lr, step: piecewise_constant(step, boundaries, values)`` in a module-level function.

    Args:
        x: The global step (or any finite number): an integer, or a finite float.
        boundaries: Strictly increasing finite numbers (may be empty).
        values: Finite numbers >= 0, one more than ``boundaries``.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The value for ``x``'s interval, a float (TF's float32 value).

    Raises:
        ValueError: if ``x`` is None, or the boundaries or values are not as described. TF also requires
            ``x`` and the boundaries to have the same dtype; Python compares ints and floats exactly, so
            mixing them is accepted here.

    Examples:
        >>> from lightning_optloss import decay
        >>> [decay.piecewise_constant(step, [1000, 2000], [0.1, 0.01, 0.001]) for step in (1000, 1001, 2001)]
        [0.10000000149011612, 0.009999999776482582, 0.0010000000474974513]
    """
    owner = "piecewise_constant"
    if x is None:
        raise ValueError(f"x is required for {owner}.")
    point = validation.as_integer(x)
    if point is None and (isinstance(x, bool) or not validation.is_real(x) or not math.isfinite(x)):
        raise validation.invalid(owner, "x", "an integer or a finite number", x)
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise validation.invalid(owner, "boundaries", "a list of strictly increasing numbers", boundaries)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise validation.invalid(owner, "values", "a list of numbers >= 0", values)
    if len(values) != len(boundaries) + 1:
        raise validation.invalid(
            owner,
            "values",
            f"a list of len(boundaries) + 1 = {len(boundaries) + 1} numbers",
            values,
        )
    for i, boundary in enumerate(boundaries):
        validation.real(owner, f"boundaries[{i}]", boundary)
        if i and not boundary > boundaries[i - 1]:
            raise validation.invalid(owner, "boundaries", "strictly increasing", boundaries)
    for i, value in enumerate(values):
        validation.real(owner, f"values[{i}]", value, minimum=0.0)
    at = float(x) if point is None else point
    index = len(boundaries)
    for i, boundary in enumerate(boundaries):
        if at <= boundary:
            index = i
            break
    return _f32(float(values[index]))


def polynomial_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    end_learning_rate: float = 0.0001,
    power: float = 1.0,
    cycle: bool = False,
    name: str | None = None,
) -> float:
    """Polynomial decay of the learning rate (``tf.compat.v1.train.polynomial_decay``).

    ::

        global_step = min(global_step, decay_steps)
        decayed_learning_rate = (learning_rate - end_learning_rate) *
                                (1 - global_step / decay_steps) ^ (power) +
                                end_learning_rate

    With ``cycle=True``, ``decay_steps`` is replaced by the first multiple of it that is not smaller than
    ``global_step`` (``decay_steps * ceil(global_step / decay_steps)``, and ``decay_steps`` itself at step
    0), so the rate jumps back up after each ``decay_steps`` steps.

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0. See the formula.
        end_learning_rate: The final learning rate, a finite number >= 0.
        power: The power of the polynomial, a finite number >= 0. Defaults to linear, 1.0.
        cycle: Whether to cycle beyond ``decay_steps``.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    Examples:
        >>> from lightning_optloss import decay
        >>> decay.polynomial_decay(0.1, 500, decay_steps=1000, end_learning_rate=0.01)  # halfway from 0.1 to 0.01
        0.054999999701976776
    """
    owner = "polynomial_decay"
    step, lr = _start(owner, learning_rate, global_step)
    steps = _f32(_steps(owner, "decay_steps", decay_steps))
    end = _f32(validation.real(owner, "end_learning_rate", end_learning_rate, minimum=0.0))
    exponent = _f32(validation.real(owner, "power", power, minimum=0.0))
    at = _f32(step)
    if _flag(owner, "cycle", cycle):
        multiplier = 1.0 if at == 0 else math.ceil(_ratio(step, steps))
        p = _f32(at / _f32(steps * multiplier))  # not a constant: a true float32 division
    else:
        p = _f32(min(at, steps) * _reciprocal(steps))
    remaining = _f32(1.0 - p)
    scale = _f32(lr - end)
    if exponent == 3.0:  # grappler's rewrite of pow(x, 3) with the constant folded in: x**2 * (scale * x)
        return _f32(_f32(_f32(remaining * remaining) * _f32(scale * remaining)) + end)
    return _f32(_f32(_pow32(remaining, exponent) * scale) + end)


def natural_exp_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    decay_rate: float,
    staircase: bool = False,
    name: str | None = None,
) -> float:
    """Natural exponential decay of the learning rate (``tf.compat.v1.train.natural_exp_decay``).

    ::

        decayed_learning_rate = learning_rate * exp(-decay_rate * global_step / decay_steps)

    or, with ``staircase=True``::

        decayed_learning_rate = learning_rate * exp(-decay_rate * floor(global_step / decay_steps))

    As TF, this is computed as ``learning_rate * exp(-decay_rate) ^ (global_step / decay_steps)`` in
    float32 (``exp(-decay_rate)`` rounded to float32 first), which differs from the formula above by a few
    float32 ulps after many decay periods.

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0: how often to apply decay.
        decay_rate: The decay rate, a finite number >= 0.
        staircase: Whether to decay in a discrete staircase rather than continuously.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.
    """
    owner = "natural_exp_decay"
    step, lr, steps, rate = _decay_arguments(owner, learning_rate, global_step, decay_steps, decay_rate)
    base = _f32(_exp(-rate))
    return _f32(lr * _pow32(base, _exponent(owner, step, steps, staircase)))


def inverse_time_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    decay_rate: float,
    staircase: bool = False,
    name: str | None = None,
) -> float:
    """Inverse time decay of the learning rate (``tf.compat.v1.train.inverse_time_decay``).

    ::

        decayed_learning_rate = learning_rate / (1 + decay_rate * global_step / decay_steps)

    or, with ``staircase=True``::

        decayed_learning_rate = learning_rate / (1 + decay_rate * floor(global_step / decay_steps))

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0: how often to apply decay.
        decay_rate: The decay rate, a finite number >= 0.
        staircase: Whether to decay in a discrete staircase rather than continuously.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.
    """
    owner = "inverse_time_decay"
    step, lr, steps, rate = _decay_arguments(owner, learning_rate, global_step, decay_steps, decay_rate)
    if _flag(owner, "staircase", staircase):
        scaled = _f32(rate * math.floor(_ratio(step, steps)))
    else:  # rate * (step * (1 / decay_steps)), the constants multiplied first by grappler
        scaled = _f32(_f32(step) * _f32(rate * _reciprocal(steps)))
    return _f32(lr / _f32(1.0 + scaled))


def cosine_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    alpha: float = 0.0,
    name: str | None = None,
) -> float:
    """Cosine decay of the learning rate (``tf.compat.v1.train.cosine_decay``).

    ::

        global_step = min(global_step, decay_steps)
        cosine_decay = 0.5 * (1 + cos(pi * global_step / decay_steps))
        decayed = (1 - alpha) * cosine_decay + alpha
        decayed_learning_rate = learning_rate * decayed

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0: the number of steps to decay over.
        alpha: The minimum learning rate as a fraction of ``learning_rate``, in ``[0, 1]``.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    Examples:
        >>> from lightning_optloss import decay
        >>> round(decay.cosine_decay(0.1, 500, decay_steps=1000), 6), decay.cosine_decay(0.1, 5000, decay_steps=1000)
        (0.05, 0.0)

    References:
        Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
        https://openreview.net/forum?id=Skq89Scxx
    """
    owner = "cosine_decay"
    step, lr = _start(owner, learning_rate, global_step)
    steps = _f32(_steps(owner, "decay_steps", decay_steps))
    minimum = validation.real(owner, "alpha", alpha, minimum=0.0, maximum=1.0)
    return _cosine(lr, step, steps, minimum)


def cosine_decay_restarts(
    learning_rate: float,
    global_step: int,
    first_decay_steps: float,
    t_mul: float = 2.0,
    m_mul: float = 1.0,
    alpha: float = 0.0,
    name: str | None = None,
) -> float:
    """Cosine decay with warm restarts (SGDR) (``tf.compat.v1.train.cosine_decay_restarts``).

    The multiplier first decays from 1 to ``alpha`` over ``first_decay_steps`` steps, as in
    :func:`cosine_decay`. Then a warm restart is performed: period ``i`` (from 0) lasts
    ``first_decay_steps * t_mul ** i`` steps and starts at ``m_mul ** i`` times the learning rate::

        completed_fraction = global_step / first_decay_steps
        i = floor(log(1 - completed_fraction * (1 - t_mul)) / log(t_mul))    # floor(...) if t_mul == 1
        completed_fraction = (completed_fraction - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i
        cosine_decayed = 0.5 * m_mul ** i * (1 + cos(pi * completed_fraction))
        decayed = (1 - alpha) * cosine_decayed + alpha
        decayed_learning_rate = learning_rate * decayed

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        first_decay_steps: A number > 0: the length of the first period.
        t_mul: A finite number > 0: each period lasts ``t_mul`` times the previous one.
        m_mul: A finite number >= 0: each period starts at ``m_mul`` times the previous one's rate.
        alpha: The minimum learning rate as a fraction of ``learning_rate``, in ``[0, 1]``.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range. Difference from TF: with
            ``t_mul < 1`` the periods shrink and all of them end at step
            ``first_decay_steps / (1 - t_mul)``; from there TF returns NaN, this raises.

    References:
        Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
        https://openreview.net/forum?id=Skq89Scxx
    """
    owner = "cosine_decay_restarts"
    step, lr = _start(owner, learning_rate, global_step)
    first_steps = _steps(owner, "first_decay_steps", first_decay_steps)
    t_mul = _f32(validation.real(owner, "t_mul", t_mul, minimum=0.0, strictly=True))
    if not 0.0 < t_mul < math.inf:  # beyond float32's range
        raise validation.invalid(owner, "t_mul", "a finite number > 0", t_mul)
    m_mul = _f32(validation.real(owner, "m_mul", m_mul, minimum=0.0))
    minimum = _f32(validation.real(owner, "alpha", alpha, minimum=0.0, maximum=1.0))
    index, fraction = _restart(owner, step, _ratio(step, first_steps), first_steps, t_mul)
    # (1 - alpha) * ((0.5 * m_mul**i) * (1 + cos)) is (1 + cos) * (float32((1 - alpha) * 0.5) * m_mul**i)
    # in TF1's optimized graph.
    start = _f32(_f32(_f32(1.0 - minimum) * 0.5) * _pow32(m_mul, index))
    cosine = _f32(_f32(_f32(_cos(_f32(_PI * fraction))) + 1.0) * start)
    return _f32(lr * _f32(minimum + cosine))


def _linear_cosine(
    owner: str,
    learning_rate: Any,
    global_step: Any,
    decay_steps: Any,
    num_periods: Any,
    alpha: Any,
    beta: Any,
    noise: tuple[Any, Any, Any] | None,
) -> float:
    """linear_cosine_decay, and noisy_linear_cosine_decay when ``noise`` is (variance, decay, seed)."""
    step, lr = _start(owner, learning_rate, global_step)
    steps = _f32(_steps(owner, "decay_steps", decay_steps))
    periods = _f32(validation.real(owner, "num_periods", num_periods, minimum=0.0))
    alpha = _f32(validation.real(owner, "alpha", alpha, minimum=0.0))
    beta = _f32(validation.real(owner, "beta", beta, minimum=0.0))
    at = min(_f32(step), steps)
    reciprocal = _reciprocal(steps)
    linear = _f32(alpha + _f32(_f32(steps - at) * reciprocal))
    if noise is not None:
        variance0, variance_decay, seed = noise
        variance0 = _f32(validation.real(owner, "initial_variance", variance0, minimum=0.0))
        variance_decay = _f32(validation.real(owner, "variance_decay", variance_decay, minimum=0.0))
        seed_value = validation.as_integer(seed)
        if seed_value is None:
            raise validation.invalid(owner, "seed", "an integer", seed)
        variance = _f32(variance0 / _pow32(_f32(1.0 + at), variance_decay))
        std = _f32(math.sqrt(variance))
        # TF1's graph adds alpha to the linear part before the noise.
        linear = _f32(linear + _f32(std * _f32(_standard_normal(seed_value, step))))
    # pi * (2 * num_periods * (step / decay_steps)) is step * float32(pi * (2 * num_periods / decay_steps))
    angle = _f32(at * _f32(_PI * _f32(_f32(2.0 * periods) * reciprocal)))
    cosine = _f32(_f32(_f32(_cos(angle)) + 1.0) * 0.5)
    return _f32(lr * _f32(beta + _f32(linear * cosine)))


def linear_cosine_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    num_periods: float = 0.5,
    alpha: float = 0.0,
    beta: float = 0.001,
    name: str | None = None,
) -> float:
    """Linear cosine decay of the learning rate (``tf.compat.v1.train.linear_cosine_decay``).

    More aggressive than :func:`cosine_decay`; larger initial rates can typically be used. ::

        global_step = min(global_step, decay_steps)
        linear_decay = (decay_steps - global_step) / decay_steps
        cosine_decay = 0.5 * (1 + cos(pi * 2 * num_periods * global_step / decay_steps))
        decayed = (alpha + linear_decay) * cosine_decay + beta
        decayed_learning_rate = learning_rate * decayed

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0: the number of steps to decay over.
        num_periods: Number of periods in the cosine part, a finite number >= 0.
        alpha: See the formula; a finite number >= 0.
        beta: See the formula; a finite number >= 0.
        name: Accepted for signature compatibility with TF; unused.

    Returns:
        The decayed learning rate, a float (TF's float32 value).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    References:
        Bello et al., "Neural Optimizer Search with Reinforcement Learning", ICML 2017,
        http://proceedings.mlr.press/v70/bello17a.html
    """
    return _linear_cosine(
        "linear_cosine_decay", learning_rate, global_step, decay_steps, num_periods, alpha, beta, None
    )


def noisy_linear_cosine_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: float,
    initial_variance: float = 1.0,
    variance_decay: float = 0.55,
    num_periods: float = 0.5,
    alpha: float = 0.0,
    beta: float = 0.001,
    name: str | None = None,
    seed: int = 0,
) -> float:
    """Noisy linear cosine decay of the learning rate (``tf.compat.v1.train.noisy_linear_cosine_decay``).

    ::

        global_step = min(global_step, decay_steps)
        linear_decay = (decay_steps - global_step) / decay_steps
        cosine_decay = 0.5 * (1 + cos(pi * 2 * num_periods * global_step / decay_steps))
        decayed = (alpha + linear_decay + eps_t) * cosine_decay + beta
        decayed_learning_rate = learning_rate * decayed

    where ``eps_t`` is 0-centered gaussian noise with variance
    ``initial_variance / (1 + global_step) ** variance_decay``.

    Difference from TF (deliberate): TF draws ``eps_t`` with an unseeded ``random_normal`` on every call.
    Here ``eps_t = std * z`` where ``z`` is a standard normal that depends only on ``(seed, global_step)``
    (the same in every process and Python run), so the rate is a deterministic function of the step: every
    data-parallel replica uses the same rate, and a resumed run repeats the uninterrupted one. ``seed`` is
    an extra keyword, after ``name``. With ``initial_variance=0`` this is :func:`linear_cosine_decay`.

    As in TF, the noise is not clipped, so the rate can be negative (at the default ``initial_variance=1``
    it often is in the first steps).

    Args:
        learning_rate: The initial learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        decay_steps: A number > 0: the number of steps to decay over.
        initial_variance: The initial variance of the noise, a finite number >= 0.
        variance_decay: The decay of the noise's variance, a finite number >= 0.
        num_periods: Number of periods in the cosine part, a finite number >= 0.
        alpha: See the formula; a finite number >= 0.
        beta: See the formula; a finite number >= 0.
        name: Accepted for signature compatibility with TF; unused.
        seed: An integer selecting the noise sequence (not in TF).

    Returns:
        The decayed learning rate, a float (float32 precision, as TF's).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    References:
        Bello et al., "Neural Optimizer Search with Reinforcement Learning", ICML 2017,
        http://proceedings.mlr.press/v70/bello17a.html
    """
    return _linear_cosine(
        "noisy_linear_cosine_decay",
        learning_rate,
        global_step,
        decay_steps,
        num_periods,
        alpha,
        beta,
        (initial_variance, variance_decay, seed),
    )
