"""The summary and noise kernels alone, on a model's gradients, against their floors.

Run from the repository root::

    python -m benchmarks.kernels [--model small|large] [--threads 1] [--repeats 200]

``small``: 100 gradients of 32x32 and 100 of 32 (105,600 numbers); ``large``: 3 of 4096x4096 and 3 of 4096
(50.3M numbers, the benchmark's 50M model). Each kernel is called in turn with the others, ``repeats`` times,
and its minimum (what it costs) and median (what the machine made of it) are printed in milliseconds, with
each kernel's minimum over that of Lightning's clipping (``torch.nn.utils.clip_grad_norm_`` with a bound below
the norm, so it scales every gradient, on a copy of the gradients), the denominator of issue 16's goals; the
gradients' norms (``_foreach_norm``, what any clipping reads) and ``torch.randn`` of as many numbers are the
other floors.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_optloss.gradients import histograms
from lightning_optloss.gradients import statistics as gradient_statistics
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.gradients.norms import parameter_norms

MODELS = {"small": [(32, 32), (32,)] * 100, "large": [(4096, 4096)] * 3 + [(4096,)] * 3}


def kernels(model: str) -> dict[str, Callable[[], object]]:
    """The kernels, on the gradients of ``model`` (a key of :data:`MODELS`)."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator) for shape in MODELS[model]]
    clipped = [torch.nn.Parameter(torch.empty_like(grad)) for grad in grads]  # clip_grad_norm_ reads `.grad`
    for parameter, grad in zip(clipped, grads, strict=True):
        parameter.grad = grad.clone()
    numbers = sum(grad.numel() for grad in grads)
    noise = GradientNoise(0, {i: grad.numel() for i, grad in enumerate(grads)})
    indices = list(range(len(grads)))

    def summaries() -> None:
        segments = gradient_statistics.GradientSegments(grads)
        moments = segments.moments(torch.float32)
        histograms.histogram_table(segments, bounds=moments[:, 3:5])

    return {
        "Lightning's clipping (clip_grad_norm_)": lambda: torch.nn.utils.clip_grad_norm_(clipped, 1e-3),
        "parameter_norms": lambda: parameter_norms(grads),
        "moments and histograms": summaries,
        "noise add_": lambda: noise.add_(grads, indices, 7, 1e-3),
        "noise chunk draw": lambda: noise.chunk(7, 0, grads[0].device),
        f"torch.randn({numbers})": lambda: torch.randn(numbers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls = kernels(args.model)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name in times:
        del times[name][0]  # the first call makes the cached layouts and plans
    clip = min(next(iter(times.values())))
    print(f"| kernel ({args.model} model, {args.threads} threads) | min ms | median ms | min / clipping's min |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {statistics.median(values):.3f} | {min(values) / clip:.2f} |")


if __name__ == "__main__":
    main()
