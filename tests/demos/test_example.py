"""The example store mlruns_example/: what is committed, and what `make example` regenerates.

The store must open from any path (a clone elsewhere): each test copies the folder before opening it, so the
committed files are never touched and the copy proves no absolute path of the generating machine is needed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing

import pytest
from mlflow import MlflowClient
from PIL import Image
from support import REPOSITORY

from lightning_optloss.demos import example

COMMITTED = REPOSITORY / "mlruns_example"
PLOTS = ["gradient_histograms.png", "gradient_norms.png", "training_curves.png"]


def copy_elsewhere(folder, tmp_path):
    copy = tmp_path / "cloned" / "somewhere" / "mlruns_example"
    shutil.copytree(folder, copy)
    return copy


def recorded_locations(database):
    with closing(sqlite3.connect(database)) as connection:
        experiments = [row[0] for row in connection.execute("SELECT artifact_location FROM experiments")]
        runs = [row[0] for row in connection.execute("SELECT artifact_uri FROM runs")]
    return experiments + runs


def check_store(folder, last_logged_step=None):
    """The four documented runs, with metrics, params and artifacts reachable inside ``folder``."""
    assert all(location.startswith("mlflow-artifacts:/") for location in recorded_locations(folder / "mlflow.db"))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(example.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(example.RUN_NAMES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"OptimizeLoss/loss", "OptimizeLoss/global_norm/gradient_norm"} <= set(run.data.metrics)
        assert run.data.params["optimize_loss.seed"] == "0"
        assert run.data.tags["mlflow.source.name"] == "python -m lightning_optloss.example"
        relative = run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        root = folder / "artifacts" / relative / "optimize_loss"
        assert sorted(path.name for path in (root / "plots").iterdir()) == PLOTS
        for plot in PLOTS:
            with Image.open(root / "plots" / plot) as image:
                assert image.format == "PNG" and image.size[0] >= 800
        config = json.loads((root / "config.json").read_text())
        assert config["params"]["optimize_loss.summaries"] == [
            "learning_rate",
            "loss",
            "gradients",
            "gradient_norm",
            "global_gradient_norm",
        ]
        lines = (root / "histograms" / "gradients.jsonl").read_text().splitlines()
        assert lines and len(lines) % 8 == 0  # the CNN's 8 parameters at every logged step
        if last_logged_step is not None:
            assert json.loads(lines[-1])["step"] == last_logged_step
    clip_modes = {run.info.run_name: run.data.params["optimize_loss.clip_mode"] for run in runs}
    assert clip_modes == {
        "no-clipping": "none",
        "clip-1.0": "global_norm",
        "adaptive-clipping": "adaptive",
        "noise-0.01": "none",
    }
    return runs


def test_the_committed_example_store_opens_from_another_path(tmp_path):
    copy = copy_elsewhere(COMMITTED, tmp_path)
    check_store(copy)
    readme = (COMMITTED / "README.md").read_text()
    assert example.ui_command("mlruns_example") in readme
    assert example.ui_command("mlruns_example") in (REPOSITORY / "README.md").read_text()
    size = sum(path.stat().st_size for path in COMMITTED.rglob("*") if path.is_file())
    assert size < 5_000_000, f"mlruns_example/ is {size / 1e6:.1f} MB; keep the committed store small"


@pytest.mark.slow
def test_make_example_regenerates_a_store_that_a_server_opens_elsewhere(tmp_path):
    results = example.main(
        [
            "--output",
            str(tmp_path / "mlruns_example"),
            "--epochs",
            "1",
            "--train-batches",
            "6",
            "--log-every-n-steps",
            "2",
        ]
    )
    assert [result["run_name"] for result in results] == list(example.RUN_NAMES)
    assert all(result["steps"] == 6 for result in results)
    copy = copy_elsewhere(tmp_path / "mlruns_example", tmp_path)
    shutil.rmtree(tmp_path / "mlruns_example")  # nothing may point back to where it was generated
    runs = check_store(copy, last_logged_step=4)  # steps 0, 2, 4 of 6
    with example.mlflow_server(copy) as url:
        client = MlflowClient(url)
        run_id = runs[0].info.run_id
        assert client.get_run(run_id).info.run_name in example.RUN_NAMES
        downloaded = client.download_artifacts(run_id, "optimize_loss/plots/training_curves.png", str(tmp_path))
        with Image.open(downloaded) as image:
            assert image.format == "PNG"
