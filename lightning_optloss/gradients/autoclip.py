"""AutoClip: clip the global gradient norm at a percentile of its recent history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optloss.common import foreach, tags, validation
from lightning_optloss.gradients import clipping
from lightning_optloss.gradients.contract import ClipBase, GradsAndVars

_OWNER = "autoclip_fn"


class AutoClipping(ClipBase):
    """Clip by global norm at the ``percentile``-th percentile of the last ``history`` global norms.

    Each call does the paper's Algorithm 1 on the global norm ``n`` of the gradients::

        append n to the history          # unless n is inf or NaN
        threshold = percentile(history, p)  # linear interpolation, as np.percentile's default
        factor    = threshold / n if n > threshold else 1

    and multiplies every gradient by ``factor``. The history includes the current norm, so the first call
    never clips. As ``OptimizeLoss``'s float clipping (TF's ``clip_by_global_norm``), an inf/NaN norm turns
    every gradient to NaN (the step is then garbage anyway; AMP skips it), but it never enters the history.

    **Difference from the paper:** the paper keeps every norm since the start of training; this keeps the
    last ``history`` (a ring buffer of float32 on the gradients' device, plus an int64 count), so memory and
    time per step are bounded and the threshold follows the recent training regime. With ``history`` at
    least the number of steps, the two are the same. The percentile is ``torch.nanquantile`` over the buffer
    (empty slots are NaN), with ``percentile / 100`` as ``q``: no data-dependent shape, no host sync. The
    paper clips with ``torch.nn.utils.clip_grad_norm_`` (``threshold / (n + 1e-6)``); this uses TF's exact
    ``threshold / n``.

    **Clip-callable contract** (:class:`~lightning_optloss.OptimizeLoss`): called with a list of
    ``(grad, param)`` pairs and, when given, ``global_norm`` (the pre-clipping global norm, a 0-d tensor,
    already reduced over shards); without it the norm is computed from the local gradients. Returns the same
    pairs, gradients scaled in place. :meth:`summaries` has ``global_norm/autoclip_threshold``;
    :meth:`state_dict` holds the history (``"norms"``, float32 ``(history,)``, NaN where empty) and
    ``"count"`` (int64, norms appended so far), CPU tensors that load with ``weights_only=True``.

    References:
        Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks", IEEE MLSP 2020, https://arxiv.org/abs/2007.14469
    """

    keywords = frozenset({"global_norm"})

    def __init__(self, percentile: float, history: int) -> None:
        self.percentile = percentile
        self.history = history
        self.norms = torch.full((history,), float("nan"), dtype=torch.float32)
        self.count = torch.zeros((), dtype=torch.int64)
        self._threshold: Tensor | None = None

    def __call__(
        self, grads_and_vars: Sequence[tuple[Tensor | None, Tensor]], global_norm: Tensor | None = None
    ) -> GradsAndVars:
        pairs = list(grads_and_vars)
        grads, global_norm = clipping.present_gradients(pairs, global_norm)
        if global_norm is None:
            return pairs
        with torch.no_grad():
            norm = global_norm.detach().to(torch.float32)
            threshold = self.append_and_threshold(norm)
            # TF's clip_by_global_norm keeps small gradients exactly and makes them NaN for a non-finite norm.
            factor = torch.where(norm > threshold, threshold / norm, torch.ones_like(norm)) + (norm - norm)
            foreach.mul_(grads, factor)
        return pairs

    def append_and_threshold(self, norm: Tensor) -> Tensor:
        """Append ``norm`` (0-d float32) to the history if it is finite; return the percentile (0-d float32)."""
        self.norms = self.norms.to(norm.device)
        self.count = self.count.to(norm.device)
        position = torch.remainder(self.count, self.history).reshape(1)
        finite = torch.isfinite(norm)
        kept = torch.where(finite, norm, self.norms.index_select(0, position).reshape(()))
        self.norms.index_copy_(0, position, kept.reshape(1))
        self.count.add_(finite.to(torch.int64))
        self._threshold = torch.nanquantile(self.norms, self.percentile / 100.0)
        return self._threshold

    def summaries(self) -> dict[str, Tensor]:
        """``{"global_norm/autoclip_threshold": threshold}`` after a call."""
        return {} if self._threshold is None else {tags.AUTOCLIP_THRESHOLD: self._threshold}

    def state_dict(self) -> dict[str, Any]:
        """``{"norms": float32 (history,), "count": int64 0-d}``, CPU copies (later steps don't change them)."""
        return {
            "norms": self.norms.detach().to("cpu", copy=True),
            "count": self.count.detach().to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms, count = state["norms"], state["count"]
        if not isinstance(norms, Tensor) or tuple(norms.shape) != (self.history,):
            shape = tuple(norms.shape) if isinstance(norms, Tensor) else validation.show(norms)
            raise ValueError(
                f"{_OWNER}: the saved history has shape {shape}; this instance keeps history={self.history} "
                f"norms, shape ({self.history},). Build it with the history of the saved run."
            )
        self.norms = norms.to(torch.float32, copy=True)
        self.count = torch.as_tensor(count, dtype=torch.int64).clone()

    def __repr__(self) -> str:
        return f"autoclip_fn(percentile={self.percentile}, history={self.history})"


def autoclip_fn(percentile: float = 10, history: int = 1000) -> AutoClipping:
    """AutoClip: a clip callable for ``OptimizeLoss(clip_gradients=...)`` that adapts its threshold.

    Args:
        percentile: The percentile of the recent global norms to clip at, in ``[0, 100]``. Default 10, the
            value the paper recommends (lower clips more often).
        history: How many recent global norms to keep, an integer >= 1. Default 1000. The paper keeps all
            of them; see :class:`AutoClipping`.

    Returns:
        An :class:`AutoClipping`; OptimizeLoss logs its threshold as ``<name>/global_norm/autoclip_threshold``
        and saves its history in checkpoints.

    Examples:
        >>> import torch
        >>> from lightning_optloss import autoclip_fn
        >>> clip = autoclip_fn(percentile=50, history=10)
        >>> weight = torch.zeros(1)
        >>> [float(clip([(torch.tensor([norm]), weight)])[0][0]) for norm in (1.0, 3.0, 2.0, 10.0)]
        [1.0, 2.0, 2.0, 2.5]

        The history includes the current norm: the median of ``[1, 3]`` is 2, so 3 is clipped to 2; the median of
        ``[1, 3, 2, 10]`` is 2.5.

    References:
        Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks", IEEE MLSP 2020, https://arxiv.org/abs/2007.14469
    """
    percentile = validation.real(_OWNER, "percentile", percentile, minimum=0.0, maximum=100.0)
    return AutoClipping(percentile, validation.integer(_OWNER, "history", history, minimum=1))
