"""A fit's OptimizeLoss artifacts in MLflow: gradient histograms as JSON lines, and PNG plots.

On rank 0, :class:`RunArtifacts` receives every logged step's summaries from the callback. Histograms are
appended to a local file as they come (memory stays bounded whatever the length of the fit); what the plots
need is kept in memory, thinned to evenly spaced logged steps: the curves and per-parameter norms (float32) at
no more than :data:`MAX_POINTS` of them, the histograms of the 4 largest parameters at no more than
:data:`DISTRIBUTION_STEPS`. The histogram file is never read back. At the end of the fit, or when it fails, it
draws the plots and uploads everything to each MLflow logger's run::

    optimize_loss/histograms/gradients.jsonl   one line per logged step and parameter (format in histograms.py)
    optimize_loss/plots/training_curves.png    loss, learning rate, global norm before/after clipping
    optimize_loss/plots/gradient_norms.png     per-parameter gradient norm over steps (summary gradient_norm)
    optimize_loss/plots/gradient_histograms.png  histograms over time of the 4 largest parameters (gradients)

(``optimize_loss/<name>/...`` for a callback ``name`` other than ``"OptimizeLoss"``.) A failure to draw or
upload is a warning that names the local folder holding the files; it never stops a training.

Drawing takes about a second at the end of a fit. Set the environment variable
``LIGHTNING_OPTLOSS_PLOTS=0`` to skip the PNGs (the histograms still go up), e.g. in a test suite running many
short fits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_optloss.common import tags
from lightning_optloss.gradients.histograms import Histogram
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow import run_info

HISTOGRAM_FILE = "histograms/gradients.jsonl"
TRAINING_CURVES = "plots/training_curves.png"
GRADIENT_NORMS = "plots/gradient_norms.png"
GRADIENT_HISTOGRAMS = "plots/gradient_histograms.png"
MAX_POINTS = 2000
DISTRIBUTION_PARAMETERS = 4
DISTRIBUTION_STEPS = 200
# Series name of the plots -> summary tag (relative to the callback's name).
CURVE_TAGS = {
    "loss": tags.LOSS,
    "learning_rate": tags.LEARNING_RATE,
    "gradient_norm": tags.GLOBAL_NORM,
    "clipped_gradient_norm": tags.CLIPPED_GLOBAL_NORM,
    "adaptive_max_gradient_norm": tags.ADAPTIVE_MAX_NORM,
}
PLOTS_ENVIRONMENT_VARIABLE = "LIGHTNING_OPTLOSS_PLOTS"


def plots_enabled() -> bool:
    """False when ``LIGHTNING_OPTLOSS_PLOTS`` is ``0`` (or ``false``/``no``/``off``)."""
    return os.environ.get(PLOTS_ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


class Thinned:
    """At most ``limit`` items, evenly spaced over all those added: when full, every other one is dropped and
    from then on only every ``stride``-th new item is kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[Any] = []
        self.stride = 1
        self.seen = 0

    def add(self, item: Any) -> None:
        if self.seen % self.stride == 0:
            self.items.append(item)
            if len(self.items) > self.limit:
                self.items = self.items[::2]
                self.stride *= 2
        self.seen += 1


class LargestHistograms:
    """The histograms of the ``parameters`` largest parameters (by elements, chosen when first seen, ties in the
    module's order) at no more than ``steps`` evenly spaced steps (:class:`Thinned`)."""

    def __init__(self, parameters: int = DISTRIBUTION_PARAMETERS, steps: int = DISTRIBUTION_STEPS) -> None:
        self.parameters = parameters
        self._sizes: dict[str, int] = {}
        self._largest: list[str] = []
        self._kept = Thinned(steps)

    def add(self, step: int, histograms: Sequence[Histogram]) -> None:
        """Take one step's histograms (any parameters; those of the largest are kept)."""
        if any(histogram.param not in self._sizes for histogram in histograms):  # the first steps only
            self._sizes.update({histogram.param: sum(histogram.counts) for histogram in histograms})
            largest = set(sorted(self._sizes, key=lambda param: -self._sizes[param])[: self.parameters])
            self._largest = [param for param in self._sizes if param in largest]  # in the module's order
        self._kept.add((step, {h.param: (h.edges, h.counts) for h in histograms if h.param in self._largest}))

    def rows(self) -> dict[str, list[tuple[int, list[float | None], list[int]]]]:
        """``{param: [(step, edges, counts), ...]}`` of the kept steps, ascending; {} before any histogram."""
        largest: dict[str, list[tuple[int, list[float | None], list[int]]]] = {p: [] for p in self._largest}
        for step, chosen in self._kept.items:
            for param, (edges, counts) in chosen.items():
                largest[param].append((step, edges, counts))
        return largest


class RunArtifacts:
    """Collects one fit's histograms and plot series on rank 0 and uploads them to every MLflow logger.

    Args:
        loggers: The Trainer's loggers; the MLflow ones receive the artifacts.
        name: The callback's ``name``: the tag prefix to read and the artifact folder (``artifact_root``).
    """

    def __init__(self, loggers: Iterable[Logger], name: str) -> None:
        self.loggers = mlflow_io.mlflow_loggers(loggers)
        self.name = name
        self.directory = Path(tempfile.mkdtemp(prefix="optimize_loss-"))
        self.upload_dir = self.directory / run_info.artifact_root(name)
        self.histogram_path = self.upload_dir / HISTOGRAM_FILE
        self._histogram_file: TextIO | None = None
        # Per logged step: the curves' values and the per-parameter norms (float32, in _norm_index order).
        self._rows = Thinned(MAX_POINTS)
        self._norm_index: dict[str, int] = {}  # parameter key of a gradient_norm tag -> position, first seen first
        self._largest = LargestHistograms()  # for the distributions plot
        self.finished = False
        self.uploaded = False
        self.run_label = self._run_label()  # read now, while the server answers: the end of fit may be an outage

    def record(
        self,
        step: int,
        scalars: Mapping[str, float],
        parameter_norms: Mapping[str, float],
        histograms: Sequence[Histogram],
    ) -> None:
        """Take one logged step's summaries (already on the host): ``{tag: value}`` of its single values,
        ``{parameter key: gradient norm}``, and the histograms."""
        if histograms:
            if self._histogram_file is None:
                self.histogram_path.parent.mkdir(parents=True, exist_ok=True)
                self._histogram_file = self.histogram_path.open("a", encoding="utf-8")
            self._histogram_file.writelines(histogram.to_json(step) + "\n" for histogram in histograms)
            self._largest.add(step, histograms)
        curves = {series: scalars[tag] for series, tag in CURVE_TAGS.items() if tag in scalars}
        norms = {
            self._norm_index.setdefault(key, len(self._norm_index)): value for key, value in parameter_norms.items()
        }
        row = np.full(len(self._norm_index), np.nan, dtype=np.float32)
        for position, value in norms.items():
            row[position] = value
        self._rows.add((step, curves, row))

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        """The plot series kept so far: ``{"loss": (steps, values), ...}`` (keys of ``CURVE_TAGS``)."""
        found: dict[str, tuple[list[int], list[float]]] = {}
        for step, curves, _ in self._rows.items:
            for series_name, value in curves.items():
                steps, numbers = found.setdefault(series_name, ([], []))
                steps.append(step)
                numbers.append(value)
        return found

    def finish(self, run_label: str | None = None) -> list[str]:
        """Close the histogram file, draw the plots and upload everything; return the files written.

        Safe to call twice (the second call does nothing): the callback calls it at the end of a fit and
        when a fit fails.
        """
        if self.finished:
            return []
        self.finished = True
        if self._histogram_file is not None:
            self._histogram_file.close()
            self._histogram_file = None
        try:
            if plots_enabled():
                self.draw(run_label or self.run_label)
        except Exception as error:  # pictures are a convenience; the data still goes up
            rank_zero_warn(f"OptimizeLoss: could not draw the plots: {error!r}")
        written = sorted(
            str(path.relative_to(self.upload_dir)) for path in self.upload_dir.rglob("*") if path.is_file()
        )
        if not written:
            self.uploaded = True
            return []
        failed = False
        for logger in self.loggers:
            try:
                mlflow_io.log_artifacts(logger, self.upload_dir, run_info.artifact_root(self.name))
            except Exception as error:
                failed = True
                rank_zero_warn(
                    f"OptimizeLoss: could not upload {written} to MLflow run {logger.run_id}: {error!r}. The files "
                    f"stay in {self.upload_dir}."
                )
        self.uploaded = not failed
        return written

    def cleanup(self) -> None:
        """Remove the local files, unless an upload failed (the warning named the folder)."""
        if self._histogram_file is not None:
            self._histogram_file.close()
            self._histogram_file = None
        if self.uploaded or not self.finished:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _run_label(self) -> str:
        for logger in self.loggers:
            try:
                return f"run {mlflow_io.run_name(logger)} ({logger.run_id[:8]})"
            except Exception:
                continue
        return "this run"

    # ------------------------------------------------------------------ pictures

    def draw(self, run_label: str) -> list[Path]:
        """Draw every plot there is data for into the upload folder; return their paths."""
        from lightning_optloss.mlflow import plots

        drawn = []
        series = self.series()
        if series:
            figure = plots.training_curves(series, f"{self.name}: training curves, {run_label}")
            drawn.append(plots.save_png(figure, self.upload_dir / TRAINING_CURVES))
        if self._norm_index:
            steps, names, norms = self._norm_matrix()
            title = f"{self.name}: gradient norm per parameter, {run_label}"
            drawn.append(
                plots.save_png(
                    plots.gradient_norm_heatmap(steps, names, norms, title), self.upload_dir / GRADIENT_NORMS
                )
            )
        largest = self._largest.rows()
        if largest:
            title = f"{self.name}: gradient distributions over time (largest parameters), {run_label}"
            figure = plots.gradient_distributions(largest, title)
            drawn.append(plots.save_png(figure, self.upload_dir / GRADIENT_HISTOGRAMS))
        return drawn

    def _norm_matrix(self) -> tuple[list[int], list[str], np.ndarray]:
        """Per-parameter norms, ``(parameters, steps)``, at the kept steps that logged any (NaN where missing)."""
        rows = [(step, row) for step, _, row in self._rows.items if np.isfinite(row).any()]
        norms = np.full((len(self._norm_index), len(rows)), np.nan)
        for column, (_, row) in enumerate(rows):
            norms[: len(row), column] = row
        return [step for step, _ in rows], list(self._norm_index), norms


def read_histograms(path: Path) -> Iterable[dict[str, Any]]:
    """The records of a ``gradients.jsonl`` file, one dict per line."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
