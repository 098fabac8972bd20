"""Gradient transforms on plain lists of tensors: no Lightning, no trainer, no hidden state.

Each function does one step of TF's ``optimize_loss`` pipeline (noise → multipliers → clipping →
statistics) in place with ``torch._foreach_*`` kernels, so its cost grows with the bytes of the gradients,
not with a Python loop over parameters doing arithmetic. None of them copies a value to the host: the
results stay on the device until :mod:`lightning_optloss.transfers` fetches them once on a logged step.

Beyond TF: :func:`clip_groups_by_global_norm_` clips groups of parameters each by its own norm
(:func:`resolve_clip_groups` finds the groups from name globs).

Norm reductions accept ``all_reduce_sum``: for gradients sharded across processes (FSDP), the caller passes a
function that sums a tensor over the shards, so norms are those of the full parameters.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lightning_optloss import validation

if TYPE_CHECKING:
    from lightning_optloss.strategies import Layout

AllReduceSum = Callable[[Tensor], Tensor]

_TRUNCATION = 2.0  # standard deviations, as tf.random.truncated_normal
_TRUNCATED_STD = 0.8796256610342398  # std of a standard normal truncated at ±2
_MASK64 = (1 << 64) - 1
_CPU_CHUNK = 1 << 18
_ACCELERATOR_CHUNK = 1 << 22
_CACHED_NOISE_PLANS = 8  # one per distinct set of gradients (optimizer, sharding)


def _norm_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def parameter_norms(grads: Sequence[Tensor], all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """The L2 norm of each gradient, as a 1-d tensor (float32, float64 if a gradient is float64).

    Half-precision gradients are reduced in float32. With ``all_reduce_sum`` the squared norms of the local
    shards are summed over processes first: exactly one collective for all parameters.
    """
    device = grads[0].device
    if {grad.dtype for grad in grads} in ({torch.float32}, {torch.float64}):  # the common case: one kernel
        try:
            stacked = torch.stack(torch._foreach_norm(list(grads), 2))
        except RuntimeError:  # gradients on several devices: the general path below
            pass
        else:
            return stacked if all_reduce_sum is None else all_reduce_sum(stacked.square()).sqrt()
    dtype = _norm_dtype(grads)
    norms: list[Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(position)
    for grad_dtype, positions in by_dtype.items():
        upcast = dtype if grad_dtype in (torch.float16, torch.bfloat16) else None
        group = torch._foreach_norm([grads[p] for p in positions], 2, dtype=upcast)
        for position, norm in zip(positions, group, strict=True):
            norms[position] = norm
    stacked = torch.stack([n.to(device, dtype) for n in norms])  # type: ignore[union-attr]
    if all_reduce_sum is not None:
        stacked = all_reduce_sum(stacked.square()).sqrt()
    return stacked


def global_norm(norms: Tensor) -> Tensor:
    """``sqrt(sum(norm_i ** 2))`` of per-parameter norms: TF's ``clip_ops.global_norm``."""
    return torch.linalg.vector_norm(norms)


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
    """
    inverse_clip = float(np.float32(1.0) / np.float32(clip_norm))
    factor = clip_norm * torch.clamp(norm.reciprocal(), max=inverse_clip) + (norm - norm)
    unit = factor.device.type == "cpu" and float(factor) == 1.0
    for multiplier, group in _by_multiplier(grads, multipliers).items():
        if multiplier != 1.0:
            torch._foreach_mul_(group, multiplier if unit else factor * multiplier)
        elif not unit:
            torch._foreach_mul_(group, factor)
    return factor


def multiply_(grads: Sequence[Tensor], multipliers: Sequence[float]) -> None:
    """``grads[i] *= multipliers[i]`` in place; one foreach kernel per distinct multiplier, 1.0 skipped."""
    for multiplier, group in _by_multiplier(grads, multipliers).items():
        if multiplier != 1.0:
            torch._foreach_mul_(group, multiplier)


def _by_multiplier(grads: Sequence[Tensor], multipliers: Sequence[float] | None) -> dict[float, list[Tensor]]:
    if multipliers is None:
        return {1.0: list(grads)}
    groups: dict[float, list[Tensor]] = {}
    for grad, multiplier in zip(grads, multipliers, strict=True):
        groups.setdefault(multiplier, []).append(grad)
    return groups


def local_moments(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Per-gradient ``[count, mean, m2, min, max]`` (``m2``: sum of squared deviations) as ``(len(grads), 5)``.

    Moments of shards combine exactly with :func:`combine_moments`; an empty shard is ``[0, 0, 0, inf, -inf]``.
    """
    rows = []
    for grad in grads:
        values = grad.detach().reshape(-1).to(dtype)
        if values.numel() == 0:
            rows.append(torch.tensor([0.0, 0.0, 0.0, math.inf, -math.inf], dtype=dtype, device=grad.device))
            continue
        variance, mean = torch.var_mean(values, correction=0)
        low, high = torch.aminmax(values)
        count = torch.full((), values.numel(), dtype=dtype, device=grad.device)
        rows.append(torch.stack([count, mean, variance * count, low, high]))
    return torch.stack(rows)


def combine_moments(parts: Tensor) -> Tensor:
    """Combine ``(shards, n, 5)`` moments of the shards of ``n`` tensors into ``(n, 5)`` (Chan et al.)."""
    count = parts[..., 0].sum(0)
    mean = (parts[..., 0] * parts[..., 1]).sum(0) / count
    m2 = parts[..., 2].sum(0) + (parts[..., 0] * (parts[..., 1] - mean).square()).sum(0)
    return torch.stack([count, mean, m2, parts[..., 3].amin(0), parts[..., 4].amax(0)], dim=-1)


def gradient_statistics(moments: Tensor, norms: Tensor) -> Tensor:
    """Per-gradient ``[mean, std, min, max, norm]`` from :func:`local_moments` rows and the gradients' norms.

    ``std`` is the population standard deviation, as TF's histogram summaries (``sum`` and ``sum_squares``)
    give it.
    """
    count, mean, m2 = moments[:, 0], moments[:, 1], moments[:, 2]
    std = (m2 / count).clamp(min=0.0).sqrt()
    return torch.stack([mean, std, moments[:, 3], moments[:, 4], norms.to(moments.dtype)], dim=-1)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit generator seed from (seed, global step, noise chunk), the same in every process."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ chunk) >> 1


def truncated_normal(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal samples cut at ±2 standard deviations (``tf.random.truncated_normal``), float32.

    On the CPU, out-of-range samples are redrawn (:func:`truncated_normal_by_redrawing`, TF's method, about
    1.6x the cost of ``torch.randn``); on accelerators the inverse CDF is used
    (:func:`truncated_normal_by_inverse_cdf`), which needs no host synchronisation. Both give the same
    distribution, not the same numbers.
    """
    if device.type == "cpu":
        return truncated_normal_by_redrawing(shape, generator, device)
    return truncated_normal_by_inverse_cdf(shape, generator, device)


def truncated_normal_by_redrawing(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Draw normals, redraw those beyond ±2 until none is left (reads the count: syncs on accelerators)."""
    sample = torch.randn(shape, generator=generator, device=device)
    flat = sample.view(-1)
    outside = (flat.abs() > _TRUNCATION).nonzero().squeeze(1)
    while outside.numel():
        redrawn = torch.randn(outside.numel(), generator=generator, device=device)
        flat[outside] = redrawn
        outside = outside[redrawn.abs() > _TRUNCATION]
    return sample


def truncated_normal_by_inverse_cdf(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """``sqrt(2) * erfinv(2u - 1)`` for ``u`` uniform between the CDF at -2 and at +2: no host sync."""
    bound = 0.5 * (1.0 + math.erf(_TRUNCATION / math.sqrt(2.0)))
    sample = torch.empty(shape, device=device).uniform_(1.0 - bound, bound, generator=generator)
    return sample.mul_(2.0).sub_(1.0).erfinv_().mul_(math.sqrt(2.0)).clamp_(-_TRUNCATION, _TRUNCATION)


@dataclass(frozen=True)
class _ChunkPlan:
    """How one noise chunk is added: its split into consecutive parts, and which part goes to which gradient.

    ``parts`` picks the parts that are added (from ``chunk.split(lengths)``), ``targets`` the flattened
    gradients they are added to, in the same order; ``slices`` are ``(k, start, stop)`` for the targets that
    take only elements ``[start, stop)`` of their gradient (one spanning several chunks). Pickers are
    ``operator.itemgetter``s, so a step does no Python loop over the parameters of a chunk.
    """

    chunk: int
    lengths: tuple[int, ...]
    parts: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    targets: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    slices: tuple[tuple[int, int, int], ...]


def _picker(positions: Sequence[int]) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """``itemgetter(*positions)``, always returning a tuple."""
    if len(positions) == 1:
        (position,) = positions
        return lambda items: (items[position],)
    return operator.itemgetter(*positions)


class GradientNoise:
    """TF's gradient noise, ``g += truncated_normal(shape) * scale``, seeded so replicas agree.

    The noise of a step is defined over the concatenation of the processed parameters, each flattened whole
    (full shape also when sharded), in index order. That sequence is cut into chunks of :meth:`chunk_size`
    numbers, and chunk ``c`` at global step ``step`` is drawn from a generator seeded with
    :func:`noise_seed` ``(seed, step, c)``. So every data-parallel replica adds the same noise (TF drew unseeded
    noise per replica, and replicas drifted apart), a resumed run adds the noise the uninterrupted run would
    have, and a shard of a parameter gets exactly its slice of the full parameter's noise (only the chunks it
    overlaps are drawn), so results do not depend on the world size.

    Cost: small tensors share chunks (one generator call for many of them, one ``_foreach_add_`` per chunk),
    large ones span several, which on a CPU are drawn on a thread per core (one intra-op thread each).

    Extra memory: a chunk per thread on a CPU (1 MiB each), one chunk on accelerators (16 MiB). A shard that is
    not a contiguous range of its parameter (tensor parallelism on a dimension other than 0) draws its
    parameter's whole noise and takes its part.

    Args:
        seed: Any integer in ``[0, 2**63)``.
        sizes: ``{parameter index: number of elements of the whole parameter}`` for every parameter that may
            receive noise. Noise for a parameter depends on the sizes of the parameters before it.
    """

    truncated_std = _TRUNCATED_STD

    def __init__(self, seed: int, sizes: Mapping[int, int]) -> None:
        self.seed = seed
        self.sizes = dict(sizes)
        self.offsets: dict[int, int] = {}
        total = 0
        for index in sorted(self.sizes):
            self.offsets[index] = total
            total += self.sizes[index]
        self.total = total
        self._reset()

    def _reset(self) -> None:
        """What is re-made after unpickling: generators (per thread), threads, plans."""
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._plans: dict[tuple[object, ...], tuple[list[_ChunkPlan], list[int]]] = {}

    @staticmethod
    def chunk_size(device: torch.device) -> int:
        """Numbers per generator seed: 2**18 on a CPU, 2**22 on accelerators (fewer kernel launches)."""
        return _CPU_CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK

    def chunk(self, step: int, chunk: int, device: torch.device) -> Tensor:
        """The unscaled float32 noise of chunk ``chunk`` at ``step`` (the last chunk may be shorter)."""
        size = self.chunk_size(device)
        length = min(size, self.total - chunk * size)
        generators = getattr(self._local, "generators", None)
        if generators is None:
            generators = self._local.generators = {}
        generator = generators.get(device)
        if generator is None:
            generator = generators[device] = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed, step, chunk))
        return truncated_normal((length,), generator, device)

    def sample(self, index: int, step: int, device: torch.device, start: int = 0, stop: int | None = None) -> Tensor:
        """The unscaled noise of elements ``[start, stop)`` of parameter ``index`` (flattened) at ``step``."""
        stop = self.sizes[index] if stop is None else stop
        first, last = self.offsets[index] + start, self.offsets[index] + stop
        size = self.chunk_size(device)
        parts = [
            self.chunk(step, c, device)[max(first, c * size) - c * size : min(last, (c + 1) * size) - c * size]
            for c in range(first // size, -(-last // size))
        ]
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def add_(
        self,
        grads: Sequence[Tensor],
        indices: Sequence[int],
        step: int,
        scale: float,
        layouts: Sequence[Layout | None] | None = None,
    ) -> None:
        """Add ``scale`` times the noise of parameter ``indices[i]`` at ``step`` to ``grads[i]`` in place.

        ``layouts[i]``, when given and not None, says where the shard ``grads[i]`` sits in its parameter. All
        gradients are on one device.
        """
        layouts = layouts if layouts is not None and any(layouts) else None
        device = grads[0].device
        try:
            flats = [grad if grad.dim() == 1 else grad.view(-1) for grad in grads]
            contiguous: tuple[bool, ...] | None = None
        except RuntimeError:  # a gradient whose elements are not one strided range: handled whole
            contiguous = tuple(grad.is_contiguous() for grad in grads)
            flats = [grad.view(-1) if ok else grad for grad, ok in zip(grads, contiguous, strict=True)]
        key = (tuple(indices), None if layouts is None else tuple(layouts), contiguous, device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _CACHED_NOISE_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._plan(indices, layouts, contiguous, device)
        chunk_plans, whole = plan
        for position in whole:  # not one range of its parameter: the parameter's noise, then its part
            layout = layouts[position] if layouts is not None else None
            full = self.sample(indices[position], step, device)
            full = full.view(layout.full_shape if layout is not None else grads[position].shape)
            grads[position].add_(layout.local_part(full) if layout is not None else full, alpha=scale)
        if device.type == "cpu" and len(chunk_plans) > 1 and torch.get_num_threads() > 1:
            pool = self._threads()
            for future in [pool.submit(self._add_chunk, step, scale, device, p, flats) for p in chunk_plans]:
                future.result()
        else:
            for chunk_plan in chunk_plans:
                self._add_chunk(step, scale, device, chunk_plan, flats)

    def _add_chunk(
        self,
        step: int,
        scale: float,
        device: torch.device,
        plan: _ChunkPlan,
        flats: list[Tensor],
    ) -> None:
        noise = self.chunk(step, plan.chunk, device)
        targets = list(plan.targets(flats))
        for k, start, stop in plan.slices:
            targets[k] = targets[k][start:stop]
        torch._foreach_add_(targets, list(plan.parts(noise.split(plan.lengths))), alpha=scale)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One intra-op thread each: several OpenMP teams on the same cores stall each other (and the
            # training thread's team) for whole scheduler slices.
            self._pool = ThreadPoolExecutor(
                max(1, torch.get_num_threads()),
                thread_name_prefix="gradient-noise",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        return self._pool

    def _plan(
        self,
        indices: Sequence[int],
        layouts: Sequence[Layout | None] | None,
        contiguous: Sequence[bool] | None,
        device: torch.device,
    ) -> tuple[list[_ChunkPlan], list[int]]:
        """The chunks these gradients overlap, each split at their boundaries; and the gradients that are not one
        contiguous range of their parameter."""
        size = self.chunk_size(device)
        pieces: dict[int, list[tuple[int, int, int, int, int]]] = {}
        whole = []
        for position, index in enumerate(indices):
            layout = layouts[position] if layouts is not None else None
            span = (0, self.sizes[index]) if layout is None else layout.flat_range()
            if span is None or (contiguous is not None and not contiguous[position]):
                whole.append(position)
                continue
            first, last = self.offsets[index] + span[0], self.offsets[index] + span[1]
            for c in range(first // size, -(-last // size)):
                low, high = max(first, c * size), min(last, (c + 1) * size)
                pieces.setdefault(c, []).append((low - c * size, high - c * size, position, low - first, high - first))
        plans = []
        for c, chunk_pieces in sorted(pieces.items()):
            lengths: list[int] = []
            parts, targets, slices = [], [], []
            cursor = 0
            for low, high, position, start, stop in sorted(chunk_pieces):
                if low > cursor:  # numbers of parameters not here (no gradient, or another process's shard)
                    lengths.append(low - cursor)
                if (start, stop) != (0, self._span_length(indices[position], layouts, position)):
                    slices.append((len(targets), start, stop))
                parts.append(len(lengths))
                targets.append(position)
                lengths.append(high - low)
                cursor = high
            end = min(size, self.total - c * size)
            if end > cursor:
                lengths.append(end - cursor)
            plans.append(_ChunkPlan(c, tuple(lengths), _picker(parts), _picker(targets), tuple(slices)))
        return plans, whole

    def _span_length(self, index: int, layouts: Sequence[Layout | None] | None, position: int) -> int:
        layout = layouts[position] if layouts is not None else None
        if layout is None:
            return self.sizes[index]
        start, stop = layout.flat_range()
        return stop - start

    def close(self) -> None:
        """Stop the drawing threads (at the end of fit); they start again when needed."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __getstate__(self) -> dict[str, object]:
        # Generators, thread-local storage and threads do not pickle; they are re-made.
        return {"seed": self.seed, "sizes": self.sizes, "offsets": self.offsets, "total": self.total}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._reset()


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
    group_of = []
    for name in names:
        group_of.append(next((g for g, p in enumerate(ordered) if fnmatch.fnmatchcase(name, p)), -1))
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
