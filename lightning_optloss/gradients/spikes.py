"""Skipping the update on gradient-norm and loss spikes: statistics, threshold, decision, consecutive count.

Beyond TF. TF's adaptive clipping only rescales an outlier update; the teams that train at scale skip it
(OLMo-core's ``SkipStepOptimizer``, Levanter, MaxText, MindFormers' ``use_skip_data_by_global_norm``). This
module holds the maths on plain tensors and Python numbers; :class:`~lightning_optloss.OptimizeLoss` decides
where the watched values come from and how a step is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_optloss.common import tags, transfers, validation
from lightning_optloss.gradients.adaptive_clipping import log_moments_threshold, one_minus_decay, update_log_moments

_OWNER = "spike_skipping_fn"
WATCHABLE = ("global_norm", "loss")
SKIPPED_STEPS_KEPT = 20  # the last skipped global steps kept (checkpoints, the MLflow tag)


@dataclass
class SpikeDecision:
    """What :meth:`SpikeSkipping.decide` concluded for one step.

    ``values`` and ``thresholds`` follow ``watch``; ``thresholds`` is None during the warm-up.
    """

    skip: bool
    released: bool  # a spike applied anyway: max_consecutive steps in a row were skipped before it
    values: list[float]
    thresholds: list[float] | None
    consecutive: int  # skipped steps in a row, this one included

    def describe(self, owner: str, watch: Sequence[str], step: int, max_consecutive: int) -> str | None:
        """The warning for a skipped or released step (None for a normal step)."""
        if not (self.skip or self.released):
            return None
        pairs = zip(watch, self.values, self.thresholds or [], strict=True)
        spikes = ", ".join(f"{name} {value:.6g} > threshold {limit:.6g}" for name, value, limit in pairs)
        if self.skip:
            return (
                f"{owner}: skipped the optimizer step at global step {step} on a spike: {spikes} "
                f"({self.consecutive} of at most {max_consecutive} skipped in a row)."
            )
        return (
            f"{owner}: applied the optimizer step at global step {step} despite a spike ({spikes}): the "
            f"{max_consecutive} steps before it were skipped (max_consecutive), so the change of scale is taken "
            "as real and enters the statistics."
        )


class SpikeSkipping:
    """Skip an update whose watched value jumps far above the moving statistics of its logarithm.

    For each watched value ``v`` (the global gradient norm, the loss, or both) it keeps, like TF's adaptive
    clipping (:class:`~lightning_optloss.AdaptiveClipping`), moving averages of ``x = log(v + epsilon)`` and of
    ``x**2`` in float32, with TF's step-aware decay over the ``n`` values taken in so far::

        decay     = min(decay, n / (n + 1))                 # plain means at first: no bias from the zero start
        mean      = mean - (mean - x) * (1 - decay)
        sq_mean   = sq_mean - (sq_mean - x**2) * (1 - decay)
        std       = sqrt(max(epsilon, sq_mean - mean**2))
        threshold = exp(mean + std_factor * std)

    A step is a spike when some watched value exceeds its threshold (computed before the step's value is
    taken in), once ``max(warmup_steps, 1)`` values have been taken in. A spike is skipped and its value never
    enters the statistics, unless ``max_consecutive`` steps in a row were skipped before it: then it is applied
    ("released"), its value enters the statistics, and the count in a row starts again, so a real change of
    scale cannot freeze training. A non-finite value (or a loss <= 0, whose log is not finite) is no decision
    here: it is ``on_nonfinite``'s (or AMP's) business, and it neither enters the statistics nor counts as a
    spike.

    The state (averages, counts, the last :data:`SKIPPED_STEPS_KEPT` skipped global steps) is tensors and
    Python numbers in :meth:`state_dict`, so a resumed run decides exactly as the uninterrupted one. Build it
    with :func:`spike_skipping_fn`.
    """

    def __init__(
        self,
        std_factor: float,
        decay: float,
        warmup_steps: int,
        max_consecutive: int,
        watch: tuple[str, ...],
        epsilon: float = 1e-8,
    ) -> None:
        self.std_factor = std_factor
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.max_consecutive = max_consecutive
        self.watch = watch
        self.epsilon = epsilon
        self.mean = torch.zeros(len(watch), dtype=torch.float32)
        self.sq_mean = torch.zeros(len(watch), dtype=torch.float32)
        self.count = 0  # values taken into the statistics
        self.consecutive = 0  # spikes skipped in a row
        self.skipped = 0  # spikes skipped in all
        self.skipped_steps: list[int] = []  # the last SKIPPED_STEPS_KEPT of them
        self.last: SpikeDecision | None = None

    @property
    def watches_loss(self) -> bool:
        return "loss" in self.watch

    def check_loss_visible(self, owner: str, automatic_optimization: bool) -> None:
        """At ``setup``: ``watch`` with ``"loss"`` needs automatic optimization, where the step's loss is known."""
        if self.watches_loss and not automatic_optimization:
            raise ValueError(
                f"{owner}: skip_spikes={self!r} watches the loss, which {owner} cannot tie to an optimizer step "
                "in manual optimization (several backward passes per step, or loss.backward() called "
                "directly); use watch='global_norm' with manual optimization."
            )

    def thresholds(self) -> Tensor | None:
        """The current thresholds (float32, one per watched value), None during the warm-up."""
        if self.count < max(self.warmup_steps, 1):
            return None
        return log_moments_threshold(self.mean, self.sq_mean, self.std_factor, self.epsilon)

    def decide(self, values: Tensor, step: int) -> SpikeDecision:
        """Judge one step's watched values (a 1-d tensor in ``watch`` order) and update the state.

        Reads ``values`` to the host in one transfer: the decision must be known before the update.
        ``step`` (the global step) is remembered when the step is skipped.
        """
        host = transfers.to_host(values.reshape(-1))
        value = torch.tensor(host, dtype=torch.float32)
        log_value = torch.log(value + self.epsilon)
        thresholds = self.thresholds()
        shown = None if thresholds is None else thresholds.tolist()
        if not bool(torch.isfinite(log_value).all()):
            self.last = SpikeDecision(False, False, host, shown, self.consecutive)
            return self.last
        spike = thresholds is not None and bool((value > thresholds).any())
        if spike and self.consecutive < self.max_consecutive:
            self.consecutive += 1
            self.skipped += 1
            self.skipped_steps = [*self.skipped_steps, step][-SKIPPED_STEPS_KEPT:]
            self.last = SpikeDecision(True, False, host, shown, self.consecutive)
            return self.last
        self.last = SpikeDecision(False, spike, host, shown, self.consecutive)
        self.consecutive = 0
        self.mean, self.sq_mean = update_log_moments(
            self.mean, self.sq_mean, log_value, one_minus_decay(self.decay, self.count)
        )
        self.count += 1
        return self.last

    def summaries(self) -> dict[str, float]:
        """``spike/threshold`` (``spike/<watch>/threshold`` each when two values are watched; after the warm-up)
        and ``spike/skipped``, the count of skipped steps so far."""
        values: dict[str, float] = {tags.SPIKE_SKIPPED: float(self.skipped)}
        if self.last is not None and self.last.thresholds is not None:
            if len(self.watch) == 1:
                values[tags.SPIKE_THRESHOLD] = self.last.thresholds[0]
            else:
                values.update(
                    {tags.spike_threshold(name): t for name, t in zip(self.watch, self.last.thresholds, strict=True)}
                )
        return values

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.clone(),
            "sq_mean": self.sq_mean.clone(),
            "count": self.count,
            "consecutive": self.consecutive,
            "skipped": self.skipped,
            "skipped_steps": list(self.skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = state["mean"].to(torch.float32)
        if mean.shape != self.mean.shape:
            raise ValueError(
                f"{_OWNER}: the checkpoint holds statistics of {mean.numel()} watched value(s); this "
                f"skip_spikes watches {list(self.watch)}. Resume with the watch the checkpoint was written with."
            )
        self.mean, self.sq_mean = mean, state["sq_mean"].to(torch.float32)
        self.count = int(state["count"])
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
        self.skipped_steps = [int(step) for step in state["skipped_steps"]]

    def __repr__(self) -> str:
        watch = self.watch[0] if len(self.watch) == 1 else self.watch
        return (
            f"spike_skipping_fn(std_factor={self.std_factor}, decay={self.decay}, warmup_steps="
            f"{self.warmup_steps}, max_consecutive={self.max_consecutive}, watch={watch!r})"
        )


def spike_skipping_fn(
    std_factor: float = 6.0,
    decay: float = 0.99,
    warmup_steps: int = 100,
    max_consecutive: int = 5,
    watch: str | Sequence[str] = "global_norm",
) -> SpikeSkipping:
    """Skip updates on gradient-norm or loss spikes: for ``OptimizeLoss(skip_spikes=...)``. Beyond TF.

    A step is skipped (no parameter changes; TF's global step, the bound learning rate and ``update_ops``
    stay) when a watched value exceeds ``exp(mean + std_factor * std)`` of the moving statistics of its
    logarithm (:class:`SpikeSkipping`). OptimizeLoss judges the global norm after noise and multipliers and
    before clipping, over all replicas and shards, so every replica skips the same steps.

    Args:
        std_factor: Standard deviations of the log-value above its mean that make a spike (> 0). Default 6.0:
            a value about ``exp(6 * std)`` times its geometric mean.
        decay: Smoothing factor of the moving averages, in (0, 1). Default 0.99 (about the last 100 steps).
        warmup_steps: Steps whose values are taken into the statistics before any step is skipped (>= 0;
            the first value is always taken in). Default 100.
        max_consecutive: Skipped steps in a row after which a spike is applied anyway, with a warning, and
            taken into the statistics (>= 1). Default 5.
        watch: ``"global_norm"`` (the global gradient norm), ``"loss"`` (the step's training loss, averaged
            over replicas; automatic optimization only) or ``("global_norm", "loss")`` (a spike in either).

    Returns:
        A :class:`SpikeSkipping`, whose statistics OptimizeLoss saves in its checkpoint state.

    References:
        The statistics of TF's adaptive clipping (https://arxiv.org/abs/1412.1602, section 3.2.1), used to
        skip rather than rescale, as OLMo-core's ``SkipStepOptimizer`` and MindFormers'
        ``use_skip_data_by_global_norm`` skip; ``docs/spike-skipping.md`` compares them.

    Examples:
        >>> import torch
        >>> from lightning_optloss import spike_skipping_fn
        >>> skip = spike_skipping_fn(std_factor=3.0, warmup_steps=3)
        >>> [skip.decide(torch.tensor([norm]), step).skip for step, norm in enumerate([1.0, 1.1, 0.9, 50.0, 1.0])]
        [False, False, False, True, False]
        >>> skip.skipped_steps
        [3]
    """
    std_factor = validation.real(_OWNER, "std_factor", std_factor, minimum=0.0, strictly=True)
    decay = validation.real(_OWNER, "decay", decay, minimum=0.0, strictly=True, maximum=1.0)
    if decay == 1.0:
        raise validation.invalid(_OWNER, "decay", "a finite number in (0, 1)", decay)
    warmup_steps = _count(_OWNER, "warmup_steps", warmup_steps, minimum=0)
    max_consecutive = _count(_OWNER, "max_consecutive", max_consecutive, minimum=1)
    return SpikeSkipping(std_factor, decay, warmup_steps, max_consecutive, _check_watch(watch))


def _count(owner: str, argument: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise validation.invalid(owner, argument, f"an integer >= {minimum}", value)
    return value


def _check_watch(value: Any) -> tuple[str, ...]:
    accepted = "'global_norm', 'loss' or ('global_norm', 'loss')"
    if isinstance(value, str):
        return (validation.choice(_OWNER, "watch", value, WATCHABLE),)
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value):
        raise validation.invalid(_OWNER, "watch", accepted, value)
    for name in value:
        validation.choice(_OWNER, "watch", name, WATCHABLE)
    return tuple(value)
