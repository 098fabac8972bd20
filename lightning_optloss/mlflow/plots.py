"""PNG pictures of OptimizeLoss's summaries, drawn with matplotlib's Agg renderer.

Plain data in, a :class:`~matplotlib.figure.Figure` out: no MLflow, no Lightning, no global pyplot state
(figures are built with ``Figure()`` and an Agg canvas, so a training process needs no display and no
backend setting). :mod:`lightning_optloss.mlflow.artifacts` draws a run's pictures at the end of a fit and
:mod:`lightning_optloss.mlflow.compare` draws several runs side by side.

A *series* is ``(steps, values)``: two equally long sequences, the steps ascending.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[Sequence[int], Sequence[float]]
HistogramRow = tuple[int, Sequence[float | None], Sequence[int]]  # step, edges, counts

STEP_LABEL = "global step (optimizer updates)"
LABELLED_ROWS = 150  # the gradient-norm heatmap names every parameter up to this many
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas, not registered with pyplot."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parents created); return the path.

    The picture is stored with a 256-colour palette (no dithering): a third of the size of full colour for these
    plots, which matters for artifacts kept by the thousand and for the committed example store.
    """
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=dpi, facecolor="white")
    rendered.seek(0)
    with Image.open(rendered) as image:
        image.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)
    return path


def _finite(series: Series) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(series[0], dtype=float)
    values = np.asarray(series[1], dtype=float)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _log_scale_if_wide(axes, values: Sequence[np.ndarray]) -> None:
    """A logarithmic y axis when all values are positive and span more than a factor of 30."""
    joined = np.concatenate([v for v in values if len(v)]) if any(len(v) for v in values) else np.array([])
    if len(joined) and joined.min() > 0 and joined.max() / joined.min() > 30:
        axes.set_yscale("log")


def _no_data(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="0.4")
    axes.set_xticks([])
    axes.set_yticks([])


def training_curves(series: Mapping[str, Series], title: str) -> Figure:
    """Loss, learning rate and global gradient norm (before and after clipping) against the global step.

    ``series`` keys (each optional): ``loss``, ``learning_rate``, ``gradient_norm`` (before clipping),
    ``clipped_gradient_norm``, ``adaptive_max_gradient_norm``.
    """
    panels = [
        ("loss", "Training loss", "loss (training_step's return value)"),
        ("learning_rate", "Learning rate", "learning rate"),
        ("norms", "Global gradient norm (L2 over all parameters)", "L2 norm"),
    ]
    figure = new_figure(9, 8.5)
    figure.suptitle(title, fontsize=13)
    axes_list = figure.subplots(len(panels), 1, sharex=True)
    for axes, (key, panel_title, ylabel) in zip(axes_list, panels, strict=True):
        axes.set_title(panel_title, fontsize=11, loc="left")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if key == "norms":
            drawn = []
            for name, label, style in (
                ("gradient_norm", "before clipping", {"color": _COLORS[0], "linewidth": 2.6}),
                ("clipped_gradient_norm", "after clipping", {"color": _COLORS[1], "linewidth": 1.2}),
                ("adaptive_max_gradient_norm", "adaptive clip threshold", {"color": "0.35", "linestyle": "--"}),
            ):
                if name in series:
                    steps, values = _finite(series[name])
                    axes.plot(steps, values, label=label, **style)
                    drawn.append(values)
            if not drawn:
                _no_data(axes, "not logged (summary 'global_gradient_norm' or 'gradient_norm')")
                continue
            _log_scale_if_wide(axes, drawn)
            axes.legend(loc="upper right", fontsize=9)
        elif key in series:
            steps, values = _finite(series[key])
            axes.plot(steps, values, color=_COLORS[0] if key == "loss" else _COLORS[2], linewidth=1.4)
            _log_scale_if_wide(axes, [values])
        else:
            _no_data(axes, f"not logged (summary {key!r})")
    axes_list[-1].set_xlabel(STEP_LABEL)
    return figure


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    """Cell boundaries halfway between consecutive steps (one step wide at the ends)."""
    centres = np.asarray(steps, dtype=float)
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middles = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middles[0]], middles, [2 * centres[-1] - middles[-1]]])


def gradient_norm_heatmap(steps: Sequence[int], names: Sequence[str], norms: np.ndarray, title: str) -> Figure:
    """Per-parameter gradient norms over steps: one row per parameter, colour = log10 of the L2 norm.

    ``norms`` has shape ``(len(names), len(steps))``; NaN marks a step where a parameter had no value.
    """
    values = np.asarray(norms, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(values > 0, np.log10(values), np.nan)
    # Every row labelled: about 15 pixels per row at 7-point type (the picture grows with the model), up to
    # LABELLED_ROWS rows; beyond that every n-th row is labelled.
    height = 2.0 + (0.32 if len(names) <= 12 else 0.15) * min(len(names), LABELLED_ROWS)
    figure = new_figure(10, max(height, 3.5))
    axes = figure.subplots()
    finite = logs[np.isfinite(logs)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    mesh = axes.pcolormesh(
        _step_edges(steps), np.arange(len(names) + 1), np.ma.masked_invalid(logs), cmap="viridis", vmin=low, vmax=high
    )
    axes.set_ylim(len(names), 0)  # first parameter (the input side of the network) on top
    every = max(1, math.ceil(len(names) / LABELLED_ROWS))
    axes.set_yticks(np.arange(len(names))[::every] + 0.5, [names[i] for i in range(0, len(names), every)])
    axes.tick_params(axis="y", labelsize=7 if len(names) > 12 else 9)
    axes.set_xlabel(STEP_LABEL)
    axes.set_title(title, fontsize=12)
    colorbar = figure.colorbar(mesh, ax=axes, pad=0.01)
    colorbar.set_label("log10 of the gradient's L2 norm (after clipping)")
    return figure


def gradient_distributions(histograms: Mapping[str, Sequence[HistogramRow]], title: str) -> Figure:
    """Gradient distributions over time: per parameter, a heatmap of bin densities with percentile lines.

    Each column is one logged step's histogram, re-binned (uniform within a bin) onto a value grid shared by
    all steps of the parameter, from the smallest minimum to the largest maximum; the colour is the fraction
    of the parameter's gradient elements in a cell (log scale, down to one element of the largest parameter).
    White lines: the median (solid) and the 16th and 84th percentiles (dashed), read from the same histograms.
    """
    names = list(histograms)
    columns = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / columns))
    figure = new_figure(6.5 * columns, 4.3 * rows + 0.6)
    figure.suptitle(title, fontsize=13)
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes in grid[len(names) :]:
        axes.set_visible(False)
    largest = max((sum(rows[0][2]) for rows in histograms.values() if rows), default=1)
    floor = max(-6.0, math.floor(math.log10(0.5 / max(largest, 1))))  # one element of the largest is visible
    mesh = None
    for axes, name in zip(grid, names, strict=False):
        usable = [row for row in histograms[name] if all(e is not None for e in row[1]) and sum(row[2]) > 0]
        numel = sum(usable[0][2]) if usable else 0
        axes.set_title(f"{name}  ({numel:,} values)", fontsize=10, loc="left")
        if not usable:
            _no_data(axes, "no finite histogram")
            continue
        steps = [row[0] for row in usable]
        low = min(float(row[1][0]) for row in usable)
        high = max(float(row[1][-1]) for row in usable)
        if high - low <= 0:
            low, high = low - 0.5, high + 0.5
        value_edges = np.linspace(low, high, 81)
        fractions = np.empty((len(value_edges) - 1, len(usable)))
        percentiles = np.empty((3, len(usable)))
        for column, (_, edges, counts) in enumerate(usable):
            cdf_edges, cdf = histogram_cdf(edges, counts)
            fractions[:, column] = np.diff(_cdf_at(value_edges, cdf_edges, cdf))
            percentiles[:, column] = _quantiles([0.16, 0.5, 0.84], cdf_edges, cdf)
        with np.errstate(divide="ignore"):
            shown = np.where(fractions > 0, np.log10(np.maximum(fractions, 1e-12)), np.nan)
        mesh = axes.pcolormesh(
            _step_edges(steps), value_edges, np.ma.masked_invalid(shown), cmap="magma", vmin=floor, vmax=0.0
        )
        axes.plot(steps, percentiles[1], color="white", linewidth=1.2, label="median")
        axes.plot(steps, percentiles[0], color="white", linewidth=0.9, linestyle="--", label="16th / 84th percentile")
        axes.plot(steps, percentiles[2], color="white", linewidth=0.9, linestyle="--")
        axes.set_facecolor("black")
        axes.set_xlabel(STEP_LABEL)
        axes.set_ylabel("gradient value (after clipping)")
    if mesh is not None:
        grid[0].legend(loc="upper right", fontsize=8, facecolor="0.25", labelcolor="white", framealpha=0.8)
        colorbar = figure.colorbar(mesh, ax=list(grid[: len(names)]), shrink=0.8, pad=0.01)
        colorbar.set_label("log10 fraction of the parameter's elements in the cell")
    return figure


def histogram_cdf(edges: Sequence[float], counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The cumulative fraction of elements at each edge of a histogram (0 at the first edge, 1 at the last)."""
    total = float(sum(counts))
    cdf = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=float)) / total])
    return np.asarray(edges, dtype=float), cdf


def _cdf_at(values: np.ndarray, edges: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    if edges[-1] <= edges[0]:  # every element has the same value
        return (values >= edges[0]).astype(float)
    return np.interp(values, edges, cdf, left=0.0, right=1.0)


def _quantiles(fractions: Sequence[float], edges: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Values below which the given fractions of elements lie (uniform within a bin)."""
    rising = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(fractions, cdf[rising], edges[rising])


def run_comparison(runs: Sequence[tuple[str, Mapping[str, Series]]], title: str) -> Figure:
    """Several runs on shared axes: loss, global norm, clip ratio (after / before clipping), learning rate.

    ``runs`` is ``[(label, series)]`` with the series keys of :func:`training_curves`. A run that does not
    clip has a clip ratio of 1 at every step where its norm was logged.
    """
    figure = new_figure(13, 8.5)
    figure.suptitle(title, fontsize=13)
    (loss_axes, norm_axes), (ratio_axes, rate_axes) = figure.subplots(2, 2, sharex=True)
    panels = [
        (loss_axes, "Training loss", "loss"),
        (norm_axes, "Global gradient norm (solid: before clipping, dashed: after)", "L2 norm"),
        (ratio_axes, "Clip ratio: global norm after / before clipping", "ratio (1 = not clipped)"),
        (rate_axes, "Learning rate", "learning rate"),
    ]
    for axes, panel_title, ylabel in panels:
        axes.set_title(panel_title, fontsize=11, loc="left")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
    losses, norms = [], []
    # Runs often share a learning rate, and runs that do not clip share a ratio of 1: each run marks every
    # len(runs)-th point, starting at its own offset, so lines on top of each other still show every run.
    for number, (label, series) in enumerate(runs):
        color = _COLORS[number % len(_COLORS)]
        style = {
            "color": color,
            "linewidth": 1.3,
            "marker": _MARKERS[number % len(_MARKERS)],
            "markersize": 5,
            "markevery": (number % len(runs), len(runs)),
        }
        if "loss" in series:
            steps, values = _finite(series["loss"])
            loss_axes.plot(steps, values, label=label, **style)
            losses.append(values)
        if "gradient_norm" in series:
            steps, before = _finite(series["gradient_norm"])
            norm_axes.plot(steps, before, label=label, **style)
            norms.append(before)
            ratio_steps, ratio = clip_ratio(series)
            ratio_axes.plot(ratio_steps, ratio, label=label, **style)
        if "clipped_gradient_norm" in series:
            steps, after = _finite(series["clipped_gradient_norm"])
            norm_axes.plot(steps, after, color=color, linewidth=1.1, linestyle="--")
            norms.append(after)
        if "learning_rate" in series:
            steps, values = _finite(series["learning_rate"])
            rate_axes.plot(steps, values, label=label, **style)
    _log_scale_if_wide(loss_axes, losses)
    _log_scale_if_wide(norm_axes, norms)
    ratio_axes.set_ylim(0.0, 1.05)
    for axes in (ratio_axes, rate_axes):
        axes.set_xlabel(STEP_LABEL)
    handles, labels = loss_axes.get_legend_handles_labels()
    if not handles:
        handles, labels = norm_axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=10)
    return figure


def clip_ratio(series: Mapping[str, Series]) -> tuple[np.ndarray, np.ndarray]:
    """``clipped_gradient_norm / gradient_norm`` at the steps that logged both; 1 where no clipping was logged."""
    steps, before = _finite(series["gradient_norm"])
    if "clipped_gradient_norm" not in series:
        return steps, np.ones_like(before)
    after = dict(zip(*_finite(series["clipped_gradient_norm"]), strict=True))
    shared = [
        (step, after[step] / norm) for step, norm in zip(steps, before, strict=True) if step in after and norm > 0
    ]
    if not shared:
        return np.array([]), np.array([])
    ratio_steps, ratio = zip(*shared, strict=True)
    return np.asarray(ratio_steps), np.asarray(ratio)
