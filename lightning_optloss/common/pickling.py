"""A clear error, naming the argument, when a callable argument does not pickle where a spawn start needs it.

Spawn-based strategies (``strategy="ddp_spawn"``, ``"ddp_notebook"`` is fork-based and exempt) pickle the
Trainer, its callbacks and the LightningModule to send them to each worker process, before any hook runs there.
A lambda or a function defined inside another function does not pickle, and Python's error
(``AttributeError: Can't pickle local object 'main.<locals>.<lambda>'``) names neither the argument nor a fix.

:func:`checked_state` wraps the named entries of an object's ``__getstate__`` so that pickling one that does not
pickle raises :class:`TypeError` naming it; copies (``copy.copy``/``copy.deepcopy``) are not affected, and
:func:`unwrapped_state` undoes the wrapping in ``__setstate__``.

>>> import pickle
>>> state = checked_state("OptimizeLoss", {"clip_gradients": lambda norms: 1.0}, ["clip_gradients"])
>>> pickle.dumps(state)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
TypeError: OptimizeLoss: `clip_gradients` does not pickle ...
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterable
from typing import Any

from lightning_optloss.common.validation import show


class _MustPickle:
    """One argument's value in a pickled state: pickles as the value itself, or raises naming the argument."""

    __slots__ = ("name", "owner", "value")

    def __init__(self, owner: str, name: str, value: Any) -> None:
        self.owner = owner
        self.name = name
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        try:
            pickle.dumps(self.value)
        except Exception as error:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
            raise TypeError(
                f"{self.owner}: `{self.name}` does not pickle ({type(error).__name__}: {error}), and spawn-based "
                f'strategies (strategy="ddp_spawn", or start_method="spawn") pickle it to send it to each worker '
                f"process. Got {show(self.value)}: use a function defined at module level, or a "
                "functools.partial of one, instead of a lambda or a function defined inside another."
            ) from error
        return _identity, (self.value,)

    def __deepcopy__(self, memo: dict[int, Any]) -> _MustPickle:
        return _MustPickle(self.owner, self.name, copy.deepcopy(self.value, memo))


def _identity(value: Any) -> Any:
    return value


def checked_state(owner: str, state: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``state`` with the values of ``names`` (those present and not None) wrapped to pickle with a clear error."""
    checked = dict(state)
    for name in names:
        if checked.get(name) is not None:
            checked[name] = _MustPickle(owner, name.lstrip("_"), checked[name])
    return checked


def unwrapped_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the wrapping of :func:`checked_state` undone (after a copy; unpickling undoes it itself)."""
    return {key: value.value if isinstance(value, _MustPickle) else value for key, value in state.items()}
