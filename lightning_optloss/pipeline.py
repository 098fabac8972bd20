"""One optimizer step of TF's ``optimize_loss`` on the gradients of some parameters.

:class:`GradientPipeline` composes the transforms of :mod:`lightning_optloss.gradients` in TF's order
(noise → multipliers → non-finite check → spike check → clipping) and builds the step's summaries; the callback
decides when it runs, with which global step, and where the summaries go. Nothing here copies to the host,
except ``on_nonfinite="skip"`` / ``"raise"`` and ``skip_spikes``, which must know before the update whether
it is to be applied.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_optloss.common import tags, validation
from lightning_optloss.common.parameters import NamedParameter
from lightning_optloss.gradients import histograms, statistics
from lightning_optloss.gradients.contract import ClipTransform, Layout
from lightning_optloss.gradients.multipliers import multiply_
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.gradients.norms import AllReduceSum, global_norm, parameter_norms
from lightning_optloss.gradients.spikes import SpikeDecision, SpikeSkipping
from lightning_optloss.summaries import SummaryRecord

NoiseScale = float | Callable[[int], float]
NONFINITE_MODES = ("warn", "skip", "raise")

_INDEX = operator.attrgetter("index")
_CACHED_LABELS = 8  # sets of parameters (an optimizer's; those with a gradient) whose EntryLabels are kept


class GradientStore(Protocol):
    """What the pipeline asks of a strategy (:class:`~lightning_optloss.distributed.strategies.GradientAccess`
    implements it): where the gradients are, and how to reduce over shards."""

    def local_grads(self, params: Sequence[Tensor]) -> list[Tensor | None]: ...

    def local_params(self, params: Sequence[Tensor]) -> list[Tensor]: ...

    def layouts(self, params: Sequence[Tensor]) -> list[Layout | None]: ...

    def write_back(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None: ...

    def sum_over_shards(self, values: Tensor, layouts: Sequence[Layout | None]) -> Tensor: ...

    def uniform_sum(self, layouts: Sequence[Layout | None]) -> AllReduceSum | None: ...

    def combine_over_shards(
        self, values: Tensor, layouts: Sequence[Layout | None], combine: Callable[[Tensor], Tensor]
    ) -> Tensor: ...


@dataclass
class StepGradients:
    """The gradients one optimizer step processes: the parameters that have one, their local tensors, layouts."""

    entries: list[NamedParameter]
    grads: list[Tensor]
    params: list[Tensor]  # the parameters, as local shards when sharded
    layouts: list[Layout | None]
    positions: list[int]  # of these entries among all the entries of the optimizer
    sharded: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sharded = any(layout is not None for layout in self.layouts)


@dataclass(frozen=True)
class EntryLabels:
    """What a step needs to know of its parameters besides their gradients, made once per set of parameters: a
    logged step of 200 parameters would otherwise format 1,000 statistic tags again."""

    indices: tuple[int, ...]  # also the key of the set
    names: list[str]
    metric_keys: list[str]
    statistic_tags: list[str]  # summary ``gradients``: each parameter's statistics, in GRADIENT_STATISTICS order


@dataclass
class StepOutcome:
    """What the pipeline did: the summaries (on logged steps) and whether the update must be skipped."""

    record: SummaryRecord | None
    skip: bool = False
    nonfinite_names: list[str] = field(default_factory=list)
    spike: SpikeDecision | None = None  # with skip_spikes, once the gradients are finite


def skip_update(optimizer: Optimizer) -> None:
    """Skip ``optimizer``'s coming step: without gradients it updates nothing (``on_nonfinite="skip"``'s way)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def act_on_spike(owner: str, decision: SpikeDecision, skipping: SpikeSkipping, optimizer: Optimizer, step: int) -> None:
    """Skip the step of a skipped spike; warn (rank 0) about a skipped or a released one."""
    if decision.skip:
        skip_update(optimizer)
    message = decision.describe(owner, skipping.watch, step, skipping.max_consecutive)
    if message:
        rank_zero_warn(message)


class StepLoss:
    """The loss of one optimizer step for ``skip_spikes(watch="loss")``: the sum of the micro-batches' losses as
    ``on_before_backward`` sees them (already divided by ``accumulate_grad_batches``)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def add(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
        loss = loss.detach().float()
        if scaler is not None:  # float16 AMP hands over the loss times the GradScaler's scale
            loss = loss / scaler._get_scale_async()
        self.value = loss if self.value is None else self.value + loss

    def take(self, owner: str, skipping: SpikeSkipping, access: Any) -> Tensor | None:
        """The step's loss averaged over replicas (a collective) when ``skipping`` watches it, else None; resets."""
        if not skipping.watches_loss:
            return None
        if self.value is None:
            raise RuntimeError(f"{owner}: skip_spikes watches the loss, but no backward pass reported one this step.")
        loss, self.value = self.value, None
        return access.mean_over_replicas(loss)


class NonFiniteMonitor:
    """Remembers, on the device, the first step with a non-finite gradient norm since the last report.

    ``observe`` needs no host synchronisation; :meth:`pending` is read with the next logged step's single
    transfer (or at the end of fit) and :meth:`report` turns it into a warning.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.first_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(len(names), dtype=torch.bool, device=device)

    def observe(self, step: int, bad: Tensor, positions: list[int]) -> None:
        """``bad[i]``: the gradient at ``positions[i]`` among the names has a non-finite norm this step."""
        if bad.device.type == "cpu" and not bad.any():  # reading it waits for nothing on a CPU
            return
        if len(positions) != len(self.names):  # some parameters got no gradient this step
            index = torch.tensor(positions, device=bad.device)
            bad = torch.zeros(len(self.names), dtype=torch.bool, device=bad.device).index_copy_(0, index, bad)
        any_bad = bad.any()
        first = any_bad & (self.first_step < 0)
        self.first_step = torch.where(first, float(step), self.first_step)
        self.first_bad = torch.where(first, bad, self.first_bad)
        self.count = self.count + any_bad

    def pending(self) -> Tensor:
        return torch.cat([self.first_step.reshape(1), self.count.reshape(1), self.first_bad.to(torch.float64)])

    def report(self, values: Sequence[float]) -> str | None:
        """A warning for the values :meth:`pending` returned, None if all was finite; then starts afresh."""
        first_step, count, flags = int(values[0]), int(values[1]), values[2:]
        if count == 0:
            return None
        self.first_step.fill_(-1.0)
        self.count.zero_()
        names = [name for name, flag in zip(self.names, flags, strict=True) if flag]
        return (
            f"OptimizeLoss: non-finite gradients in {count} optimizer step(s), the first at global step "
            f"{first_step} in {validation.first_names(names, limit=5)}; the updates were applied with them, as "
            "TF does. Pass on_nonfinite='skip' to skip such steps or 'raise' to stop."
        )


class GradientPipeline:
    """TF's gradient processing for the parameters of one callback.

    Args:
        name: Summary tag prefix.
        noise: The seeded noise source, None without noise.
        noise_scale: A float, or a callable of the global step returning the scale.
        multipliers: ``{parameter index: factor}``.
        clip: None, or a clip transform (:class:`~lightning_optloss.gradients.contract.ClipTransform`): it
            receives the keywords it declares.
        summaries: The summary names to record on logged steps.
        access: How the strategy holds gradients (a :class:`GradientStore`).
        metric_keys: ``{parameter index: metric-safe parameter name}``.
        on_nonfinite: ``"warn"``, ``"skip"`` or ``"raise"``.
        histograms: Whether logged steps with the ``gradients`` summary also carry gradient histograms.
        spikes: Skips steps on spikes of the global norm or the loss (after multipliers, before clipping).
    """

    def __init__(
        self,
        *,
        name: str,
        noise: GradientNoise | None,
        noise_scale: NoiseScale | None,
        multipliers: dict[int, float],
        clip: ClipTransform | None,
        summaries: Sequence[str],
        access: GradientStore,
        metric_keys: dict[int, str],
        on_nonfinite: str,
        histograms: bool = False,
        spikes: SpikeSkipping | None = None,
    ) -> None:
        self.name = name
        self.noise = noise
        self.noise_scale = noise_scale
        self.multipliers = multipliers
        self.clip = clip
        self._magnitudes: dict[tuple[int, ...], Tensor] = {}
        self._labels: dict[tuple[int, ...], EntryLabels] = {}
        self.summaries = list(summaries)
        self.access = access
        self.metric_keys = metric_keys
        self.on_nonfinite = on_nonfinite
        self.clip_keywords = frozenset() if clip is None else clip.keywords
        self.global_norms_logged = "global_gradient_norm" in self.summaries or "gradient_norm" in self.summaries
        self.histograms = histograms
        self.spikes = spikes

    def gather(self, entries: list[NamedParameter]) -> StepGradients:
        """The gradients of ``entries`` that exist, as local tensors, or an error if none does."""
        params = [entry.param for entry in entries]
        local = self.access.local_grads(params)
        if all(map(operator.is_not, local, itertools.repeat(None))):  # the common case: every gradient is there
            return StepGradients(
                entries, local, self.access.local_params(params), self.access.layouts(params), list(range(len(params)))
            )
        present = [position for position, grad in enumerate(local) if grad is not None]
        if not present:
            raise ValueError(
                f"OptimizeLoss: no gradient reached any of the {len(entries)} parameters this optimizer updates "
                "(TF: 'No gradients provided for any variable'); does the loss depend on them?"
            )
        chosen = [params[position] for position in present]
        return StepGradients(
            [entries[p] for p in present],
            [local[p] for p in present],
            self.access.local_params(chosen),
            self.access.layouts(chosen),
            present,
        )

    def labels(self, entries: Sequence[NamedParameter]) -> EntryLabels:
        """The :class:`EntryLabels` of ``entries`` (one per distinct set: an optimizer's, or those with a
        gradient)."""
        key = tuple(map(_INDEX, entries))
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) >= _CACHED_LABELS:  # gradients that come and go in many subsets: keep a few sets
                self._labels.clear()
                self._magnitudes.clear()  # keyed by the same sets
            keys = [self.metric_keys[index] for index in key]
            labels = self._labels[key] = EntryLabels(
                key,
                [entry.name for entry in entries],
                keys,
                [tags.gradient_statistic(k, statistic) for k in keys for statistic in tags.GRADIENT_STATISTICS],
            )
        return labels

    def _sum_over_shards(self, gradients: StepGradients) -> Callable[[Tensor], Tensor] | None:
        if not gradients.sharded:
            return None
        return lambda values: self.access.sum_over_shards(values, gradients.layouts)

    def run(
        self,
        optimizer: Optimizer,
        gradients: StepGradients,
        step: int,
        logging: bool,
        monitor: NonFiniteMonitor | None,
        loss: Tensor | None = None,
        images: bool = False,
    ) -> StepOutcome:
        """Process one step's gradients in place; return its summaries when ``logging``.

        ``monitor`` (``on_nonfinite="warn"``) observes the per-parameter norms of every step. ``loss`` (the
        step's loss, the same on every replica) is what ``spikes`` judges when it watches the loss. ``images``
        (a logged step) also records what the step's pictures need (:meth:`SummaryRecord.add_image_rows`).
        """
        grads, labels = gradients.grads, self.labels(gradients.entries)
        scale = self.current_noise_scale(step) if self.noise is not None else 0.0
        if scale:
            self.noise.add_(grads, labels.indices, step, scale, gradients.layouts)
        multipliers = [self.multipliers.get(index, 1.0) for index in labels.indices] if self.multipliers else None
        # A clip declaring `multipliers` applies them in its own pass (a norm scales with its multiplier).
        fused = multipliers is not None and "multipliers" in self.clip_keywords
        if multipliers is not None and not fused:
            multiply_(grads, multipliers)
        sum_over_shards = self._sum_over_shards(gradients)
        norms = parameter_norms(grads, sum_over_shards)
        if fused:
            norms = norms * self._multiplier_magnitudes(labels, multipliers, norms)
        outcome = StepOutcome(SummaryRecord(step, self.name) if logging else None)
        if self.on_nonfinite != "warn":
            names = self._nonfinite_names(gradients, norms)
            if names:
                outcome.skip, outcome.nonfinite_names = True, names
                return outcome
        elif monitor is not None:
            monitor.observe(step, ~torch.isfinite(norms), gradients.positions)
        if self.spikes is not None:
            watched = [global_norm(norms) if name == "global_norm" else loss for name in self.spikes.watch]
            values = torch.stack([value.reshape(()).to(norms) for value in watched])
            outcome.spike = self.spikes.decide(values, step)
            if outcome.spike.skip:
                outcome.skip = True
                return outcome
            if outcome.record is not None:
                for tag, value in self.spikes.summaries().items():
                    outcome.record.add(tag, value)
        if outcome.record is not None:
            self._record_before_clipping(outcome.record, optimizer, norms, scale)
        before = norms
        norms = self._clip(gradients, labels, norms, step, sum_over_shards, multipliers if fused else None)
        self.access.write_back([entry.param for entry in gradients.entries], grads)
        if outcome.record is not None:
            if self.clip is not None:
                self._record_clip_activity(outcome.record, before, norms)
            self._record_after_clipping(outcome.record, gradients, labels, norms, images)
            if images:
                outcome.record.add_image_rows(labels.indices, torch.stack([before, norms]))
        return outcome

    def _multiplier_magnitudes(self, labels: EntryLabels, multipliers: list[float], norms: Tensor) -> Tensor:
        """``|multipliers|`` as a tensor beside the norms; one host-to-device copy per distinct set of gradients."""
        magnitudes = self._magnitudes.get(labels.indices)
        if magnitudes is None:
            magnitudes = self._magnitudes[labels.indices] = torch.tensor(
                [abs(m) for m in multipliers], dtype=norms.dtype, device=norms.device
            )
        return magnitudes

    def current_noise_scale(self, step: int) -> float:
        """The noise scale at ``step``: the float, or the schedule's value, checked."""
        if not callable(self.noise_scale):
            return float(self.noise_scale or 0.0)
        scale = self.noise_scale(step)
        if not validation.is_real(scale) or not 0.0 <= float(scale) < float("inf"):
            raise ValueError(
                f"OptimizeLoss: gradient_noise_scale callable {validation.callable_name(self.noise_scale)} "
                f"returned {validation.show(scale)} at global step {step}; it must return a finite number >= 0."
            )
        return float(scale)

    def _nonfinite_names(self, gradients: StepGradients, norms: Tensor) -> list[str]:
        """The parameters whose gradient norm is not finite (one host synchronisation)."""
        finite = torch.isfinite(norms).tolist()
        return [entry.name for entry, ok in zip(gradients.entries, finite, strict=True) if not ok]

    def _clip(
        self,
        gradients: StepGradients,
        labels: EntryLabels,
        norms: Tensor,
        step: int,
        sum_over_shards: AllReduceSum | None,
        multipliers: list[float] | None = None,
    ) -> Tensor:
        """Clip in place (a clip declaring ``multipliers`` also applies them); return the norms after clipping."""
        clip, grads = self.clip, gradients.grads
        if clip is None:
            return norms
        keywords: dict[str, Any] = {}
        if "global_step" in self.clip_keywords:
            keywords["global_step"] = step
        if "global_norm" in self.clip_keywords:
            keywords["global_norm"] = global_norm(norms)
        if "names" in self.clip_keywords:
            keywords["names"] = labels.names
        if "all_reduce_sum" in self.clip_keywords:
            keywords["all_reduce_sum"] = self.access.uniform_sum(gradients.layouts)
        if "norms" in self.clip_keywords:
            keywords["norms"] = norms
        if "multipliers" in self.clip_keywords:
            keywords["multipliers"] = multipliers
        returned = clip(list(zip(grads, gradients.params, strict=True)), **keywords)
        for grad, (new, _) in zip(grads, returned, strict=True):
            if new is not grad:
                grad.copy_(new)
        return clip.clipped_norms(grads, norms, sum_over_shards)

    def _record_before_clipping(self, record: SummaryRecord, optimizer: Optimizer, norms: Tensor, scale: float) -> None:
        if "learning_rate" in self.summaries:
            record.add(tags.LEARNING_RATE, optimizer.param_groups[0]["lr"])
        if callable(self.noise_scale):
            record.add(tags.NOISE_SCALE, scale)
        if self.global_norms_logged:
            record.add(tags.GLOBAL_NORM, global_norm(norms))

    def _record_clip_activity(self, record: SummaryRecord, before: Tensor, after: Tensor) -> None:
        """``clip/ratio``: the global norm after clipping over the one before (1 for zero gradients);
        ``clip/active``: 1 when clipping changed any parameter's norm. On the device, no synchronisation."""
        norm_before, norm_after = global_norm(before), global_norm(after)
        ratio = torch.where(norm_before > 0, norm_after / norm_before.clamp_min(torch.finfo(before.dtype).tiny), 1.0)
        record.add(tags.CLIP_RATIO, ratio)
        record.add(tags.CLIP_ACTIVE, (after != before).any().to(before.dtype))

    def _record_after_clipping(
        self, record: SummaryRecord, gradients: StepGradients, labels: EntryLabels, norms: Tensor, images: bool
    ) -> None:
        """The summaries after clipping; ``images`` (a picture step) also records the histograms the pictures
        draw, whatever the summaries (they go to the artifacts only with the ``gradients`` summary)."""
        if self.clip is not None:
            for tag, value in self.clip.summaries().items():
                record.add(tag, value)
        if self.clip is not None and self.global_norms_logged:
            record.add(tags.CLIPPED_GLOBAL_NORM, global_norm(norms))
        if "gradient_norm" in self.summaries:
            record.add_parameter_norms(labels.metric_keys, norms)
        statistics_logged = "gradients" in self.summaries
        if statistics_logged or images:
            segments = statistics.GradientSegments(gradients.grads)
            moments = segments.moments(norms.dtype)
            if gradients.sharded:
                moments = self.access.combine_over_shards(moments, gradients.layouts, statistics.combine_moments)
            if statistics_logged:
                record.add_rows(labels.statistic_tags, statistics.gradient_statistics(moments, norms))
            if (self.histograms and statistics_logged) or images:
                table = self._histograms(gradients, segments, moments)
                record.add_histograms(labels.names, table)

    def _histograms(self, gradients: StepGradients, segments: statistics.GradientSegments, moments: Tensor) -> Tensor:
        """The histogram table, bins over each full gradient's [min, max] (counts summed over shards)."""
        table = histograms.histogram_table(segments, bounds=moments[:, 3:5])
        if gradients.sharded:
            counts = self.access.combine_over_shards(table[:, 2:], gradients.layouts, lambda parts: parts.sum(0))
            table = torch.cat([table[:, :2], counts], dim=1)
        return table
