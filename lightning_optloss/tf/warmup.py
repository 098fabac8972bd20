"""Beyond TF: a linear warmup before any schedule, and warmup then cosine decay (not in TF1).

The convention of Hugging Face's ``get_*_schedule_with_warmup``, in float32 as TF1's schedules. Both are also
reachable as ``decay.linear_warmup`` and ``decay.warmup_cosine_decay``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning_optloss.common import validation
from lightning_optloss.tf.schedule_math import _MAX_STEP, _cosine, _f32, _global_step, _start, _steps

__all__ = ["linear_warmup", "warmup_cosine_decay"]

_WARMUP_ACCEPTED = "an integer >= 0 (a Python int or a numpy/torch integer scalar)"


def _warmup_steps(owner: str, value: Any) -> int:
    steps = validation.as_integer(value)
    if steps is None or not 0 <= steps <= _MAX_STEP:
        raise validation.invalid(owner, "warmup_steps", _WARMUP_ACCEPTED, value)
    return steps


def _ramp(peak: float, step: int, warmup_steps: int) -> float:
    """``peak * step / warmup_steps`` rounded once to float32 (float64 holds ``step / warmup_steps`` well)."""
    return _f32(peak * (step / warmup_steps))


def _linear_warmup(
    learning_rate: float, global_step: int, schedule: Callable[[float, int], float], warmup_steps: int
) -> float:
    step = _global_step("linear_warmup", global_step)
    if step < warmup_steps:
        return _ramp(float(schedule(learning_rate, 0)), step, warmup_steps)
    return float(schedule(learning_rate, step - warmup_steps))


def linear_warmup(schedule: Callable[[float, int], float], warmup_steps: int) -> Callable[[float, int], float]:
    """``schedule`` preceded by a linear warmup of ``warmup_steps`` steps: a ``learning_rate_decay_fn``.

    Hugging Face's convention (``get_linear_schedule_with_warmup``, ``get_cosine_schedule_with_warmup``...)::

        rate(step) = schedule(lr, 0) * step / warmup_steps     if step < warmup_steps
        rate(step) = schedule(lr, step - warmup_steps)         otherwise

    so the rate is 0 at step 0 (the first update does not move the weights), rises by equal increments, and
    reaches ``schedule(lr, 0)`` at step ``warmup_steps``, where ``schedule`` starts, delayed by the warmup.
    Hugging Face ramps to ``lr`` itself; every schedule of :mod:`.decay` but the noisy one has
    ``schedule(lr, 0) == lr``, so the two agree, and ramping to ``schedule(lr, 0)`` is continuous for any.
    ``warmup_steps=0`` is ``schedule`` unchanged. Warmup values are float32, as the schedules'.

    Args:
        schedule: A decay function ``(learning_rate, global_step) -> float``, e.g. a ``functools.partial``
            of one of :mod:`.decay`'s schedules. It must pickle for ``ddp_spawn`` (a lambda does not).
        warmup_steps: The number of warmup steps, an integer >= 0.

    Returns:
        A ``functools.partial`` of a module-level function (it pickles when ``schedule`` does):
        ``fn(learning_rate, global_step) -> float``.

    Examples:
        >>> import functools
        >>> from lightning_optloss import decay
        >>> halving = functools.partial(decay.exponential_decay, decay_steps=1000, decay_rate=0.5)
        >>> schedule = decay.linear_warmup(halving, warmup_steps=100)
        >>> [round(schedule(0.1, step), 6) for step in (0, 50, 100, 1100)]  # 0, half, the peak, one half-life later
        [0.0, 0.05, 0.1, 0.05]

    References:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017, section 2.2,
        https://arxiv.org/abs/1706.02677; ``transformers.optimization`` (Hugging Face) for the convention.
    """
    owner = "linear_warmup"
    if not callable(schedule):
        raise validation.invalid(owner, "schedule", "a decay function (learning_rate, global_step) -> float", schedule)
    return functools.partial(_linear_warmup, schedule=schedule, warmup_steps=_warmup_steps(owner, warmup_steps))


def warmup_cosine_decay(
    learning_rate: float,
    global_step: int,
    warmup_steps: int,
    decay_steps: float,
    alpha: float = 0.0,
    name: str | None = None,
) -> float:
    """Linear warmup over ``warmup_steps``, then :func:`~lightning_optloss.tf.decay.cosine_decay` over ``decay_steps``.

    ::

        rate(step) = learning_rate * step / warmup_steps                          if step < warmup_steps
        rate(step) = cosine_decay(learning_rate, step - warmup_steps, decay_steps, alpha)   otherwise

    With ``alpha=0`` and ``decay_steps = num_training_steps - warmup_steps`` this is Hugging Face's
    ``get_cosine_schedule_with_warmup`` up to ``num_training_steps``; after that Hugging Face's cosine
    rises again while this one stays at ``alpha * learning_rate`` (TF's ``cosine_decay`` stops at
    ``decay_steps``). The same as ``linear_warmup(partial(cosine_decay, decay_steps=..., alpha=...),
    warmup_steps)``, with TF's signature style.

    Args:
        learning_rate: The peak learning rate, a finite number >= 0.
        global_step: The global step, an integer >= 0 (a Python int or a numpy/torch integer scalar).
        warmup_steps: The number of warmup steps, an integer >= 0.
        decay_steps: A number > 0: the number of steps of the cosine after the warmup.
        alpha: The minimum learning rate as a fraction of ``learning_rate``, in ``[0, 1]``.
        name: Accepted for signature consistency with the TF schedules; unused.

    Returns:
        The learning rate, a float (float32 precision).

    Raises:
        ValueError: if ``global_step`` is None, or an argument is out of range.

    Examples:
        >>> import functools
        >>> from lightning_optloss import decay
        >>> schedule = functools.partial(decay.warmup_cosine_decay, warmup_steps=100, decay_steps=900)
        >>> [round(schedule(0.1, step), 6) for step in (50, 100, 550, 1000)]
        [0.05, 0.1, 0.05, 0.0]

    References:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017,
        https://arxiv.org/abs/1706.02677; Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
        Restarts", ICLR 2017, https://openreview.net/forum?id=Skq89Scxx
    """
    owner = "warmup_cosine_decay"
    step, lr = _start(owner, learning_rate, global_step)
    warmup = _warmup_steps(owner, warmup_steps)
    steps = _f32(_steps(owner, "decay_steps", decay_steps))
    minimum = validation.real(owner, "alpha", alpha, minimum=0.0, maximum=1.0)
    if step < warmup:
        return _ramp(lr, step, warmup)
    return _cosine(lr, step - warmup, steps, minimum)
