"""`python -m lightning_optloss.compare` on runs of a real sqlite store."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image
from support import TinyRegression, make_trainer, regression_data, subprocess_environment

from lightning_optloss import OptimizeLoss, adaptive_clipping_fn
from lightning_optloss.mlflow import compare


@pytest.fixture(scope="module")
def three_runs(tracking_uri, tmp_path_factory):
    """Three short runs in one experiment: no clipping, clipping at 1.0, adaptive clipping."""
    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path_factory.mktemp("compare-artifacts").as_uri()
    run_ids = {}
    for run_name, clip in (("no-clip", None), ("clip-1.0", 1.0), ("adaptive", adaptive_clipping_fn())):
        logger = MLFlowLogger(experiment, run_name=run_name, tracking_uri=tracking_uri, artifact_location=artifacts)
        trainer = make_trainer([OptimizeLoss(clip_gradients=clip, seed=0)], logger=logger, max_steps=8)
        trainer.fit(TinyRegression("Adam", 0.05), regression_data(8))
        run_ids[run_name] = logger.run_id
    return experiment, run_ids


def test_compare_draws_several_runs_in_one_png(three_runs, tracking_uri, tmp_path, capsys):
    _, run_ids = three_runs
    output = tmp_path / "compare.png"
    assert compare.main([*run_ids.values(), "--tracking-uri", tracking_uri, "--output", str(output)]) == 0
    assert "no-clip, clip-1.0, adaptive" in capsys.readouterr().out
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 1000 and image.size[1] >= 600


def test_with_an_experiment_runs_may_be_given_by_name(three_runs, tracking_uri, tmp_path):
    experiment, run_ids = three_runs
    output = tmp_path / "two.png"
    arguments = ["no-clip", run_ids["clip-1.0"], "--experiment", experiment, "--tracking-uri", tracking_uri]
    assert compare.main([*arguments, "--output", str(output)]) == 0
    assert output.stat().st_size > 10_000


def test_clip_ratio_is_one_without_clipping_and_below_one_when_clipped(three_runs, tracking_uri):
    _, run_ids = three_runs
    client = compare.open_store(tracking_uri)
    unclipped = compare.load_series(client, run_ids["no-clip"])
    clipped = compare.load_series(client, run_ids["clip-1.0"])
    assert set(compare.plots.clip_ratio(unclipped)[1]) == {1.0}
    ratios = compare.plots.clip_ratio(clipped)[1]
    assert min(ratios) < 1.0 and max(ratios) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["0123456789abcdef0123456789abcdef"], "no run with id '0123456789abcdef0123456789abcdef' in this store"),
        (["not-a-run-id"], "to give run names, add --experiment NAME"),
        (["no-clip", "--experiment", "no-such-experiment"], "no experiment named 'no-such-experiment'"),
        (["no-such-name", "--experiment", "{experiment}"], "no run with id 'no-such-name' in experiment"),
    ],
)
def test_unknown_runs_and_experiments_exit_with_status_2(
    three_runs, tracking_uri, tmp_path, capsys, arguments, message
):
    experiment, _ = three_runs
    arguments = [argument.format(experiment=experiment) for argument in arguments]
    output = tmp_path / "never.png"
    assert compare.main([*arguments, "--tracking-uri", tracking_uri, "--output", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_mistyped_store_path_is_an_error_not_a_new_store(tmp_path, capsys):
    missing = tmp_path / "nothing.db"
    assert compare.main(["abc", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no sqlite store at" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.slow
def test_the_module_runs_as_a_command_and_exits_with_2_for_an_unknown_run(tracking_uri, tmp_path):
    command = [sys.executable, "-m", "lightning_optloss.mlflow.compare", "feedbeef", "--tracking-uri", tracking_uri]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_environment(), check=False
    )
    assert finished.returncode == 2
    assert "no run with id 'feedbeef'" in finished.stderr
