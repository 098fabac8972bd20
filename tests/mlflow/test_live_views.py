"""MLflow live views: clip activity metrics, per-step gradient pictures through the queued logger (a real
``mlflow server`` on loopback, up and killed, then replayed), the experiment kind tag, and the pictures' pixels."""

from __future__ import annotations

import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import MLFlowLogger as StockMLFlowLogger
from mlflow import MlflowClient
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import MLFlowLogger, OptimizeLoss, agc_clipping_fn, autoclip_fn
from lightning_optloss.mlflow import images, records
from lightning_optloss.mlflow import logger as logger_module
from lightning_optloss.mlflow import replay as mlflow_replay
from lightning_optloss.mlflow.logger import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND_TAG

IMAGE_NAME = re.compile(
    r"(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]{36}(?P<thumb>\+compressed)?\.(png|webp)"
)


@pytest.fixture
def pictures_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_OPTLOSS_PLOTS", "1")


def logged_images(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """``{image key: [steps]}`` of the run's full-size images, each checked to have its thumbnail."""
    names = [Path(item.path).name for item in client.list_artifacts(run_id, "images")]
    frames: dict[str, list[int]] = {}
    thumbnails = set()
    for name in names:
        match = IMAGE_NAME.fullmatch(name)
        assert match, name
        if match["thumb"]:
            thumbnails.add(name.replace("+compressed.webp", ".png"))
        else:
            frames.setdefault(match["key"].replace("~", "/"), []).append(int(match["step"]))
    assert thumbnails == {name for name in names if name.endswith(".png")}
    return {key: sorted(steps) for key, steps in frames.items()}


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", [0, -10, 2.5, True, "10", [10]])
def test_images_every_n_steps_rejects_what_is_not_a_step_count(value):
    with pytest.raises(ValueError, match=r"images_every_n_steps.*\"auto\".*None.*integer >= 1"):
        OptimizeLoss(images_every_n_steps=value)


def test_images_every_n_steps_off_the_logging_interval_is_an_error_at_setup(mlflow_logger):
    trainer = make_trainer([OptimizeLoss(images_every_n_steps=15)], logger=mlflow_logger, log_every_n_steps=10)
    with pytest.raises(ValueError, match=r"images_every_n_steps=15 is not a multiple of .*log_every_n_steps=10"):
        trainer.fit(TinyRegression(), regression_data(2))


# ---------------------------------------------------------------------------------------------- clip metrics


def clip_metrics(mlflow_logger, clip, steps: int = 6, **kwargs) -> dict[str, dict[int, float]]:
    callback = OptimizeLoss(clip_gradients=clip, summaries=["global_gradient_norm"], **kwargs)
    make_trainer([callback], logger=mlflow_logger, max_steps=steps).fit(TinyRegression(), regression_data(steps))
    return metric_history(mlflow_logger)


def test_clip_ratio_is_the_clipped_over_the_raw_global_norm_and_active_says_whether_it_acted(mlflow_logger):
    history = clip_metrics(mlflow_logger, 0.5)
    raw, clipped = (
        history["OptimizeLoss/global_norm/gradient_norm"],
        history["OptimizeLoss/global_norm/clipped_gradient_norm"],
    )
    for step, ratio in history["OptimizeLoss/clip/ratio"].items():
        assert ratio == pytest.approx(clipped[step] / raw[step], rel=1e-6)
        assert history["OptimizeLoss/clip/active"][step] == (1.0 if raw[step] > 0.5 else 0.0)
    assert any(value == 1.0 for value in history["OptimizeLoss/clip/active"].values())  # clipping acted


def test_a_clip_above_every_norm_logs_ratio_one_and_inactive(mlflow_logger):
    history = clip_metrics(mlflow_logger, 1e6)
    assert set(history["OptimizeLoss/clip/ratio"].values()) == {1.0}
    assert set(history["OptimizeLoss/clip/active"].values()) == {0.0}


def test_no_clipping_logs_no_clip_metrics(mlflow_logger):
    assert not [key for key in clip_metrics(mlflow_logger, None) if "/clip/" in key]


def test_per_group_clipping_logs_the_activity_of_each_group(mlflow_logger):
    history = clip_metrics(mlflow_logger, {"w*": 0.05, "b*": 1e6})
    assert set(history["OptimizeLoss/clip/w_/active"].values()) == {1.0}
    assert set(history["OptimizeLoss/clip/b_/active"].values()) == {0.0}
    assert set(history["OptimizeLoss/clip/b_/ratio"].values()) == {1.0}
    for step, ratio in history["OptimizeLoss/clip/w_/ratio"].items():
        raw = history["OptimizeLoss/global_norm/w_/gradient_norm"][step]
        assert ratio == pytest.approx(0.05 / raw, rel=1e-5)
    assert set(history["OptimizeLoss/clip/active"].values()) == {1.0}  # and over all parameters


@pytest.mark.parametrize(
    "clip", [agc_clipping_fn(clip_factor=1e-3), autoclip_fn(percentile=10)], ids=["agc", "autoclip"]
)
def test_adaptive_clip_callables_log_their_activity(mlflow_logger, clip):
    history = clip_metrics(mlflow_logger, clip, steps=8)
    raw, clipped = (
        history["OptimizeLoss/global_norm/gradient_norm"],
        history["OptimizeLoss/global_norm/clipped_gradient_norm"],
    )
    for step, ratio in history["OptimizeLoss/clip/ratio"].items():
        assert 0 < ratio <= 1
        assert ratio == pytest.approx(clipped[step] / raw[step], rel=1e-6)
        assert history["OptimizeLoss/clip/active"][step] == (1.0 if ratio < 1 else 0.0)
    assert 1.0 in history["OptimizeLoss/clip/active"].values()


# ---------------------------------------------------------------------------------------------- experiment kind


def test_a_new_experiment_is_tagged_for_the_model_training_view(live_server, tmp_path):
    logger = MLFlowLogger(
        experiment_name=f"kind-{uuid.uuid4().hex[:8]}", tracking_uri=live_server.uri, spill_dir=tmp_path
    )
    experiment = MlflowClient(live_server.uri).get_experiment(logger.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT


def test_an_existing_experiment_keeps_its_tags(live_server, tmp_path):
    client = MlflowClient(live_server.uri)
    mine = client.create_experiment(f"genai-{uuid.uuid4().hex[:8]}", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    untagged = client.create_experiment(f"plain-{uuid.uuid4().hex[:8]}")
    for experiment_id in (mine, untagged):
        name = client.get_experiment(experiment_id).name
        assert MLFlowLogger(experiment_name=name, tracking_uri=live_server.uri, spill_dir=tmp_path).run_id
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(untagged).tags


# ---------------------------------------------------------------------------------------------- pictures


def fit_with_pictures(logger, steps: int = 7, **kwargs) -> None:
    kwargs.setdefault("images_every_n_steps", 3)
    callback = OptimizeLoss(clip_gradients={"w*": 0.05}, **kwargs)
    make_trainer([callback], logger=logger, max_steps=steps).fit(TinyRegression(), regression_data(steps))


def test_pictures_travel_through_the_queue_with_their_steps(live_server, tmp_path, pictures_on):
    logger = MLFlowLogger(
        experiment_name=f"img-{uuid.uuid4().hex[:8]}", tracking_uri=live_server.uri, spill_dir=tmp_path
    )
    fit_with_pictures(logger)
    client = MlflowClient(live_server.uri)
    assert logged_images(client, logger.run_id) == {
        "OptimizeLoss/gradient_norms/w_": [0, 3, 6],
        "OptimizeLoss/gradient_norms/unclipped": [0, 3, 6],
        "OptimizeLoss/gradient_histograms": [0, 3, 6],
    }
    assert client.get_run(logger.run_id).data.tags["mlflow.loggedImages"] == "True"
    assert not list(tmp_path.glob("*.artifacts/*")), "staged pictures are removed once uploaded"


def test_pictures_logged_during_an_outage_arrive_with_the_replay(live_server, tmp_path, pictures_on, recwarn):
    logger = MLFlowLogger(
        experiment_name=f"img-{uuid.uuid4().hex[:8]}",
        tracking_uri=live_server.uri,
        spill_dir=tmp_path,
        max_queue=2,
        flush_timeout=0.5,
        request_timeout=2.0,
    )
    assert logger.run_id
    live_server.kill()
    fit_with_pictures(logger)
    (spill_file,) = tmp_path.glob("*.jsonl")
    live_server.start()
    assert mlflow_replay.main([str(spill_file), "--tracking-uri", live_server.uri]) == 0
    assert mlflow_replay.main([str(spill_file), "--tracking-uri", live_server.uri]) == 0  # a resend: no new frames
    expected = [0, 3, 6]
    found = logged_images(MlflowClient(live_server.uri), logger.run_id)
    assert found == {key: expected for key in found} and len(found) == 3


def test_a_stock_logger_gets_the_pictures_from_mlflows_own_log_image(tracking_uri, tmp_path, pictures_on):
    logger = StockMLFlowLogger(
        experiment_name=f"stock-{uuid.uuid4().hex[:8]}",
        tracking_uri=tracking_uri,
        artifact_location=(tmp_path / "artifacts").as_uri(),
    )
    fit_with_pictures(logger, steps=4, summaries=["gradients"])
    found = logged_images(MlflowClient(tracking_uri), logger.run_id)
    assert found == {key: [0, 3] for key in found} and len(found) == 3


def test_no_pictures_without_an_interval(mlflow_logger, pictures_on):
    fit_with_pictures(mlflow_logger, steps=4, images_every_n_steps=None)
    assert not MlflowClient(mlflow_logger._tracking_uri).list_artifacts(mlflow_logger.run_id, "images")


def test_norm_bars_show_what_clipping_removed():
    picture = np.asarray(images.gradient_norms_image(["a", "b"], [1.0, 1.0], [1.0, 0.01], "t"))
    colours = {tuple(pixel) for pixel in picture.reshape(-1, 3)}
    assert images.AFTER_CLIPPING in colours and images.BEFORE_CLIPPING in colours
    unclipped = np.asarray(images.gradient_norms_image(["a", "b"], [1.0, 1.0], [1.0, 1.0], "t"))
    assert images.BEFORE_CLIPPING not in {tuple(pixel) for pixel in unclipped.reshape(-1, 3)}


def test_rebinning_keeps_every_element_and_places_it_by_value():
    grid = images.rebin([[0.0, 0.5, 1.0], [-1.0, -1.0, -1.0]], [[3, 1], [0, 4]], reach=1.0, bins=4)
    np.testing.assert_allclose(grid.sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(grid[0], [0, 0, 0.75, 0.25])  # [0, .5) -> cell 2, [.5, 1] -> cell 3
    np.testing.assert_allclose(grid[1], [1, 0, 0, 0])  # all elements equal to -1


def test_the_end_of_fit_heatmap_names_every_parameter_of_lightnings_demo_transformer():
    from lightning.pytorch.demos import Transformer

    from lightning_optloss.mlflow import plots

    names = [name for name, _ in Transformer(vocab_size=50).named_parameters()]
    assert len(names) > 40  # where the heatmap used to label every second row
    figure = plots.gradient_norm_heatmap([0, 10], names, np.ones((len(names), 2)), "t")
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == names


# ---------------------------------------------------------------------------------------------- image records


def image_record_at(path: Path) -> dict:
    return records.image_record("run", str(path), "OptimizeLoss/gradient_norms", 3, 1764063000123)


def test_replay_accepts_an_image_staged_beside_its_spill_file_and_refuses_one_elsewhere(tmp_path):
    spill = tmp_path / "mlflow-run-1.jsonl"
    staged = spill.with_suffix(".artifacts") / "0" / "image.png"
    assert records.outside_staging(image_record_at(staged), spill) is None
    for elsewhere in (tmp_path / "image.png", spill.with_suffix(".artifacts") / ".." / "image.png"):
        assert records.outside_staging(image_record_at(elsewhere), spill) == str(elsewhere)


def test_image_records_are_never_merged_and_a_malformed_one_is_named():
    image = image_record_at(Path("/x/image.png"))
    batch = records.batch_record("run")
    assert records.merged(image, image) is None and records.merged(batch, image) is None
    assert records.malformation(image) is None
    assert "image record" in records.malformation({**image, "step": "3"})


def test_a_picture_the_spill_folder_refuses_is_uploaded_directly(tracking_uri, tmp_path, monkeypatch):
    logger = MLFlowLogger(
        experiment_name=f"disk-{uuid.uuid4().hex[:8]}",
        tracking_uri=tracking_uri,
        artifact_location=(tmp_path / "artifacts").as_uri(),
        spill_dir=tmp_path / "spill",
    )

    def refuse(folder: Path) -> None:
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(logger_module, "make_private_folder", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_image("OptimizeLoss/gradient_norms", np.zeros((8, 8, 3), dtype=np.uint8), 4)
    assert logged_images(MlflowClient(tracking_uri), logger.run_id) == {"OptimizeLoss/gradient_norms": [4]}
    assert logger._delivery.disk.failed_writes >= 1
