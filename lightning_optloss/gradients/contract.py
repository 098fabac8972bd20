"""The clip contract, and the small types the gradient transforms share with the strategies.

Every clipping that :class:`~lightning_optloss.OptimizeLoss` applies is a :class:`ClipTransform`: the package's
own (:class:`GlobalNormClipping`, :class:`GroupClipping`, ``AdaptiveClipping``, ``UnitwiseClipping``,
``AutoClipping``) and a user's TF-style callable, wrapped once by :func:`as_clip_transform`. The pipeline asks
the object what it needs (:attr:`ClipTransform.keywords`, :attr:`ClipTransform.needs_whole_rows`) instead of
inspecting signatures or types.

:class:`Layout` and :data:`~lightning_optloss.gradients.norms.AllReduceSum` are the two things a transform
needs to know about sharding; the strategies (:mod:`lightning_optloss.distributed`) implement them, so
nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from lightning_optloss.common import validation
from lightning_optloss.gradients.norms import AllReduceSum, parameter_norms

GradsAndVars = list[tuple[Tensor | None, Tensor]]
"""TF's ``grads_and_vars``: ``(gradient or None, parameter)`` pairs."""

CLIP_KEYWORDS = frozenset({"global_step", "global_norm", "names", "all_reduce_sum"})
"""The keywords a user's clip callable may accept; OptimizeLoss passes each one it accepts."""

PIPELINE_KEYWORDS = CLIP_KEYWORDS | {"norms", "multipliers"}
"""All keywords the pipeline can pass: the user-facing ones, plus ``norms`` (per-parameter gradient norms,
reduced over shards, a 1-d tensor) and ``multipliers`` (TF's gradient multipliers, not yet applied, one float
per pair: a transform declaring it applies them in its own pass)."""


class Layout(Protocol):
    """Where this process's shard of a gradient sits in the full gradient (implemented by the strategies)."""

    @property
    def full_shape(self) -> torch.Size: ...

    @property
    def group(self) -> Any: ...

    def local_part(self, full: Tensor) -> Tensor:
        """The part of ``full`` (shaped like the whole parameter) that this process holds."""
        ...

    def flat_range(self) -> tuple[int, int] | None:
        """``(start, stop)`` of this shard in the flattened full parameter, None unless it is one range."""
        ...


class ClipTransform(Protocol):
    """What OptimizeLoss needs of a clipping: called with TF's pairs and the keywords it declares.

    ``__call__(grads_and_vars, **keywords)`` scales the gradients in place (or returns new ones of the same
    shapes) and returns the pairs, the same parameters in the same order. It receives exactly the keywords of
    :attr:`keywords` (a subset of :data:`PIPELINE_KEYWORDS`).
    """

    keywords: frozenset[str]
    needs_whole_rows: bool

    def __call__(self, grads_and_vars: Sequence[tuple[Tensor | None, Tensor]], **keywords: Any) -> GradsAndVars: ...

    def summaries(self) -> Mapping[str, Tensor]:
        """Values to log after a call, ``{tag under the callback's name: 0-d tensor}``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (tensors and plain values); empty when stateless."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def validate_names(self, names: Sequence[str]) -> None:
        """At ``setup``, every processed parameter name: raise ``ValueError`` for globs that match none."""
        ...

    def clipped_norms(self, grads: Sequence[Tensor], norms: Tensor, all_reduce_sum: AllReduceSum | None) -> Tensor:
        """The per-parameter norms after the last call (``norms``: before it)."""
        ...


class ClipBase:
    """Defaults of the optional parts of :class:`ClipTransform`: no summaries, no state, any names, norms
    recomputed after clipping. The package's clip objects derive from it."""

    keywords: ClassVar[frozenset[str]] = frozenset()
    needs_whole_rows: ClassVar[bool] = False
    """Whether every unit the transform reads (a row along dim 0 of a >= 2-d gradient) must lie on one
    process: strategies that split rows (flat shards) refuse such a transform at ``setup``."""

    def summaries(self) -> Mapping[str, Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def validate_names(self, names: Sequence[str]) -> None:
        return None

    def clipped_norms(self, grads: Sequence[Tensor], norms: Tensor, all_reduce_sum: AllReduceSum | None) -> Tensor:
        return parameter_norms(grads, all_reduce_sum)


class CallableClipping(ClipBase):
    """A user's TF-style clip callable ``fn(grads_and_vars, **some keywords)`` under the clip contract.

    Its keywords are read once, here, from its signature (a subset of :data:`CLIP_KEYWORDS`); every call checks
    that it returned TF's structure. The callable must be picklable for ``ddp_spawn``.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.keywords = frozenset(k for k in CLIP_KEYWORDS if validation.accepts_keyword(fn, k))  # type: ignore[misc]
        # The optional parts a user's object may have (TF's callables have none), looked up once.
        self._optional = frozenset(
            part for part in ("summaries", "state_dict", "load_state_dict", "validate_names") if hasattr(fn, part)
        )

    def summaries(self) -> Mapping[str, Tensor]:
        return self.fn.summaries() if "summaries" in self._optional else {}

    def state_dict(self) -> dict[str, Any]:
        return self.fn.state_dict() if "state_dict" in self._optional else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "load_state_dict" in self._optional:
            self.fn.load_state_dict(state)

    def validate_names(self, names: Sequence[str]) -> None:
        if "validate_names" in self._optional:
            self.fn.validate_names(names)

    def __call__(self, grads_and_vars: Sequence[tuple[Tensor | None, Tensor]], **keywords: Any) -> GradsAndVars:
        pairs = list(grads_and_vars)
        returned = self.fn(pairs, **keywords)
        return [
            (new, param) for new, (_, param) in zip(checked_gradients(self.fn, pairs, returned), pairs, strict=True)
        ]

    def __repr__(self) -> str:
        return validation.callable_name(self.fn)


def checked_gradients(fn: Any, pairs: Sequence[tuple[Tensor | None, Tensor]], returned: Any) -> list[Tensor]:
    """The gradients a clip callable returned, checked against TF's contract."""
    name = validation.callable_name(fn)
    if not isinstance(returned, (list, tuple)) or len(returned) != len(pairs):
        raise ValueError(
            f"OptimizeLoss: clip_gradients callable {name} must return a list of {len(pairs)} "
            f"(gradient, parameter) pairs, like the one it was given; it returned {validation.show(returned)}."
        )
    grads = []
    for position, (item, (grad, param)) in enumerate(zip(returned, pairs, strict=True)):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[1] is not param:
            raise ValueError(
                f"OptimizeLoss: clip_gradients callable {name} returned {validation.show(item)} at position "
                f"{position}; expected the pair (gradient, parameter) with the same parameter as given."
            )
        new = item[0]
        if not isinstance(new, Tensor) or grad is None or new.shape != grad.shape:
            shape = tuple(new.shape) if isinstance(new, Tensor) else None
            expected = None if grad is None else tuple(grad.shape)
            raise ValueError(
                f"OptimizeLoss: clip_gradients callable {name} returned a gradient of shape {shape} "
                f"({validation.show(new) if shape is None else 'a tensor'}) at position {position}; the "
                f"parameter's gradient has shape {expected}."
            )
        grads.append(new)
    return grads


def as_clip_transform(clip: ClipTransform | Callable[..., Any]) -> ClipTransform:
    """``clip`` under the clip contract: a :class:`ClipTransform` as is, any other callable wrapped."""
    if isinstance(clip, ClipBase):
        return clip
    return CallableClipping(clip)
