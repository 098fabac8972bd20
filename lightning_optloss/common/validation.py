"""Argument checks shared by the callback, the helper and the transforms.

Every error names who complained, the argument, what was accepted and what was given, so a user reads one
line and knows what to change: ``OptimizeLoss: `clip_gradients` must be a positive float ...; got -1.0.``
All of them are ``ValueError`` (as TF's ``optimize_loss`` raises), raised at construction or ``setup``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any

_MAX_SHOWN = 200


def show(value: Any) -> str:
    """``repr`` of a value for an error message, shortened, with its type when the repr does not say it."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    if isinstance(value, (bool, int, float, str, type(None), list, tuple, dict)):
        return text
    return f"{text} (type {type(value).__qualname__})"


def invalid(owner: str, argument: str, accepted: str, value: Any) -> ValueError:
    """The error for ``argument`` of ``owner`` given ``value``, where ``accepted`` says what would do."""
    return ValueError(f"{owner}: `{argument}` must be {accepted}; got {show(value)}.")


def is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` in Python, never a rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (``operator.index``: Python, numpy or torch) other than a bool,
    else None.

    >>> as_integer(3), as_integer(True), as_integer(2.0)
    (3, None, None)
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def integer(owner: str, argument: str, value: Any, *, minimum: int | None = None, below: int | None = None) -> int:
    """``value`` as an int in ``[minimum, below)``, or the error naming ``argument``.

    Accepts Python, numpy and torch integer scalars, never a bool or a float.
    """
    bounds = [f">= {minimum}" if minimum is not None else "", f"< {below}" if below is not None else ""]
    accepted = " ".join(["an integer", " and ".join(part for part in bounds if part)]).strip()
    number = as_integer(value)
    if number is None or (minimum is not None and number < minimum) or (below is not None and number >= below):
        raise invalid(owner, argument, accepted, value)
    return number


def real(
    owner: str,
    argument: str,
    value: Any,
    *,
    minimum: float | None = None,
    strictly: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite float within ``[minimum, maximum]`` (``(minimum, ...`` when ``strictly``)."""
    low = "" if minimum is None else (f"> {minimum}" if strictly else f">= {minimum}")
    high = "" if maximum is None else f"<= {maximum}"
    bounds = " and ".join(part for part in (low, high) if part)
    accepted = "a finite number" + (f" {bounds}" if bounds else "")
    if not is_real(value) or not math.isfinite(float(value)):
        raise invalid(owner, argument, accepted, value)
    number = float(value)
    too_low = minimum is not None and (number <= minimum if strictly else number < minimum)
    too_high = maximum is not None and number > maximum
    if too_low or too_high:
        raise invalid(owner, argument, accepted, value)
    return number


def boolean(owner: str, argument: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(owner, argument, "True or False", value)
    return value


def choice(owner: str, argument: str, value: Any, accepted: Iterable[str]) -> str:
    """``value`` if it is one of ``accepted``, else an error with a "did you mean" hint."""
    options = list(accepted)
    if isinstance(value, str) and value in options:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
        if not close:
            lowered = {option.lower(): option for option in options}
            close = [lowered[value.lower()]] if value.lower() in lowered else []
        if close:
            hint = f" Did you mean {close[0]!r}?"
    error = invalid(owner, argument, "one of " + ", ".join(repr(o) for o in options), value)
    raise ValueError(str(error) + hint)


def accepts_keyword(fn: Callable[..., Any], keyword: str) -> bool:
    """Whether ``fn`` can be called with ``keyword=...`` (named, keyword-only, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if parameter.name == keyword and parameter.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return True
    return False


def callable_name(fn: Any) -> str:
    """A readable name for a user callable in error messages (``functools.partial`` unwrapped)."""
    inner = getattr(fn, "func", fn)
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{name} (a functools.partial)" if inner is not fn else name


def first_names(names: Iterable[str], limit: int = 12) -> str:
    """The first ``limit`` names quoted, for messages: ``'a', 'b', ... (30 in all)`` (empty for none).

    >>> first_names(["a", "b", "c"], limit=2)
    "'a', 'b', ... (3 in all)"
    """
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def unmatched_pattern(owner: str, argument: str, pattern: str, names: Iterable[str]) -> ValueError:
    """The error for a parameter-name glob in ``argument`` that matches none of ``names`` (a typo, usually).

    Names the closest parameter names (:func:`difflib.get_close_matches`), else the first few names.
    """
    names = list(names)
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    if close:
        hint = "close names: " + ", ".join(repr(name) for name in close)
    else:
        hint = "the names are " + (first_names(names) or "none")
    return ValueError(
        f"{owner}: `{argument}` has the pattern {pattern!r}, which matches no parameter name ({hint}). "
        "Patterns are fnmatch globs on names such as 'encoder.layer1.weight' ('*' also matches dots)."
    )
