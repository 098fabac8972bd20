"""What :class:`~lightning_optloss.OptimizeLoss` restores from a checkpoint, and what it says when it cannot.

- A checkpoint without this callback's state (the callback was added later, or its ``name`` changed, which
  changes its state key): :func:`warn_if_missing` names the callback, the OptimizeLoss states the checkpoint
  does hold, and says what starts fresh (the global step, hence the learning-rate decay; the noise seed; the
  clipping statistics).
- A clipping state that does not fit the current ``clip_gradients`` (adaptive clipping saved, AutoClip or a
  float now): :func:`restore_clip` raises a ``ValueError`` naming both kinds, never a bare ``KeyError``, and
  never drops saved statistics silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

_FRESH = "the global step (and with it the learning-rate decay), the noise seed and the clipping statistics start fresh"
_KINDS_BY_KEYS = {frozenset(("mean", "sq_mean")): "AdaptiveClipping", frozenset(("norms", "count")): "AutoClipping"}


def clip_kind(clip: Any) -> str:
    """The kind of a ``clip_gradients`` value, in words: ``"AutoClipping"``, ``"a float"``, ``"None"``..."""
    if clip is None:
        return "None (no clipping)"
    if isinstance(clip, (int, float)):
        return "a float (a fixed max norm)"
    if isinstance(clip, Mapping):
        return "per-group max norms"
    return type(clip).__name__ if hasattr(clip, "state_dict") else "a function (no state)"


def warn_if_missing(owner: str, state_key: str, checkpoint: Mapping[str, Any]) -> None:
    """Warn when ``checkpoint`` (Lightning's dict) holds no state under ``state_key``."""
    states = checkpoint.get("callbacks") or {}
    if state_key in states:
        return
    others = sorted(key for key in states if isinstance(key, str) and key.startswith(owner))
    held = f"it holds {', '.join(others)}: was the callback's `name` changed?" if others else "it holds none of them"
    warnings.warn(
        f"{owner}: the checkpoint has no state for this callback ({state_key}); {held}. So {_FRESH}. Resume with "
        "the same OptimizeLoss arguments (name included) to continue them.",
        RuntimeWarning,
        stacklevel=2,
    )


def restore_clip(owner: str, clip: Any, state: Mapping[str, Any]) -> None:
    """Load the clipping statistics saved in ``state`` (the callback's state) into ``clip``.

    A ``ValueError`` naming the saved and the current kind when they differ or the saved state does not load.
    """
    saved = state.get("clip_gradients")
    current = clip_kind(clip)
    if saved is None:
        if hasattr(clip, "load_state_dict"):
            warnings.warn(
                f"{owner}: the checkpoint holds no clipping statistics (it was saved with clip_gradients of another "
                f"kind, {state.get('clip_kind', 'without state')}); those of {current} start fresh.",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    saved_kind = state.get("clip_kind") or _KINDS_BY_KEYS.get(frozenset(saved), "an unknown kind")
    fix = (
        "Resume with the clip_gradients the checkpoint was saved with, or, to start the statistics fresh on "
        "purpose, delete them from the checkpoint first: checkpoint['callbacks'][key].pop('clip_gradients')."
    )
    if saved_kind != current or not hasattr(clip, "load_state_dict"):
        raise ValueError(
            f"{owner}: the checkpoint holds the clipping statistics of {saved_kind}, but clip_gradients is now "
            f"{current}. {fix}"
        )
    try:
        clip.load_state_dict(saved)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{owner}: the checkpoint's clipping statistics ({saved_kind}, keys {sorted(saved)}) do not load into "
            f"clip_gradients={clip!r} ({type(error).__name__}: {error}). {fix}"
        ) from error
