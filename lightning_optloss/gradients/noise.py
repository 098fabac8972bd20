"""TF's gradient noise: a truncated normal added to every gradient, seeded so that it is identical on every
replica, for any sharding, and on resume (see :class:`GradientNoise`)."""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_optloss.gradients.contract import Layout


_TRUNCATION = 2.0  # standard deviations, as tf.random.truncated_normal


_TRUNCATED_STD = 0.8796256610342398  # std of a standard normal truncated at ±2


_CDF_SPAN = math.erf(_TRUNCATION / math.sqrt(2.0))  # P(|z| < 2) = 2 * Phi(2) - 1


_MASK64 = (1 << 64) - 1


_CPU_CHUNK = 1 << 18


_ACCELERATOR_CHUNK = 1 << 22


_CACHED_NOISE_PLANS = 8  # one per distinct set of gradients (optimizer, sharding)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit generator seed from (seed, global step, noise chunk), the same in every process."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ chunk) >> 1


def truncated_normal(
    shape: Sequence[int], generator: torch.Generator, device: torch.device, out: Tensor | None = None
) -> Tensor:
    """Standard normal samples cut at ±2 standard deviations (``tf.random.truncated_normal``'s law), float32.

    By the inverse CDF, ``sqrt(2) * erfinv(v)`` for ``v`` uniform in ``[-erf(sqrt(2)), erf(sqrt(2)))`` (the
    normal's mass within ±2): one generator call and three elementwise passes, no host synchronisation on
    any device, 1.2-1.5x the cost of ``torch.randn`` on a CPU. TF redraws the samples beyond ±2 instead: the
    same distribution, other numbers (TF's noise was unseeded, so it had no numbers to keep). ``out`` (float32,
    of ``shape``, on ``device``), when given, receives the samples (the same numbers as without it).

    >>> sample = truncated_normal((100_000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    >>> bool(sample.abs().max() <= 2.0), round(float(sample.std()), 2)
    (True, 0.88)
    """
    sample = torch.empty(shape, device=device) if out is None else out
    sample.uniform_(-_CDF_SPAN, _CDF_SPAN, generator=generator)
    # clamp_: erfinv's rounding at the ends of the interval may land a float32 ulp beyond ±2.
    return sample.erfinv_().mul_(math.sqrt(2.0)).clamp_(-_TRUNCATION, _TRUNCATION)


@dataclass(frozen=True)
class _ChunkPlan:
    """How one noise chunk is added: its cut into consecutive parts, and which part goes to which gradient.

    ``templates`` are ``meta`` tensors with the shapes of the consecutive parts (a gradient's shape for a
    gradient that lies whole in the chunk, 1-d for a range of one and for the numbers of parameters not
    here); the chunk is cut into views of those shapes in one C++ call (``unflatten_dense_tensors``, as DDP's
    buckets). ``parts`` picks the parts that are added, ``targets`` the gradients they are added to, in the
    same order; ``slices`` are ``(k, start, stop)`` for the targets that take only elements ``[start, stop)``
    of their (flattened) gradient, one spanning several chunks. Pickers are ``operator.itemgetter``s, so a
    step does no Python loop over the parameters of a chunk.
    """

    chunk: int
    templates: tuple[Tensor, ...]
    parts: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    targets: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    slices: tuple[tuple[int, int, int], ...]

    def cut(self, noise: Tensor) -> tuple[Tensor, ...]:
        """The parts of ``noise`` (this chunk's numbers) that are added, as views shaped like their targets."""
        return self.parts(torch._C._nn.unflatten_dense_tensors(noise, self.templates))


@dataclass(frozen=True)
class _NoisePlan:
    """The chunk plans of one set of gradients, the gradients handled whole, and for gradients that lie in one
    chunk, ``cut``: a buffer that chunk is drawn into every step and its parts cut once (no Python work per
    gradient and step)."""

    chunks: list[_ChunkPlan]
    whole: list[int]
    cut: tuple[Tensor, tuple[Tensor, ...]] | None


def _template(shape: Sequence[int]) -> Tensor:
    """A tensor with this shape and no storage: what ``unflatten_dense_tensors`` cuts a chunk by."""
    return torch.empty(shape, device="meta")


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

    Extra memory: a chunk per thread on a CPU (1 MiB each), one chunk on accelerators (16 MiB). When all the
    gradients of a set lie in one chunk, that chunk's buffer is kept between steps (drawn in place, its
    gradient-shaped views made once), one per cached set of gradients. A shard that is not a contiguous range
    of its parameter (tensor parallelism on a dimension other than 0) draws its parameter's whole noise and
    takes its part.

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
        self._plans: dict[tuple[object, ...], _NoisePlan] = {}

    @staticmethod
    def chunk_size(device: torch.device) -> int:
        """Numbers per generator seed: 2**18 on a CPU, 2**22 on accelerators (fewer kernel launches)."""
        return _CPU_CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK

    def chunk(self, step: int, chunk: int, device: torch.device, out: Tensor | None = None) -> Tensor:
        """The unscaled float32 noise of chunk ``chunk`` at ``step`` (the last chunk may be shorter), in ``out``
        when given."""
        size = self.chunk_size(device)
        length = min(size, self.total - chunk * size)
        generators = getattr(self._local, "generators", None)
        if generators is None:
            generators = self._local.generators = {}
        generator = generators.get(device)
        if generator is None:
            generator = generators[device] = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed, step, chunk))
        return truncated_normal((length,), generator, device, out)

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
        shapes = tuple(grad.shape for grad in grads)
        contiguous = None
        if not all(grad.is_contiguous() for grad in grads):  # not one strided range: those are handled whole
            contiguous = tuple(grad.is_contiguous() for grad in grads)
        key = (tuple(indices), None if layouts is None else tuple(layouts), shapes, contiguous, device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _CACHED_NOISE_PLANS:
                self._plans.clear()
            chunk_plans, whole = self._plan(indices, layouts, shapes, contiguous, device)
            cut = None
            if len(chunk_plans) == 1:
                size = self.chunk_size(device)
                buffer = torch.empty(min(size, self.total - chunk_plans[0].chunk * size), device=device)
                cut = (buffer, chunk_plans[0].cut(buffer))
            plan = self._plans[key] = _NoisePlan(chunk_plans, whole, cut)
        chunk_plans, whole = plan.chunks, plan.whole
        for position in whole:  # not one range of its parameter: the parameter's noise, then its part
            layout = layouts[position] if layouts is not None else None
            full = self.sample(indices[position], step, device)
            full = full.view(layout.full_shape if layout is not None else grads[position].shape)
            grads[position].add_(layout.local_part(full) if layout is not None else full, alpha=scale)
        if plan.cut is not None:  # one chunk: drawn in place into the buffer its cut views
            self.chunk(step, chunk_plans[0].chunk, device, out=plan.cut[0])
            self._add_parts(scale, chunk_plans[0], grads, plan.cut[1])
        elif device.type == "cpu" and len(chunk_plans) > 1 and torch.get_num_threads() > 1:
            pool = self._threads()
            for future in [pool.submit(self._add_chunk, step, scale, device, p, grads) for p in chunk_plans]:
                future.result()
        else:
            for chunk_plan in chunk_plans:
                self._add_chunk(step, scale, device, chunk_plan, grads)

    def _add_chunk(
        self,
        step: int,
        scale: float,
        device: torch.device,
        plan: _ChunkPlan,
        grads: Sequence[Tensor],
    ) -> None:
        self._add_parts(scale, plan, grads, plan.cut(self.chunk(step, plan.chunk, device)))

    @staticmethod
    def _add_parts(scale: float, plan: _ChunkPlan, grads: Sequence[Tensor], parts: tuple[Tensor, ...]) -> None:
        targets = plan.targets(grads)
        if plan.slices:
            targets = list(targets)
            for k, start, stop in plan.slices:
                targets[k] = targets[k].view(-1)[start:stop]
        torch._foreach_add_(targets, parts, alpha=scale)

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
        shapes: Sequence[torch.Size],
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
            templates: list[Tensor] = []
            parts, targets, slices = [], [], []
            cursor = 0
            for low, high, position, start, stop in sorted(chunk_pieces):
                if low > cursor:  # numbers of parameters not here (no gradient, or another process's shard)
                    templates.append(_template((low - cursor,)))
                if (start, stop) != (0, self._span_length(indices[position], layouts, position)):
                    slices.append((len(targets), start, stop))
                    templates.append(_template((high - low,)))
                else:
                    templates.append(_template(shapes[position]))
                parts.append(len(templates) - 1)
                targets.append(position)
                cursor = high
            end = min(size, self.total - c * size)
            if end > cursor:
                templates.append(_template((end - cursor,)))
            plans.append(_ChunkPlan(c, tuple(templates), _picker(parts), _picker(targets), tuple(slices)))
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
