"""One optimizer step of TF's ``optimize_loss`` on the gradients of some parameters.

:class:`GradientPipeline` composes the transforms of :mod:`lightning_optloss.gradients` in TF's order
(noise → multipliers → non-finite check → clipping) and builds the step's summaries; the callback decides
when it runs, with which global step, and where the summaries go. Nothing here copies to the host, except
``on_nonfinite="skip"`` / ``"raise"``, which must know before the update whether the gradients are finite.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optloss.common import validation
from lightning_optloss.common.parameters import NamedParameter
from lightning_optloss.distributed.strategies import GradientAccess, Layout
from lightning_optloss.gradients import clipping, histograms, statistics
from lightning_optloss.gradients.multipliers import multiply_
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.gradients.norms import global_norm, parameter_norms
from lightning_optloss.summaries import GRADIENT_STATISTICS, SummaryRecord, metric_key

ClipFn = Callable[..., Sequence[tuple[Tensor | None, Tensor]]]
ClipGroups = dict[str, float]
NoiseScale = float | Callable[[int], float]
NONFINITE_MODES = ("warn", "skip", "raise")
CLIP_KEYWORDS = ("global_step", "global_norm", "names", "all_reduce_sum")


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


@dataclass
class StepOutcome:
    """What the pipeline did: the summaries (on logged steps) and whether the update must be skipped."""

    record: SummaryRecord | None
    skip: bool = False
    nonfinite_names: list[str] = field(default_factory=list)


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
            f"{first_step} in {_names(names)}; the updates were applied with them, as TF does. Pass "
            "on_nonfinite='skip' to skip such steps or 'raise' to stop."
        )


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class GradientPipeline:
    """TF's gradient processing for the parameters of one callback.

    Args:
        name: Summary tag prefix.
        noise: The seeded noise source, None without noise.
        noise_scale: A float, or a callable of the global step returning the scale.
        multipliers: ``{parameter index: factor}``.
        clip: None, a float (global-norm clipping), a clip callable (TF's contract), or per-group clipping
            ``{parameter-name glob: clip norm}`` with ``clip_groups`` resolved.
        clip_groups: For per-group clipping, ``{parameter index: group index}`` (-1 or absent: unclipped).
        summaries: The summary names to record on logged steps.
        access: How the strategy holds gradients.
        metric_keys: ``{parameter index: metric-safe parameter name}``.
        on_nonfinite: ``"warn"``, ``"skip"`` or ``"raise"``.
        histograms: Whether logged steps with the ``gradients`` summary also carry gradient histograms.
    """

    def __init__(
        self,
        *,
        name: str,
        noise: GradientNoise | None,
        noise_scale: NoiseScale | None,
        multipliers: dict[int, float],
        clip: float | ClipFn | ClipGroups | None,
        clip_groups: dict[int, int] | None = None,
        summaries: Sequence[str],
        access: GradientAccess,
        metric_keys: dict[int, str],
        on_nonfinite: str,
        histograms: bool = False,
    ) -> None:
        self.name = name
        self.noise = noise
        self.noise_scale = noise_scale
        self.multipliers = multipliers
        self.clip = clip
        self.clip_groups = clip_groups or {}
        self.group_keys = _group_keys(clip) if isinstance(clip, dict) else []
        self._group_index: dict[tuple[int, ...], Tensor] = {}
        self._magnitudes: dict[tuple[int, ...], Tensor] = {}
        self.summaries = list(summaries)
        self.access = access
        self.metric_keys = metric_keys
        self.on_nonfinite = on_nonfinite
        self.clip_keywords = [k for k in CLIP_KEYWORDS if callable(clip) and validation.accepts_keyword(clip, k)]
        self.global_norms_logged = "global_gradient_norm" in self.summaries or "gradient_norm" in self.summaries
        self.histograms = histograms

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
        images: bool = False,
    ) -> StepOutcome:
        """Process one step's gradients in place; return its summaries when ``logging``.

        ``monitor`` (``on_nonfinite="warn"``) observes the per-parameter norms of every step. ``images`` (a
        logged step) also records what the step's pictures need (:meth:`SummaryRecord.add_image_rows`).
        """
        grads = gradients.grads
        scale = self.current_noise_scale(step) if self.noise is not None else 0.0
        if scale:
            self.noise.add_(grads, [e.index for e in gradients.entries], step, scale, gradients.layouts)
        multipliers = [self.multipliers.get(e.index, 1.0) for e in gradients.entries] if self.multipliers else None
        # With float clipping the multipliers go into the clipping pass (a norm scales with its multiplier).
        fused = multipliers is not None and isinstance(self.clip, float)
        if multipliers is not None and not fused:
            multiply_(grads, multipliers)
        sum_over_shards = self._sum_over_shards(gradients)
        norms = parameter_norms(grads, sum_over_shards)
        if fused:
            norms = norms * self._multiplier_magnitudes(gradients, multipliers, norms)
        outcome = StepOutcome(SummaryRecord(step) if logging else None)
        if self.on_nonfinite != "warn":
            names = self._nonfinite_names(gradients, norms)
            if names:
                outcome.skip, outcome.nonfinite_names = True, names
                return outcome
        elif monitor is not None:
            monitor.observe(step, ~torch.isfinite(norms), gradients.positions)
        if outcome.record is not None:
            self._record_before_clipping(outcome.record, optimizer, norms, scale)
        before = norms
        norms = self._clip(gradients, norms, step, sum_over_shards, outcome.record, multipliers if fused else None)
        self.access.write_back([entry.param for entry in gradients.entries], grads)
        if outcome.record is not None:
            if self.clip is not None:
                self._record_clip_activity(outcome.record, before, norms)
            self._record_after_clipping(outcome.record, gradients, norms, images)
            if images:
                indices = [entry.index for entry in gradients.entries]
                outcome.record.add_image_rows(indices, torch.stack([before, norms]))
        return outcome

    def _multiplier_magnitudes(self, gradients: StepGradients, multipliers: list[float], norms: Tensor) -> Tensor:
        """``|multipliers|`` as a tensor beside the norms; one host-to-device copy per distinct set of gradients."""
        key = tuple(entry.index for entry in gradients.entries)
        magnitudes = self._magnitudes.get(key)
        if magnitudes is None:
            magnitudes = self._magnitudes[key] = torch.tensor(
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
        norms: Tensor,
        step: int,
        sum_over_shards: Callable[[Tensor], Tensor] | None,
        record: SummaryRecord | None,
        multipliers: list[float] | None = None,
    ) -> Tensor:
        """Clip in place (float clipping also applies ``multipliers``); return the norms after clipping."""
        clip, grads = self.clip, gradients.grads
        if clip is None:
            return norms
        if isinstance(clip, float):
            factor = clipping.clip_by_global_norm_(grads, clip, global_norm(norms), multipliers)
            return norms * factor
        if isinstance(clip, dict):
            return self._clip_groups(gradients, norms, record)
        keywords: dict[str, Any] = {}
        if "global_step" in self.clip_keywords:
            keywords["global_step"] = step
        if "global_norm" in self.clip_keywords:
            keywords["global_norm"] = global_norm(norms)
        if "names" in self.clip_keywords:
            keywords["names"] = [entry.name for entry in gradients.entries]
        if "all_reduce_sum" in self.clip_keywords:
            keywords["all_reduce_sum"] = self.access.uniform_sum(gradients.layouts)
        pairs = list(zip(grads, gradients.params, strict=True))
        returned = clip(pairs, **keywords)
        for grad, new in zip(grads, clipped_gradients(clip, pairs, returned), strict=True):
            if new is not grad:
                grad.copy_(new)
        return parameter_norms(grads, sum_over_shards)

    def _clip_groups(self, gradients: StepGradients, norms: Tensor, record: SummaryRecord | None) -> Tensor:
        """Per-group clipping: each glob's parameters clipped by their own global norm."""
        group_of = [self.clip_groups.get(entry.index, -1) for entry in gradients.entries]
        clip_norms = list(self.clip.values())
        group_norms, factors = clipping.clip_groups_by_global_norm_(gradients.grads, group_of, clip_norms, norms)
        if record is not None:  # the clip activity of each group
            record.add_rows([f"{self.name}/clip/{key}/ratio" for key in self.group_keys], factors)
            record.add_rows([f"{self.name}/clip/{key}/active" for key in self.group_keys], (factors < 1).to(factors))
        if record is not None and self.global_norms_logged:
            tags = [f"{self.name}/global_norm/{key}/gradient_norm" for key in self.group_keys]
            record.add_rows(tags, group_norms)
            clipped = [f"{self.name}/global_norm/{key}/clipped_gradient_norm" for key in self.group_keys]
            record.add_rows(clipped, group_norms * factors)
        index = self._group_index.get(tuple(group_of))
        if index is None:  # one host-to-device copy per distinct set of parameters with gradients
            index = self._group_index[tuple(group_of)] = torch.tensor(group_of, device=factors.device)
        return norms * torch.cat([factors, factors.new_ones(1)])[index]  # group -1 (unclipped): factor 1

    def _record_before_clipping(self, record: SummaryRecord, optimizer: Optimizer, norms: Tensor, scale: float) -> None:
        if "learning_rate" in self.summaries:
            record.add(f"{self.name}/learning_rate", optimizer.param_groups[0]["lr"])
        if callable(self.noise_scale):
            record.add(f"{self.name}/gradient_noise_scale", scale)
        if self.global_norms_logged:
            record.add(f"{self.name}/global_norm/gradient_norm", global_norm(norms))

    def _record_clip_activity(self, record: SummaryRecord, before: Tensor, after: Tensor) -> None:
        """``clip/ratio``: the global norm after clipping over the one before (1 for zero gradients);
        ``clip/active``: 1 when clipping changed any parameter's norm. On the device, no synchronisation."""
        norm_before, norm_after = global_norm(before), global_norm(after)
        ratio = torch.where(norm_before > 0, norm_after / norm_before.clamp_min(torch.finfo(before.dtype).tiny), 1.0)
        record.add(f"{self.name}/clip/ratio", ratio)
        record.add(f"{self.name}/clip/active", (after != before).any().to(before.dtype))

    def _record_after_clipping(
        self, record: SummaryRecord, gradients: StepGradients, norms: Tensor, images: bool = False
    ) -> None:
        for tag, value in getattr(self.clip, "summaries", dict)().items():
            record.add(f"{self.name}/{tag}", value)
        keys = [self.metric_keys[entry.index] for entry in gradients.entries]
        if self.clip is not None and self.global_norms_logged:
            record.add(f"{self.name}/global_norm/clipped_gradient_norm", global_norm(norms))
        if "gradient_norm" in self.summaries:
            record.add_rows([f"{self.name}/gradient_norm/{key}" for key in keys], norms)
        if "gradients" in self.summaries or images:
            moments = statistics.local_moments(gradients.grads, norms.dtype)
            if gradients.sharded:
                moments = self.access.combine_over_shards(moments, gradients.layouts, statistics.combine_moments)
            if "gradients" in self.summaries:
                tags = [f"{self.name}/gradients/{key}/{statistic}" for key in keys for statistic in GRADIENT_STATISTICS]
                record.add_rows(tags, statistics.gradient_statistics(moments, norms))
            if (self.histograms and "gradients" in self.summaries) or images:
                record.add_histograms([entry.name for entry in gradients.entries], self._histograms(gradients, moments))

    def _histograms(self, gradients: StepGradients, moments: Tensor) -> Tensor:
        """The histogram table, bins over each full gradient's [min, max] (counts summed over shards)."""
        table = histograms.histogram_table(gradients.grads, bounds=moments[:, 3:5])
        if gradients.sharded:
            counts = self.access.combine_over_shards(table[:, 2:], gradients.layouts, lambda parts: parts.sum(0))
            table = torch.cat([table[:, :2], counts], dim=1)
        return table


def _group_keys(groups: ClipGroups) -> list[str]:
    """Metric-safe keys for the clip groups' globs (``encoder.*`` → ``encoder._``), made unique."""
    keys: list[str] = []
    for index, pattern in enumerate(groups):
        key = metric_key(pattern)
        keys.append(key if key not in keys else f"{key}_{index}")
    return keys


def clipped_gradients(clip: ClipFn, pairs: list[tuple[Tensor, Tensor]], returned: Any) -> list[Tensor]:
    """The gradients a clip callable returned, checked against TF's contract."""
    fn = validation.callable_name(clip)
    if not isinstance(returned, (list, tuple)) or len(returned) != len(pairs):
        raise ValueError(
            f"OptimizeLoss: clip_gradients callable {fn} must return a list of {len(pairs)} "
            f"(gradient, parameter) pairs, like the one it was given; it returned {validation.show(returned)}."
        )
    grads = []
    for position, (item, (grad, param)) in enumerate(zip(returned, pairs, strict=True)):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[1] is not param:
            raise ValueError(
                f"OptimizeLoss: clip_gradients callable {fn} returned {validation.show(item)} at position "
                f"{position}; expected the pair (gradient, parameter) with the same parameter as given."
            )
        new = item[0]
        if not isinstance(new, Tensor) or new.shape != grad.shape:
            shape = tuple(new.shape) if isinstance(new, Tensor) else None
            raise ValueError(
                f"OptimizeLoss: clip_gradients callable {fn} returned a gradient of shape {shape} "
                f"({validation.show(new) if shape is None else 'a tensor'}) at position {position}; the "
                f"parameter's gradient has shape {tuple(grad.shape)}."
            )
        grads.append(new)
    return grads
