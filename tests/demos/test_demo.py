"""`make demo` end to end, shortened to one epoch: a real training logged to a new sqlite MLflow store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from lightning_optloss.demos import demo


def test_demo_trains_and_logs_every_summary_to_a_new_sqlite_store(tmp_path, capsys):
    result = demo.main(["--store", str(tmp_path / "store"), "--epochs", "1", "--log-every-n-steps", "5"])
    printed = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {result['tracking_uri']}" in printed
    assert result["global_step"] == 45  # 1437 training images in batches of 32
    assert result["val_accuracy"] > 0.5
    run = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    metrics = run.data.metrics
    assert {"OptimizeLoss/loss", "OptimizeLoss/learning_rate", "OptimizeLoss/global_norm/clipped_gradient_norm"} <= set(
        metrics
    )
    assert any(key.startswith("OptimizeLoss/gradients/features.0.weight/") for key in metrics)
    assert any(key.startswith("OptimizeLoss/gradient_norm/classifier.") for key in metrics)
    assert "val_accuracy" in metrics  # the module's own torchmetrics logging reaches the same run


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-flags")


@pytest.mark.parametrize(
    ("clip", "summary"),
    [
        ("adaptive", "OptimizeLoss/global_norm/adaptive_max_gradient_norm"),
        ("agc", "OptimizeLoss/clip/agc_clipped_fraction"),
        ("autoclip", "OptimizeLoss/global_norm/autoclip_threshold"),
        ("features.*=1.0,classifier.*=0.5", "OptimizeLoss/global_norm/features._/clipped_gradient_norm"),
    ],
)
def test_demo_flags_show_the_tools_beyond_tf(clip, summary, demo_store):
    result = demo.main(
        [
            "--store",
            str(demo_store),
            "--epochs",
            "1",
            "--clip",
            clip,
            "--noise",
            "annealed",
            "--warmup",
            "20",
            "--log-every-n-steps",
            "5",
        ]
    )
    client = MlflowClient(result["tracking_uri"])
    metrics = client.get_run(result["run_id"]).data.metrics
    assert summary in metrics
    assert "OptimizeLoss/gradient_noise_scale" in metrics
    rates = {m.step: m.value for m in client.get_metric_history(result["run_id"], "OptimizeLoss/learning_rate")}
    assert rates[0] == 0.0 and rates[10] == pytest.approx(0.003 * 10 / 20, rel=1e-5)  # linear warmup
