"""Histogram and PNG artifacts of a real fit in a real sqlite MLflow store, including a fit that fails."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OPTIMIZER_SUMMARIES, OptimizeLoss, adaptive_clipping_fn, add_transfer_hook
from lightning_optloss.mlflow import plots
from lightning_optloss.mlflow.artifacts import Thinned

PARAMS = {"w1": 32, "b1": 8, "w2": 24, "b2": 3}  # TinyRegression's parameters and sizes
PLOTS = ["gradient_histograms.png", "gradient_norms.png", "training_curves.png"]


@pytest.fixture
def draw_plots(monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPTLOSS_PLOTS", "1")


def fit(callback, logger, steps, model=None, **trainer_kwargs):
    trainer = make_trainer([callback], logger=logger, max_steps=steps, **trainer_kwargs)
    trainer.fit(model or TinyRegression(), regression_data(steps))
    return trainer


def artifact_names(logger, path):
    infos = MlflowClient(logger._tracking_uri).list_artifacts(logger.run_id, path)
    return sorted(Path(info.path).name for info in infos)


def download(logger, path, tmp_path):
    return Path(MlflowClient(logger._tracking_uri).download_artifacts(logger.run_id, path, str(tmp_path)))


def histogram_lines(logger, tmp_path):
    text = download(logger, "optimize_loss/histograms/gradients.jsonl", tmp_path).read_text()
    return [json.loads(line) for line in text.splitlines()]


def assert_valid_png(path, min_width=500, min_height=300):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= min_width and height >= min_height, (path.name, image.size)
    assert width <= 2000 and height <= 2000, (path.name, image.size)


def test_histogram_lines_per_logged_step_and_parameter_count_every_element_between_min_and_max(mlflow_logger, tmp_path):
    transfers = []
    handle = add_transfer_hook(transfers.append)
    try:
        fit(OptimizeLoss(clip_gradients=1.0, summaries=OPTIMIZER_SUMMARIES), mlflow_logger, 7, log_every_n_steps=3)
    finally:
        handle.remove()
    # Steps 0, 3, 6 (histograms travel with the other summaries), and the non-finite check at the end of fit.
    assert len(transfers) == 4
    lines = histogram_lines(mlflow_logger, tmp_path)
    assert [(line["step"], line["param"]) for line in lines] == [(s, p) for s in (0, 3, 6) for p in PARAMS]
    history = metric_history(mlflow_logger)
    for line in lines:
        assert set(line) == {"step", "param", "edges", "counts"}
        assert len(line["counts"]) == 30 and len(line["edges"]) == 31
        assert sum(line["counts"]) == PARAMS[line["param"]]
        assert line["edges"] == sorted(line["edges"])
        low = history[f"OptimizeLoss/gradients/{line['param']}/min"][line["step"]]
        high = history[f"OptimizeLoss/gradients/{line['param']}/max"][line["step"]]
        assert line["edges"][0] == pytest.approx(low, rel=1e-6)
        assert line["edges"][-1] == pytest.approx(high, rel=1e-6)


def test_the_plots_are_uploaded_as_pngs_after_fit(mlflow_logger, tmp_path, draw_plots):
    clip = adaptive_clipping_fn(report_summary=True)
    fit(OptimizeLoss(clip_gradients=clip, summaries=OPTIMIZER_SUMMARIES), mlflow_logger, 12, log_every_n_steps=2)
    assert artifact_names(mlflow_logger, "optimize_loss") == ["config.json", "histograms", "plots"]
    assert artifact_names(mlflow_logger, "optimize_loss/plots") == PLOTS
    for name in PLOTS:
        assert_valid_png(download(mlflow_logger, f"optimize_loss/plots/{name}", tmp_path))


def test_default_summaries_give_the_training_curves_only(mlflow_logger, draw_plots):
    fit(OptimizeLoss(), mlflow_logger, 3)
    assert artifact_names(mlflow_logger, "optimize_loss") == ["config.json", "plots"]
    assert artifact_names(mlflow_logger, "optimize_loss/plots") == ["training_curves.png"]


class FailsAtStep(TinyRegression):
    def __init__(self, failing_step: int) -> None:
        super().__init__()
        self.failing_step = failing_step

    def training_step(self, batch, batch_idx):
        if batch_idx == self.failing_step:
            raise RuntimeError("the data loader broke")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_fails_midway_uploads_what_it_has(mlflow_logger, tmp_path, draw_plots):
    callback = OptimizeLoss(summaries=OPTIMIZER_SUMMARIES)
    with pytest.raises(RuntimeError, match="the data loader broke"):
        fit(callback, mlflow_logger, 10, model=FailsAtStep(4))
    assert sorted({line["step"] for line in histogram_lines(mlflow_logger, tmp_path)}) == [0, 1, 2, 3]
    assert artifact_names(mlflow_logger, "optimize_loss/plots") == PLOTS
    assert MlflowClient(mlflow_logger._tracking_uri).get_run(mlflow_logger.run_id).info.status == "FAILED"
    assert callback._fit.run_artifacts is None  # teardown removed the local copy


def test_local_files_are_removed_after_the_upload(mlflow_logger):
    before = set(Path(tempfile.gettempdir()).glob("optimize_loss-*"))
    fit(OptimizeLoss(summaries=OPTIMIZER_SUMMARIES), mlflow_logger, 2)
    assert set(Path(tempfile.gettempdir()).glob("optimize_loss-*")) <= before


def test_thinned_keeps_a_bounded_evenly_spaced_sample():
    thinned = Thinned(100)
    for item in range(10_000):
        thinned.add(item)
    assert 50 <= len(thinned.items) <= 100
    gaps = set(np.diff(thinned.items))
    assert gaps == {thinned.stride}
    assert thinned.items[0] == 0


def test_plots_cope_with_single_steps_missing_series_and_non_finite_values(tmp_path):
    curves = plots.training_curves({"loss": ([0], [math.nan]), "learning_rate": ([0, 1], [0.1, 0.1])}, "t")
    plots.save_png(curves, tmp_path / "curves.png")
    heatmap = plots.gradient_norm_heatmap([5], ["a", "b"], np.array([[0.0], [math.nan]]), "t")
    plots.save_png(heatmap, tmp_path / "heatmap.png")
    rows = {"const": [(0, [1.0] * 31, [4] + [0] * 29)], "nan": [(0, [None] * 31, [2] + [0] * 29)]}
    plots.save_png(plots.gradient_distributions(rows, "t"), tmp_path / "dist.png")
    comparison = plots.run_comparison([("a", {}), ("b", {"gradient_norm": ([0, 1], [2.0, 0.0])})], "t")
    plots.save_png(comparison, tmp_path / "compare.png")
    for name in ("curves", "heatmap", "dist", "compare"):
        assert_valid_png(tmp_path / f"{name}.png", min_width=300, min_height=200)
