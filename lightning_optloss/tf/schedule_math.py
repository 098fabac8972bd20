"""The arithmetic and the argument checks shared by the learning-rate schedules of ``decay`` and ``warmup``.

TF1 computes every schedule in float32, in the graph its optimizer (grappler) has rewritten; the helpers here
round each operation as TF does (``decay``'s docstring says why float64 would not do): float32 rounding, the
C library's ``cosf``/``logf``/``expf``, the step ratio, the cosine and the restart index, and the seeded
normal draw of the noisy schedule. They also check the arguments every schedule shares, with errors naming
the schedule, the argument, what is accepted and the value.
"""

from __future__ import annotations

import ctypes
import math
import random
import struct
from typing import Any

from lightning_optloss.common import validation

_FLOAT32 = struct.Struct("<f")
_TINY = 2.0**-126  # the smallest normal float32


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (what TF holds in a float32 tensor), subnormals to 0.

    Rounding the float64 result of ``+ - * /`` or ``sqrt`` of float32 operands gives exactly the float32
    operation's result (53 >= 2 * 24 + 2 bits). For ``pow`` it gives the correctly rounded value, which
    TF's ``Pow`` kernel returns but for about one case in a hundred (then one ulp apart).
    """
    try:
        rounded = _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:  # beyond float32's range: TF's float32 would be infinite
        return math.copysign(math.inf, value)
    # TF's CPU kernels flush subnormal results to zero.
    return rounded if not -_TINY < rounded < _TINY else 0.0


def _pow32(base: float, exponent: float) -> float:
    """float32 ``base ** exponent`` (both >= 0); infinite where float64 overflows, as float32 would."""
    try:
        return _f32(base**exponent)
    except OverflowError:
        return math.inf


_PI = _f32(math.pi)  # TF's constant_op.constant(math.pi) is float32


def _c_float_function(name: str) -> Any:
    """The C library's float32 function ``name`` (``cosf``...) through ctypes, or None where there is none.

    TF's CPU kernels compute ``cos``, ``log`` and ``exp`` of a float32 scalar with these very functions
    (glibc's, on Linux: checked bit for bit), which are within an ulp of the correctly rounded value but not
    always equal to it; near the end of a cosine, ``1 + cos`` turns that ulp into 1e-4 relative and more.
    """
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, TypeError, AttributeError):  # no C library to ask (e.g. Windows): use math
        return None
    function.restype = ctypes.c_float
    function.argtypes = [ctypes.c_float]
    return function


def _fallback(function: Any) -> Any:
    return lambda value: _f32(function(value))


_C_FUNCTIONS = [_c_float_function(name) for name in ("cosf", "logf", "expf")]
_FROM_C_LIBRARY = all(function is not None for function in _C_FUNCTIONS)  # else all from math
_cos, _log, _exp = _C_FUNCTIONS if _FROM_C_LIBRARY else map(_fallback, (math.cos, math.log, math.exp))

_MAX_STEP = 2**63 - 1  # TF's global step is an int64
_STEP_ACCEPTED = f"an integer in [0, {_MAX_STEP}] (a Python int or a numpy/torch integer scalar)"


def _global_step(owner: str, value: Any) -> int:
    """The global step as an int: TF's "required" error for None, then an integer >= 0."""
    if value is None:
        raise ValueError(f"global_step is required for {owner}.")
    step = validation.as_integer(value)
    if step is None or not 0 <= step <= _MAX_STEP:
        raise validation.invalid(owner, "global_step", _STEP_ACCEPTED, value)
    return step


def _learning_rate(owner: str, value: Any) -> float:
    return validation.real(owner, "learning_rate", value, minimum=0.0)


def _steps(owner: str, argument: str, value: Any) -> float:
    return validation.real(owner, argument, value, minimum=0.0, strictly=True)


def _flag(owner: str, argument: str, value: Any) -> bool:
    return validation.boolean(owner, argument, value)


def _reciprocal(steps: float) -> float:
    """``1 / decay_steps`` in float32: TF1's graph optimizer makes ``x / constant`` ``x * (1 / constant)``."""
    return _f32(1.0 / _f32(steps))


def _ratio(step: int, steps: float) -> float:
    """``global_step / decay_steps`` as TF1 computes it: ``float32(global_step) * float32(1 / decay_steps)``.

    TF's graph optimizer (grappler) rewrites the division by the constant ``decay_steps`` into a
    multiplication by its float32 reciprocal, which is not exact: for ``decay_steps=7``, step 21 gives
    ``3.0000002``, so ``ceil`` is 4 there. Staircase ``floor`` and cycle ``ceil`` are taken of this value
    rather than of an exact integer division so that every boundary falls where TF's does.
    """
    return _f32(_f32(step) * _reciprocal(steps))


def _start(owner: str, learning_rate: Any, global_step: Any) -> tuple[int, float]:
    """The global step, checked, and the learning rate, checked and in float32: every schedule's first two."""
    return _global_step(owner, global_step), _f32(_learning_rate(owner, learning_rate))


def _decay_arguments(
    owner: str, learning_rate: Any, global_step: Any, decay_steps: Any, decay_rate: Any
) -> tuple[int, float, float, float]:
    """``(step, lr, decay_steps, decay_rate)`` of the exponential and inverse time decays, checked in that order."""
    step, lr = _start(owner, learning_rate, global_step)
    steps = _steps(owner, "decay_steps", decay_steps)
    rate = _f32(validation.real(owner, "decay_rate", decay_rate, minimum=0.0))
    return step, lr, steps, rate


def _exponent(owner: str, step: int, steps: float, staircase: Any) -> float:
    """``global_step / decay_steps`` as TF1 computes it, ``floor``-ed with ``staircase=True``."""
    p = _ratio(step, steps)
    if _flag(owner, "staircase", staircase):
        p = math.floor(p)
    return p


def _cosine(lr: float, step: int, steps: float, minimum: float) -> float:
    """TF1's ``cosine_decay`` of float32 ``lr`` over float32 ``steps`` with ``alpha=minimum``, all checked."""
    # As TF1's optimized graph: pi * (step / decay_steps) is step * float32(pi * (1 / decay_steps)), and
    # (1 - alpha) * (0.5 * (1 + cos)) is (1 + cos) * float32((1 - alpha) * 0.5). TF's CosineDecay keeps
    # alpha a Python number, so 1 - alpha is computed in float64 and rounded once.
    angle = _f32(min(_f32(step), steps) * _f32(_PI * _reciprocal(steps)))
    half = _f32(_f32(1.0 - minimum) * 0.5)
    decayed = _f32(_f32(minimum) + _f32(_f32(_f32(_cos(angle)) + 1.0) * half))
    return _f32(lr * decayed)


def _restart(owner: str, step: int, fraction: float, first_steps: float, t_mul: float) -> tuple[int, float]:
    """TF's restart index ``i`` and the fraction completed of restart ``i``, in float32 as TF."""
    if t_mul == 1.0:
        index = math.floor(fraction)
        return index, _f32(fraction - index)
    # The restart index comes from float32 logarithms, as in TF: a float64 log would put some exact
    # restart steps (1 + cf * (t_mul - 1) a power of t_mul) in the previous period, e.g. log(243)/log(3)
    # is 4.999999999999999 in float64 but 5 in float32, where TF restarts.
    shrink = _f32(1.0 - t_mul)
    argument = _f32(1.0 - _f32(fraction * shrink))
    if argument <= 0.0:
        # Only for t_mul < 1: the periods shrink geometrically and all of them together last
        # first_decay_steps / (1 - t_mul) steps; TF returns NaN from there on.
        end = first_steps / (1.0 - t_mul)
        raise validation.invalid(
            owner,
            "global_step",
            f"< first_decay_steps / (1 - t_mul) = {end:g} when t_mul < 1 (all restarts are over there; TF returns NaN)",
            step,
        )
    # The divisions by the constants log(t_mul) and 1 - t_mul are multiplications by float32 reciprocals.
    index = math.floor(_f32(_f32(_log(argument)) * _f32(1.0 / _f32(_log(t_mul)))))
    scale = _pow32(t_mul, index)
    done = _f32(_f32(1.0 - scale) * _f32(1.0 / shrink))
    return index, _f32(_f32(fraction - done) / scale)


def _standard_normal(seed: int, step: int) -> float:
    """A standard normal draw that depends only on ``(seed, step)``: same in every process and Python run.

    ``(seed, step)`` is mapped one-to-one to a natural number (zigzag for the sign of ``seed``, then
    Cantor's pairing), which seeds a :class:`random.Random`; Box-Muller turns its first two ``random()``
    draws into the normal. Python guarantees ``random()``'s sequence for a given int seed across versions
    (unlike ``gauss``), and nothing here depends on ``hash()``. (Box-Muller's ``log`` and ``cos`` are the
    platform's float64 ones; the float32 noise they lead to is the same wherever those are within an ulp.)
    """
    natural = 2 * seed if seed >= 0 else -2 * seed - 1
    key = (natural + step) * (natural + step + 1) // 2 + step
    generator = random.Random(key)
    u1 = generator.random()
    u2 = generator.random()
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
