"""Time the per-step gradient pictures (:mod:`lightning_optloss.mlflow.images`) against a matplotlib figure.

Run from the repository root::

    python -m benchmarks.images [--parameters 200] [--steps 200] [--repeats 30]

For ``--parameters`` parameters it draws the gradient-norm bars, and the histogram heatmaps of the 4 largest
over ``--steps`` logged steps, each ``--repeats`` times after one warm-up (font rendering is cached), and prints
the median and minimum milliseconds of drawing alone and of drawing plus PNG encoding (as the logger stages
it), with their ratio to the end-of-fit matplotlib heatmap of the same norms (``plots.gradient_norm_heatmap``).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from lightning_optloss.gradients.histograms import Histogram, histogram_table
from lightning_optloss.mlflow import images, plots


def timings(draw: Callable[[], object], encode: Callable[[object], None], repeats: int) -> tuple[list, list]:
    """Seconds of ``draw()`` alone and of ``draw()`` then ``encode(picture)``, ``repeats`` times each."""
    encode(draw())  # warm-up
    alone, encoded = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        alone.append(time.perf_counter() - start)
        start = time.perf_counter()
        encode(draw())
        encoded.append(time.perf_counter() - start)
    return alone, encoded


def encode_png(picture: object) -> None:
    picture.save(io.BytesIO(), format="PNG", compress_level=images.PNG_COMPRESS_LEVEL)


def encode_figure(figure: object) -> None:
    figure.savefig(io.BytesIO(), format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parameters", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    names = [
        f"layers.{i // 4}.block.{['weight', 'bias', 'norm.weight', 'norm.bias'][i % 4]}" for i in range(args.parameters)
    ]
    before = 10 ** rng.normal(-2, 1, args.parameters)
    after = np.minimum(before, 0.05)
    history = {}
    for position in range(images.MAX_HISTOGRAM_PARAMETERS):
        rows = []
        for step in range(args.steps):
            grads = torch.from_numpy(rng.standard_t(4, 4096) * 1e-3 * (1 + 5 * np.exp(-step / 30)))
            histogram = Histogram.from_row(names[position], histogram_table([grads])[0].tolist())
            rows.append((step, histogram.edges, histogram.counts))
        history[names[position]] = rows
    cases = {
        "gradient_norms_image": (
            lambda: images.gradient_norms_image(names, before, after, "OptimizeLoss/gradient_norms, step 1000"),
            encode_png,
        ),
        "gradient_histograms_image": (
            lambda: images.gradient_histograms_image(history, "OptimizeLoss/gradient_histograms, step 1000"),
            encode_png,
        ),
        "matplotlib heatmap (end of fit)": (
            lambda: plots.gradient_norm_heatmap(
                list(range(args.steps)), names, np.tile(before[:, None], args.steps), "t"
            ),
            encode_figure,
        ),
    }
    print(f"{args.parameters} parameters, {args.steps} steps, {args.repeats} repeats; milliseconds")
    print(f"{'picture':34} {'draw median':>12} {'draw min':>9} {'+png median':>12} {'+png min':>9}")
    results = {}
    for label, (draw, encode) in cases.items():
        alone, encoded = timings(draw, encode, args.repeats)
        results[label] = statistics.median(encoded)
        print(
            f"{label:34} {statistics.median(alone) * 1e3:12.1f} {min(alone) * 1e3:9.1f} "
            f"{statistics.median(encoded) * 1e3:12.1f} {min(encoded) * 1e3:9.1f}"
        )
    reference = results["matplotlib heatmap (end of fit)"]
    for label in ("gradient_norms_image", "gradient_histograms_image"):
        print(f"{label} (with PNG) / matplotlib heatmap: {results[label] / reference:.2f}")


if __name__ == "__main__":
    main()
