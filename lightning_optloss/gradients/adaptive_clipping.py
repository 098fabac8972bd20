"""TF's adaptive gradient clipping (``tf_slim.layers.optimizers.adaptive_clipping_fn``), checkpointable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_optloss.common import foreach, tags, validation
from lightning_optloss.gradients import clipping
from lightning_optloss.gradients.contract import ClipBase, GradsAndVars

_OWNER = "adaptive_clipping_fn"


def one_minus_decay(decay: float, count: int | None = None) -> float:
    """``1 - decay`` in float32, as TF computes it; with ``count`` (TF's step-aware form, ``n`` values seen so
    far) ``1 - min(decay, n / (n + 1))``, which makes the first averages plain means of the values seen."""
    if count is None:
        return float(np.float32(1.0 - decay))
    n = np.float32(count)
    return float(np.float32(1.0) - min(np.float32(decay), n / (n + np.float32(1.0))))


def update_log_moments(
    mean: Tensor, sq_mean: Tensor, log_value: Tensor, one_minus_decay: float
) -> tuple[Tensor, Tensor]:
    """TF's moving averages of ``log_value`` and its square, ``v - (v - x) * (1 - decay)``, elementwise.

    A non-finite ``log_value`` leaves its averages as they were.
    """
    finite = torch.isfinite(log_value)
    mean = torch.where(finite, mean - (mean - log_value) * one_minus_decay, mean)
    sq_mean = torch.where(finite, sq_mean - (sq_mean - log_value.square()) * one_minus_decay, sq_mean)
    return mean, sq_mean


def log_moments_threshold(mean: Tensor, sq_mean: Tensor, std_factor: float, epsilon: float) -> Tensor:
    """``exp(mean + std_factor * std)`` with ``std = sqrt(max(epsilon, sq_mean - mean**2))``: TF's ``max_norm``."""
    std = torch.sqrt(torch.clamp(sq_mean - mean.square(), min=epsilon))
    return torch.exp(mean + std_factor * std)


class AdaptiveClipping(ClipBase):
    """Clip the global gradient norm against moving statistics of its logarithm.

    Implements section 3.2.1 of https://arxiv.org/abs/1412.1602 exactly as TF does. With ``n`` the global
    step (step-aware only) and ``x = log(norm + epsilon)``::

        decay   = min(decay, n / (n + 1))                    # step-aware only
        mean    = mean - (mean - x) * (1 - decay)            # moving averages start at 0,
        sq_mean = sq_mean - (sq_mean - x**2) * (1 - decay)   # no bias correction
        std      = sqrt(max(epsilon, sq_mean - mean**2))
        max_norm = exp(mean + std_factor * std)
        factor   = 1 if norm < max_norm else exp(mean) / norm
        factor   = min(factor, static_max_norm / norm)       # when static_max_norm is given

    and every gradient is multiplied by ``factor``. The moving averages are float32 tensors kept in
    :meth:`state_dict`, so a resumed run clips exactly as the uninterrupted one.

    Difference from TF: a non-finite norm leaves the moving averages as they were (TF folds the inf/NaN
    into them, after which it never clips sensibly again); that step's gradients are scaled as TF would.

    Use it through :func:`adaptive_clipping_fn`. It follows the clip-callable contract of
    :class:`~lightning_optloss.OptimizeLoss`: called with a list of ``(grad, param)`` pairs and the keywords
    ``global_step`` and ``global_norm``, it returns the same pairs with the gradients scaled in place.
    """

    keywords = frozenset({"global_step", "global_norm"})

    def __init__(
        self,
        std_factor: float,
        decay: float,
        static_max_norm: float | None,
        step_aware: bool,
        report_summary: bool,
        epsilon: float,
    ) -> None:
        self.std_factor = std_factor
        self.decay = decay
        self.static_max_norm = static_max_norm
        self.step_aware = step_aware
        self.report_summary = report_summary
        self.epsilon = epsilon
        self.mean = torch.zeros((), dtype=torch.float32)
        self.sq_mean = torch.zeros((), dtype=torch.float32)
        self._max_norm: Tensor | None = None

    def one_minus_decay(self, global_step: int | None) -> float:
        """``1 - decay`` in float32, with TF's ``min(decay, n / (n + 1))`` when step-aware."""
        if not self.step_aware:
            return one_minus_decay(self.decay)
        if global_step is None:
            raise ValueError(
                f"{_OWNER}(global_step=...) is step-aware and needs the `global_step` keyword; "
                "OptimizeLoss passes it, a direct caller must too."
            )
        return one_minus_decay(self.decay, global_step)

    def __call__(
        self,
        grads_and_vars: Sequence[tuple[Tensor | None, Tensor]],
        global_step: int | None = None,
        global_norm: Tensor | None = None,
    ) -> GradsAndVars:
        pairs = list(grads_and_vars)
        grads, global_norm = clipping.present_gradients(pairs, global_norm)
        if global_norm is None:
            return pairs
        norm = global_norm.to(torch.float32)
        factor = self._update(norm, self.one_minus_decay(global_step))
        foreach.mul_(grads, factor)
        return pairs

    def _update(self, norm: Tensor, one_minus_decay: float) -> Tensor:
        mean, sq_mean = self.mean.to(norm.device), self.sq_mean.to(norm.device)
        log_norm = torch.log(norm + self.epsilon)
        mean, sq_mean = update_log_moments(mean, sq_mean, log_norm, one_minus_decay)
        self.mean, self.sq_mean = mean, sq_mean
        max_norm = log_moments_threshold(mean, sq_mean, self.std_factor, self.epsilon)
        factor = torch.where(norm < max_norm, torch.ones_like(norm), torch.exp(mean) / norm)
        if self.static_max_norm is not None:
            factor = torch.minimum(self.static_max_norm / norm, factor)
        self._max_norm = max_norm
        return factor

    def summaries(self) -> dict[str, Tensor]:
        """``{"global_norm/adaptive_max_gradient_norm": max_norm}`` when ``report_summary``, after a call."""
        if not self.report_summary or self._max_norm is None:
            return {}
        return {tags.ADAPTIVE_MAX_NORM: self._max_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.detach().cpu(), "sq_mean": self.sq_mean.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].to(torch.float32)
        self.sq_mean = state["sq_mean"].to(torch.float32)

    def __repr__(self) -> str:
        return (
            f"adaptive_clipping_fn(std_factor={self.std_factor}, decay={self.decay}, "
            f"static_max_norm={self.static_max_norm}, global_step={self.step_aware or None}, "
            f"report_summary={self.report_summary}, epsilon={self.epsilon})"
        )


def adaptive_clipping_fn(
    std_factor: float = 2.0,
    decay: float = 0.95,
    static_max_norm: float | None = None,
    global_step: Any = None,
    report_summary: bool = False,
    epsilon: float = 1e-8,
    name: str | None = None,
) -> AdaptiveClipping:
    """TF's ``adaptive_clipping_fn``: a clip callable for ``OptimizeLoss(clip_gradients=...)``.

    Args:
        std_factor: ``max_norm = exp(mean + std_factor * std)`` of the log-norm. Default 2.0.
        decay: Smoothing factor of the moving averages, in ``[0, 1)``. Default 0.95.
        static_max_norm: If given (> 0), the norm is also capped at this value as an extra safety.
        global_step: ``None`` keeps TF's fixed ``decay``. Any other value (``True``, or a TF-style step
            tensor when porting) makes the decay step-aware, ``min(decay, n / (n + 1))``, using the global
            step that :class:`~lightning_optloss.OptimizeLoss` passes in; the value itself is not read.
        report_summary: Log ``<name>/global_norm/adaptive_max_gradient_norm`` (TF logs a scalar too).
        epsilon: Added to the norm before the log, and the floor of the variance. Default 1e-8.
        name: Accepted for TF compatibility (TF's variable scope); has no effect here.

    Returns:
        An :class:`AdaptiveClipping`, whose moving averages are saved in OptimizeLoss's checkpoint state.

    Examples:
        >>> import torch
        >>> from lightning_optloss import adaptive_clipping_fn
        >>> clip = adaptive_clipping_fn(std_factor=2.0, decay=0.95)
        >>> weight = torch.zeros(2)
        >>> for scale in (1.0, 1.0):  # two steps of norm 1: the moving averages learn it
        ...     _ = clip([(torch.tensor([0.6, 0.8]) * scale, weight)])
        >>> [(clipped, _)] = clip([(torch.tensor([60.0, 80.0]), weight)])  # a spike of norm 100
        >>> round(float(clipped.norm()), 3)  # rescaled to exp(mean of the log-norms)
        1.259
    """
    std_factor = validation.real(_OWNER, "std_factor", std_factor, minimum=0.0)
    decay = validation.real(_OWNER, "decay", decay, minimum=0.0, maximum=1.0)
    if decay == 1.0:
        raise validation.invalid(_OWNER, "decay", "a finite number in [0, 1)", decay)
    if static_max_norm is not None:
        static_max_norm = validation.real(_OWNER, "static_max_norm", static_max_norm, minimum=0.0, strictly=True)
    if global_step is False:
        raise validation.invalid(_OWNER, "global_step", "None (fixed decay) or True (step-aware decay)", False)
    report_summary = validation.boolean(_OWNER, "report_summary", report_summary)
    epsilon = validation.real(_OWNER, "epsilon", epsilon, minimum=0.0, strictly=True)
    if name is not None and not isinstance(name, str):
        raise validation.invalid(_OWNER, "name", "None or a string", name)
    return AdaptiveClipping(std_factor, decay, static_max_norm, global_step is not None, report_summary, epsilon)
