"""`make demo` end to end, shortened to one epoch: a real training logged to a new sqlite MLflow store."""

from __future__ import annotations

from mlflow import MlflowClient

from lightning_optloss import demo


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
