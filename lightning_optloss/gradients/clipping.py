"""Global-norm clipping on plain lists of tensors, as ``tf.clip_by_global_norm``, and per-group clipping.

Beyond TF: :func:`clip_groups_by_global_norm_` clips groups of parameters each by its own norm
(:func:`resolve_clip_groups` finds the groups from name globs). :class:`GlobalNormClipping` and
:class:`GroupClipping` are the two as clip transforms (:mod:`lightning_optloss.gradients.contract`), what
``OptimizeLoss(clip_gradients=<float>)`` and ``clip_gradients={glob: float}`` become. Scaling is in place
with ``torch._foreach_*`` kernels; nothing copies to the host except the CPU-only shortcut described in
:func:`clip_by_global_norm_`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_optloss.common import foreach, tags, validation
from lightning_optloss.gradients.contract import AllReduceSum, ClipBase, GradsAndVars
from lightning_optloss.gradients.multipliers import group_by_multiplier
from lightning_optloss.gradients.norms import global_norm, parameter_norms


def present_gradients(
    grads_and_vars: Sequence[tuple[Tensor | None, Tensor]], norm: Tensor | None
) -> tuple[list[Tensor], Tensor | None]:
    """For a clip callable: the gradients that are not None, and their global norm (``norm`` when given).

    The norm is None when there is no gradient; a given ``norm`` (OptimizeLoss's, reduced over shards) is used
    as is, otherwise it is computed from the gradients.
    """
    grads = [grad for grad, _ in grads_and_vars if grad is not None]
    if grads and norm is None:
        norm = global_norm(parameter_norms(grads))
    return grads, (norm if grads else None)


def clip_by_global_norm_(
    grads: Sequence[Tensor], clip_norm: float, norm: Tensor, multipliers: Sequence[float] | None = None
) -> Tensor:
    """Scale ``grads`` in place by ``clip_norm / max(norm, clip_norm)``; return that factor (0-d tensor).

    Written as TF writes it (``clip_norm * min(1 / norm, 1 / clip_norm)``, plus ``norm - norm``), so a
    non-finite global norm makes every gradient NaN, as ``tf.clip_by_global_norm`` does, instead of zeroing
    the finite ones as ``torch.nn.utils.clip_grad_norm_`` does. On the CPU, where reading the factor waits
    for nothing, a factor of exactly 1 skips the multiplication, which would change no gradient; on
    accelerators the multiplication always runs, so that nothing synchronises with the host.

    ``multipliers`` (TF's gradient multipliers, not applied yet; ``norm`` must then be the global norm of the
    multiplied gradients) are applied in the same pass: gradient ``i`` is scaled by ``multipliers[i] * factor``,
    one memory pass instead of two (the product rounds once more than TF's two multiplications, within float32
    precision).

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.clipping import clip_by_global_norm_
        >>> grads = [torch.tensor([3.0]), torch.tensor([4.0])]  # global norm 5
        >>> clip_by_global_norm_(grads, clip_norm=1.0, norm=torch.tensor(5.0))
        tensor(0.2000)
        >>> grads
        [tensor([0.6000]), tensor([0.8000])]
    """
    inverse_clip = float(np.float32(1.0) / np.float32(clip_norm))
    factor = clip_norm * torch.clamp(norm.reciprocal(), max=inverse_clip) + (norm - norm)
    unit = factor.device.type == "cpu" and float(factor) == 1.0
    for multiplier, group in group_by_multiplier(grads, multipliers).items():
        if multiplier != 1.0:
            foreach.mul_(group, multiplier if unit else factor * multiplier)
        elif not unit:
            foreach.mul_(group, factor)
    return factor


def clip_groups_by_global_norm_(
    grads: Sequence[Tensor], group_of: Sequence[int], clip_norms: Sequence[float], norms: Tensor
) -> tuple[Tensor, Tensor]:
    """Clip each group of gradients by its own global norm, in place: :func:`clip_by_global_norm_` per group.

    Group ``g`` (the gradients ``i`` with ``group_of[i] == g``) is scaled by
    ``clip_norms[g] / max(norm_g, clip_norms[g])``, where ``norm_g`` is the global norm of that group
    alone, in TF's form (a non-finite ``norm_g`` makes the group's gradients NaN, and only the group's).
    Gradients with ``group_of[i] == -1`` are left untouched. A group with no gradient has norm 0, factor 1.

    Args:
        grads: The gradients, modified in place.
        group_of: For each gradient, its group index in ``[0, len(clip_norms))``, or -1 (not clipped). See
            :func:`resolve_clip_groups`.
        clip_norms: The clip value of each group, > 0.
        norms: The per-gradient norms, from :func:`parameter_norms` (reduced over shards already).

    Returns:
        ``(group_norms, factors)``: two 1-d tensors of ``len(clip_norms)``, each group's global norm before
        clipping and the factor its gradients were multiplied by, for summaries (no host copy here).

    Examples:
        >>> import torch
        >>> from lightning_optloss.gradients.clipping import clip_groups_by_global_norm_
        >>> from lightning_optloss.gradients.norms import parameter_norms
        >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.5]), torch.tensor([9.0])]
        >>> norms, factors = clip_groups_by_global_norm_(grads, [0, 1, -1], [1.0, 1.0], parameter_norms(grads))
        >>> norms, factors  # group 0 has norm 5 and is clipped; group 1 is below its clip value
        (tensor([5.0000, 0.5000]), tensor([0.2000, 1.0000]))
        >>> grads  # the third gradient belongs to no group
        [tensor([0.6000, 0.8000]), tensor([0.5000]), tensor([9.])]

    References:
        Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", ICML 2013,
        https://arxiv.org/abs/1211.5063 (clipping by norm); TF's ``tf.clip_by_global_norm``.
    """
    if not len(grads) == len(group_of) == len(norms):
        raise ValueError(
            f"clip_groups_by_global_norm_: `grads`, `group_of` and `norms` must have one entry per gradient; "
            f"got {len(grads)}, {len(group_of)} and {len(norms)}."
        )
    members: list[list[int]] = [[] for _ in clip_norms]
    for position, group in enumerate(group_of):
        if not -1 <= group < len(members):
            raise ValueError(
                f"clip_groups_by_global_norm_: `group_of[{position}]` must be -1 or a group index in "
                f"[0, {len(members)}); got {group!r}."
            )
        if group != -1:
            members[group].append(position)
    group_norms, factors = [], []
    for clip_norm, positions in zip(clip_norms, members, strict=True):
        # Views of norms, stacked: no index tensor to copy to the device.
        norm = global_norm(torch.stack([norms[p] for p in positions])) if positions else norms.new_zeros(())
        if positions:
            factor = clip_by_global_norm_([grads[p] for p in positions], clip_norm, norm)
        else:
            factor = norms.new_ones(())
        group_norms.append(norm)
        factors.append(factor)
    return torch.stack(group_norms), torch.stack(factors)


def resolve_clip_groups(
    owner: str, patterns: Mapping[str, float], names: Sequence[str], argument: str = "clip_gradients"
) -> list[int]:
    """The clip group of each parameter name: the index of the first pattern of ``patterns`` it matches.

    Args:
        owner: Who asks, for error messages (``"OptimizeLoss"``).
        patterns: ``{glob: clip_norm}`` in priority order: a name belongs to the first pattern it matches
            (:func:`fnmatch.fnmatchcase`, case-sensitive; ``*`` also matches dots, so ``"encoder.*"`` takes
            every parameter under ``encoder``). Every ``clip_norm`` is a finite number > 0.
        names: The parameter names, in the order of the gradients.
        argument: The argument's name in error messages. Default ``"clip_gradients"``.

    Returns:
        ``group_of`` for :func:`clip_groups_by_global_norm_`: for each name, its pattern's index in
        ``patterns``, or -1 when it matches none (not clipped); ``list(patterns.values())`` are the
        ``clip_norms``.

    Raises:
        ValueError: for an empty or non-dict ``patterns``, a key that is not a non-empty string, a value
            that is not > 0, a pattern that matches no name (a typo: the error names the closest names), or
            a pattern that matches only names an earlier pattern already took (it would never apply).
    """
    accepted = "a non-empty dict {parameter-name glob: clip norm > 0}"
    if not isinstance(patterns, Mapping) or not patterns:
        raise validation.invalid(owner, argument, accepted, patterns)
    for pattern, clip_norm in patterns.items():
        if not isinstance(pattern, str) or not pattern:
            raise validation.invalid(owner, argument, accepted + " (keys are non-empty strings)", pattern)
        validation.real(owner, f"{argument}[{pattern!r}]", clip_norm, minimum=0.0, strictly=True)
    ordered = list(patterns)
    group_of = match_groups(ordered, names)
    for group, pattern in enumerate(ordered):
        if group in group_of:
            continue
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise validation.unmatched_pattern(owner, argument, pattern, names)
        earlier = ordered[group_of[names.index(matched[0])]]
        raise ValueError(
            f"{owner}: `{argument}` has the pattern {pattern!r}, which matches only parameters that an earlier "
            f"pattern takes ({matched[0]!r} goes to {earlier!r}; the first matching pattern wins), so it would "
            "never apply. Put the more specific pattern first, or remove it."
        )
    return group_of


def match_groups(patterns: Sequence[str], names: Sequence[str]) -> list[int]:
    """For each name, the index of the first of ``patterns`` it matches (:func:`fnmatch.fnmatchcase`), or -1."""
    return [next((g for g, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)), -1) for name in names]


class GlobalNormClipping(ClipBase):
    """TF's ``clip_by_global_norm`` at ``clip_norm`` as a clip transform (``OptimizeLoss(clip_gradients=c)``).

    Declares ``norms`` (the per-parameter norms, so the global norm costs no second pass) and ``multipliers``
    (TF's gradient multipliers, applied in the clipping pass: see :func:`clip_by_global_norm_`).

    >>> import torch
    >>> grad, param = torch.tensor([3.0, 4.0]), torch.zeros(2)
    >>> clip = GlobalNormClipping(1.0)
    >>> _ = clip([(grad, param)])
    >>> grad
    tensor([0.6000, 0.8000])
    """

    keywords = frozenset({"norms", "multipliers"})

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = clip_norm
        self._factor: Tensor | None = None

    def __call__(
        self,
        grads_and_vars: Sequence[tuple[Tensor | None, Tensor]],
        norms: Tensor | None = None,
        multipliers: Sequence[float] | None = None,
    ) -> GradsAndVars:
        pairs = list(grads_and_vars)
        grads = [grad for grad, _ in pairs if grad is not None]
        if grads:
            norm = global_norm(parameter_norms(grads) if norms is None else norms)
            self._factor = clip_by_global_norm_(grads, self.clip_norm, norm, multipliers)
        return pairs

    def clipped_norms(self, grads: Sequence[Tensor], norms: Tensor, all_reduce_sum: AllReduceSum | None) -> Tensor:
        return norms * self._factor

    def __repr__(self) -> str:
        return repr(self.clip_norm)


class GroupClipping(ClipBase):
    """Per-group clipping as a clip transform (``OptimizeLoss(clip_gradients={glob: clip_norm})``).

    Each group (the parameters whose name matches its glob first) is clipped by its own global norm
    (:func:`clip_groups_by_global_norm_`); parameters matching no glob are untouched. Declares ``norms`` and
    ``names``. With ``report_norms`` its summaries are every group's norm before and after clipping,
    ``global_norm/<glob as a metric key>/gradient_norm`` and ``.../clipped_gradient_norm``.

    Args:
        patterns: ``{glob: clip norm > 0}`` in priority order, checked.
        report_norms: Whether :meth:`summaries` has the group norms. Default False.
    """

    keywords = frozenset({"norms", "names"})

    def __init__(self, patterns: Mapping[str, float], report_norms: bool = False) -> None:
        self.patterns = dict(patterns)
        self.report_norms = report_norms
        self.group_keys = tags.unique_metric_keys(list(self.patterns))
        self._groups: dict[tuple[str, ...], list[int]] = {}
        self._index: dict[tuple[int, ...], Tensor] = {}
        self._last: tuple[Tensor, Tensor, list[int]] | None = None

    def validate_names(self, names: Sequence[str]) -> None:
        resolve_clip_groups("OptimizeLoss", self.patterns, names)

    def __call__(
        self,
        grads_and_vars: Sequence[tuple[Tensor | None, Tensor]],
        norms: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> GradsAndVars:
        pairs = list(grads_and_vars)
        if names is None or len(names) != len(pairs):
            raise ValueError(
                f"{self!r} needs the `names` keyword, one parameter name per (gradient, parameter) pair "
                "(OptimizeLoss passes it); got "
                f"{'none' if names is None else len(names)} for {len(pairs)} pairs."
            )
        grads = [grad for grad, _ in pairs]
        norms = parameter_norms(grads) if norms is None else norms
        group_of = self._group_of(names)
        group_norms, factors = clip_groups_by_global_norm_(grads, group_of, list(self.patterns.values()), norms)
        self._last = (group_norms, factors, group_of)
        return pairs

    def _group_of(self, names: Sequence[str]) -> list[int]:
        key = tuple(names)
        if key not in self._groups:  # one entry per distinct set of parameters with gradients
            self._groups[key] = match_groups(list(self.patterns), key)
        return self._groups[key]

    def clipped_norms(self, grads: Sequence[Tensor], norms: Tensor, all_reduce_sum: AllReduceSum | None) -> Tensor:
        _, factors, group_of = self._last
        key = tuple(group_of)
        index = self._index.get(key)
        if index is None:  # one host-to-device copy per distinct set of parameters with gradients
            index = self._index[key] = torch.tensor(group_of, device=factors.device)
        return norms * torch.cat([factors, factors.new_ones(1)])[index]  # group -1 (unclipped): factor 1

    def groups(self, names: Sequence[str]) -> list[int]:
        """The group of each parameter of ``names`` (its position in ``patterns``; -1: in no group)."""
        return list(self._group_of(names))

    def summaries(self) -> dict[str, Tensor]:
        """Each group's clip activity (``clip/<group>/ratio``, its factor, and ``clip/<group>/active``), and with
        ``report_norms`` its norms before and after clipping."""
        if self._last is None:
            return {}
        group_norms, factors, _ = self._last
        values = {}
        for key, norm, factor in zip(self.group_keys, group_norms.unbind(), factors.unbind(), strict=True):
            values[tags.group_clip_activity(key, "ratio")] = factor
            values[tags.group_clip_activity(key, "active")] = (factor < 1).to(factor.dtype)
            if self.report_norms:
                values[tags.group_norm(key)] = norm
                values[tags.group_norm(key, clipped=True)] = norm * factor
        return values

    def __repr__(self) -> str:
        return repr(self.patterns)
