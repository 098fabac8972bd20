"""The summary and noise kernels alone, on the small model's gradients (200 tensors), against their floors.

Run from the repository root::

    python -m benchmarks.kernels [--threads 1] [--repeats 200]

Each kernel is called in turn with the others, ``repeats`` times, and its minimum (what it costs) and median
(what the machine made of it) are printed in milliseconds: the gradients' norms (``_foreach_norm``, what any
clipping reads) and ``torch.randn`` of as many numbers are the floors the issue's goals are stated against.
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


def kernels() -> dict[str, Callable[[], object]]:
    """The kernels, on 100 gradients of 32x32 and 100 of 32 (105,600 numbers)."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn((32, 32) if i % 2 == 0 else (32,), generator=generator) for i in range(200)]
    numbers = sum(grad.numel() for grad in grads)
    noise = GradientNoise(0, {i: grad.numel() for i, grad in enumerate(grads)})
    indices = list(range(len(grads)))

    def summaries() -> None:
        segments = gradient_statistics.GradientSegments(grads)
        moments = segments.moments(torch.float32)
        histograms.histogram_table(segments, bounds=moments[:, 3:5])

    return {
        "parameter_norms": lambda: parameter_norms(grads),
        "moments and histograms": summaries,
        "noise add_": lambda: noise.add_(grads, indices, 7, 1e-3),
        "noise chunk draw": lambda: noise.chunk(7, 0, grads[0].device),
        f"torch.randn({numbers})": lambda: torch.randn(numbers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls = kernels()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"| kernel ({args.threads} threads) | min ms | median ms |\n|---|---|---|")
    for name, values in times.items():
        values = values[1:]  # the first call makes the cached layouts and plans
        print(f"| {name} | {min(values):.3f} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
