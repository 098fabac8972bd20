"""Unit-wise adaptive gradient clipping (AGC, NFNets) as a clip callable for ``OptimizeLoss``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optloss.common import foreach, tags, validation
from lightning_optloss.gradients.contract import AllReduceSum, ClipBase, GradsAndVars

Exclude = str | Iterable[str] | Callable[[str], bool] | None
_OWNER = "agc_clipping_fn"
_CACHED_NAME_LISTS = 8  # exclusion masks kept, one per distinct list of names (one per optimizer)


def row_norms(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """The norm of each slice along dim 0 of a tensor with ``ndim >= 2``, over all other dims: ``(shape[0],)``.

    This is a unit of AGC: an output row of a linear weight ``(out, in)``, an output filter of a
    convolution ``(out, in, *kernel)``; NFNets' ``unitwise_norm`` for PyTorch's layout.
    """
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), dtype=dtype)


def whole_norms(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The norm of each whole tensor, as one 1-d ``dtype`` tensor on ``device``.

    One ``torch._foreach_norm`` per (device, dtype) of the inputs; half precision is reduced in ``dtype``.
    """
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    norms: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(position)
    for positions in groups.values():
        group = foreach.norm([tensors[p] for p in positions], 2, dtype=dtype)
        for position, norm in zip(positions, group, strict=True):
            norms[position] = norm
    return torch.stack([norm.to(device) for norm in norms])  # type: ignore[union-attr]


def agc_factors(grad_norms: Tensor, param_norms: Tensor, clip_factor: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-unit AGC scale factors, and whether each unit is clipped (both shaped like the norms).

    ``max_norm = clip_factor * max(param_norm, eps)``; a unit whose ``grad_norm > max_norm`` is scaled by
    ``max_norm / grad_norm``, the others by 1. A zero gradient norm is never clipped (nor divided by).
    """
    max_norm = param_norms.clamp_min(eps) * clip_factor
    clipped = grad_norms > max_norm
    safe = grad_norms.clamp_min(torch.finfo(grad_norms.dtype).tiny)
    return torch.where(clipped, max_norm / safe, torch.ones_like(max_norm)), clipped


class UnitwiseClipping(ClipBase):
    """Adaptive gradient clipping, unit-wise: ``g_i ← g_i · λ·max(‖w_i‖, ε) / ‖g_i‖`` where that ratio is < 1.

    For every unit ``i`` (a row along dim 0 of a parameter with ``ndim >= 2``, or the whole parameter when
    ``ndim <= 1``, as the paper's reference ``unitwise_norm``; see :func:`row_norms`)::

        max_norm_i = clip_factor * max(‖w_i‖, eps)
        g_i       *= max_norm_i / ‖g_i‖     if ‖g_i‖ > max_norm_i   (i.e. ‖g_i‖ / max(‖w_i‖, eps) > λ)

    ``eps`` keeps zero-initialised parameters (biases, the last layer of a residual branch) from freezing:
    their gradients are clipped at ``clip_factor * eps`` rather than at 0. Non-finite gradients stay
    non-finite (under AMP the step is skipped anyway). The callable is stateless: no ``state_dict``.

    **Clip-callable contract.** It follows :class:`~lightning_optloss.OptimizeLoss`'s contract (a list of
    ``(grad, param)`` pairs in, the same pairs out, gradients scaled in place) and extends it with two
    keywords, which OptimizeLoss passes to callables that accept them:

    - ``names``: the parameter names, aligned with the pairs. Needed only with ``exclude``; without it a
      call with ``exclude`` set is an error (excluding silently nothing would be wrong).
    - ``all_reduce_sum``: for sharded gradients (FSDP, ``Shard(0)``), a function summing a tensor over the
      processes that hold shards of the same parameters; None (the default) when every process holds
      whole parameters. The pairs are then the local shards. Under ``Shard(0)`` every row of a tensor with
      ``ndim >= 2`` lies whole on one process, so row norms need no collective; 1-d tensors (biases,
      gains) are split across processes, so their squared norms (gradient and parameter) are summed over
      shards, in exactly one ``all_reduce_sum`` call per call (with the clipped-unit counts of the
      summary). 0-d tensors cannot be sharded and are taken as whole. Every process must pass the same
      list of parameters in the same order (OptimizeLoss does).

    It also has :meth:`validate_names`, for OptimizeLoss to check the ``exclude`` globs against every
    processed name at ``setup`` (a glob that matches nothing is a typo). Use it through
    :func:`agc_clipping_fn`.

    Summaries (:meth:`summaries`): ``clip/agc_clipped_fraction``, the fraction of the non-excluded units
    clipped by the last call (0-d float32 tensor; over all processes when ``all_reduce_sum`` is given).

    References:
        Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021, section 4.1, https://arxiv.org/abs/2102.06171; reference
        implementation ``nfnets/optim.py`` and ``unitwise_norm`` in google-deepmind/deepmind-research.
    """

    keywords = frozenset({"names", "all_reduce_sum"})
    needs_whole_rows = True  # a unit is a row along dim 0: strategies that split rows refuse AGC

    def __init__(self, clip_factor: float, eps: float, exclude: tuple[str, ...] | Callable[[str], bool]) -> None:
        self.clip_factor = clip_factor
        self.eps = eps
        self.exclude = exclude
        self._fraction: Tensor | None = None
        self._excluded_by_names: dict[tuple[str, ...], list[bool]] = {}

    # ------------------------------------------------------------------ exclusion

    def is_excluded(self, name: str) -> bool:
        """Whether the parameter ``name`` is left untouched (matches a glob of ``exclude``, or the predicate)."""
        if callable(self.exclude):
            return bool(self.exclude(name))
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def validate_names(self, names: Iterable[str]) -> None:
        """Raise ``ValueError`` if a glob of ``exclude`` matches none of ``names`` (every processed name)."""
        if callable(self.exclude):
            return
        names = list(names)
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise validation.unmatched_pattern(_OWNER, "exclude", pattern, names)

    def _excluded(self, names: Sequence[str] | None, count: int) -> list[bool]:
        if not callable(self.exclude) and not self.exclude:
            return [False] * count
        if names is None:
            raise ValueError(
                f"{_OWNER}(exclude=...) needs the `names` keyword (parameter names aligned with the pairs) to "
                "know which parameters to leave alone; OptimizeLoss passes it, a direct caller must too."
            )
        key = tuple(names)
        if len(key) != count:
            raise ValueError(
                f"{_OWNER}: `names` must hold one name per (gradient, parameter) pair: {count} pairs, "
                f"got {len(key)} names."
            )
        excluded = self._excluded_by_names.get(key)
        if excluded is None:
            if len(self._excluded_by_names) >= _CACHED_NAME_LISTS:
                self._excluded_by_names.clear()
            excluded = self._excluded_by_names[key] = [self.is_excluded(name) for name in key]
        return excluded

    # ------------------------------------------------------------------ the clip

    def __call__(
        self,
        grads_and_vars: Sequence[tuple[Tensor | None, Tensor]],
        names: Sequence[str] | None = None,
        all_reduce_sum: AllReduceSum | None = None,
    ) -> GradsAndVars:
        pairs = list(grads_and_vars)
        excluded = self._excluded(names, len(pairs))
        chosen = [
            (grad, param.detach())
            for (grad, param), out in zip(pairs, excluded, strict=True)
            if grad is not None and not out
        ]
        if chosen:  # the same on every process, so all of them join the collective or none does
            with torch.no_grad():
                self._fraction = self._clip_(chosen, all_reduce_sum)
        return pairs

    def _clip_(self, chosen: list[tuple[Tensor, Tensor]], all_reduce_sum: AllReduceSum | None) -> Tensor:
        """Scale the chosen gradients' units in place; return the fraction of units clipped (0-d float32)."""
        grads = [grad for grad, _ in chosen]
        params = [param for _, param in chosen]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in grads + params) else torch.float32
        device = grads[0].device
        rows = [p for p, grad in enumerate(grads) if grad.ndim >= 2]
        # Vectors before scalars: under all_reduce_sum the vectors' norms are summed over shards.
        vectors = [p for p, grad in enumerate(grads) if grad.ndim == 1]
        whole = vectors + [p for p, grad in enumerate(grads) if grad.ndim == 0]
        row_counts = [grads[p].shape[0] for p in rows]

        row_factors, row_clipped = agc_factors(
            torch.cat([row_norms(grads[p], dtype).to(device) for p in rows] or [grads[0].new_zeros(0, dtype=dtype)]),
            torch.cat([row_norms(params[p], dtype).to(device) for p in rows] or [grads[0].new_zeros(0, dtype=dtype)]),
            self.clip_factor,
            self.eps,
        )
        clipped_rows: Tensor = row_clipped.sum(dtype=dtype)
        total_rows: Tensor | int = sum(row_counts)
        grad_whole = whole_norms([grads[p] for p in whole], dtype, device)
        param_whole = whole_norms([params[p] for p in whole], dtype, device)
        if all_reduce_sum is not None:
            k = len(vectors)
            local = torch.cat(
                [
                    grad_whole[:k].square(),
                    param_whole[:k].square(),
                    torch.stack([clipped_rows, clipped_rows.new_full((), total_rows)]),  # a fill: no copy
                ]
            )
            summed = all_reduce_sum(local)
            grad_whole = torch.cat([summed[:k].sqrt(), grad_whole[k:]])
            param_whole = torch.cat([summed[k : 2 * k].sqrt(), param_whole[k:]])
            clipped_rows, total_rows = summed[2 * k], summed[2 * k + 1]
        whole_factors, whole_clipped = agc_factors(grad_whole, param_whole, self.clip_factor, self.eps)

        clipped_units = clipped_rows + whole_clipped.sum(dtype=dtype)
        units = total_rows + len(whole)
        fraction = (clipped_units / (units.clamp_min(1) if isinstance(units, Tensor) else max(units, 1))).float()

        targets, scales = [], []
        for p, count, piece in zip(rows, row_counts, row_factors.split(row_counts), strict=True):
            targets.append(grads[p])
            scales.append(piece.reshape((count,) + (1,) * (grads[p].ndim - 1)))
        for p, factor in zip(whole, whole_factors.unbind(), strict=True):
            targets.append(grads[p])
            scales.append(factor)
        _multiply_by_device_(targets, scales)
        return fraction

    def summaries(self) -> dict[str, Tensor]:
        """``{"clip/agc_clipped_fraction": fraction}`` after a call (fraction of non-excluded units clipped)."""
        return {} if self._fraction is None else {tags.AGC_CLIPPED_FRACTION: self._fraction}

    def __repr__(self) -> str:
        return f"agc_clipping_fn(clip_factor={self.clip_factor}, eps={self.eps}, exclude={self.exclude!r})"


def _multiply_by_device_(targets: list[Tensor], scales: list[Tensor]) -> None:
    """``targets[i] *= scales[i]`` in place (broadcasting), one foreach kernel per device."""
    groups: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    for target, scale in zip(targets, scales, strict=True):
        group = groups.setdefault(target.device, ([], []))
        group[0].append(target)
        group[1].append(scale.to(target.device))
    for group_targets, group_scales in groups.values():
        foreach.mul_(group_targets, group_scales)


def agc_clipping_fn(clip_factor: float = 0.01, eps: float = 1e-3, exclude: Exclude = None) -> UnitwiseClipping:
    """Unit-wise adaptive gradient clipping (AGC): a clip callable for ``OptimizeLoss(clip_gradients=...)``.

    Every unit (an output row/filter of a weight with ``ndim >= 2``; a whole bias, gain or scalar) whose
    gradient norm exceeds ``clip_factor * max(‖w_i‖, eps)`` is rescaled to that norm. See
    :class:`UnitwiseClipping` for the formula and the ``names`` / ``all_reduce_sum`` keywords.

    Args:
        clip_factor: λ, the largest allowed ``‖g_i‖ / max(‖w_i‖, eps)``, a finite number > 0. Default 0.01
            (the paper's value for batch size 4096; it finds that larger batches need smaller λ).
        eps: Floor of the parameter norm, a finite number > 0, so zero-initialised units still train.
            Default 1e-3 (the paper's).
        exclude: Parameters left untouched: a parameter-name glob (:func:`fnmatch.fnmatchcase`, ``*`` also
            matches dots), a list of globs, or a predicate ``name -> bool`` (module-level, to pickle for
            ``ddp_spawn``). The paper excludes the final linear layer, e.g. ``exclude="head.*"``. Default
            None: nothing is excluded (and no names are needed).

    Returns:
        A stateless :class:`UnitwiseClipping`, whose summary ``clip/agc_clipped_fraction`` OptimizeLoss
        logs as ``<name>/clip/agc_clipped_fraction``.

    Examples:
        >>> import torch
        >>> from lightning_optloss import agc_clipping_fn
        >>> clip = agc_clipping_fn(clip_factor=0.1)
        >>> weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1
        >>> grad = torch.tensor([[3.0, 4.0], [0.0, 0.05]])  # row norms 5 (> 0.1 * 5) and 0.05 (< 0.1 * 1)
        >>> [(clipped, _)] = clip([(grad, weight)])
        >>> clipped  # the first row rescaled to norm 0.5, the second untouched
        tensor([[0.3000, 0.4000],
                [0.0000, 0.0500]])
        >>> clip.summaries()
        {'clip/agc_clipped_fraction': tensor(0.5000)}

    References:
        Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021, section 4.1, https://arxiv.org/abs/2102.06171
    """
    clip_factor = validation.real(_OWNER, "clip_factor", clip_factor, minimum=0.0, strictly=True)
    eps = validation.real(_OWNER, "eps", eps, minimum=0.0, strictly=True)
    return UnitwiseClipping(clip_factor, eps, _check_exclude(exclude))


def _check_exclude(value: Any) -> tuple[str, ...] | Callable[[str], bool]:
    accepted = "None, a parameter-name glob, a list of globs, or a predicate name -> bool"
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if callable(value):
        return value
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise validation.invalid(_OWNER, "exclude", accepted, value)
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise validation.invalid(_OWNER, "exclude", accepted + " (globs are non-empty strings)", value)
    return patterns
