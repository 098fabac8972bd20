"""Test parts shared by the test modules: a small regression module, data, a Trainer, MLflow reads."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optloss import configure_optimizers

REPOSITORY = Path(__file__).resolve().parent.parent

# Worst relative error per TF parity check, printed at the end of the session by conftest.py.
PARITY_WORST: dict[str, float] = {}


class TinyRegression(pl.LightningModule):
    """``tanh(x @ w1 + b1) @ w2 + b2`` with mean squared error: the model of the TF reference fixtures."""

    def __init__(
        self,
        optimizer: Any = "SGD",
        learning_rate: float | None = 0.1,
        decay_fn: Callable[[float, int], float] | None = None,
        inputs: int = 4,
        hidden: int = 8,
        outputs: int = 3,
        seed: int = 0,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(inputs, hidden, generator=generator) * 0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=generator) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, outputs, generator=generator) * 0.5)
        self.b2 = nn.Parameter(torch.randn(outputs, generator=generator) * 0.1)
        self.optimizer_spec = optimizer
        self.learning_rate = learning_rate
        self.decay_fn = decay_fn
        self.optimizer_kwargs = optimizer_kwargs

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.mean((self(x) - y) ** 2)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(
            self, self.optimizer_spec, self.learning_rate, self.decay_fn, **self.optimizer_kwargs
        )


class LossScaledAt(TinyRegression):
    """TinyRegression whose loss is multiplied by ``factor`` at the batches in ``batches`` (inf: non-finite
    gradients; 1e30: float16 gradients overflow)."""

    def __init__(self, batches: set[int], factor: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scaled_batches = set(batches)
        self.factor = factor

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if batch_idx in self.scaled_batches else loss


def regression_data(steps: int, batch_size: int = 8, seed: int = 1, scale: float = 5.0) -> DataLoader:
    """The first ``steps`` batches of a fixed sequence, targets large enough that gradient norms exceed 1.

    The sequence is drawn at one size whatever ``steps`` is (torch's CPU ``randn`` draws differently for
    different sizes), so runs of different lengths see the same first batches.
    """
    pool = 256 * batch_size
    if steps * batch_size > pool:
        raise ValueError(f"regression_data holds at most 256 batches; asked for {steps}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(pool, 4, generator=generator)
    y = scale * torch.sin(x[:, :3] * 2.0) + torch.randn(pool, 3, generator=generator)
    count = steps * batch_size
    return DataLoader(TensorDataset(x[:count], y[:count]), batch_size=batch_size, shuffle=False)


def new_mlflow_logger(tracking_uri: str, tmp_path: Path) -> MLFlowLogger:
    """An MLFlowLogger on the given store, in an experiment of its own."""
    return MLFlowLogger(
        experiment_name=f"test-{uuid.uuid4().hex[:12]}",
        tracking_uri=tracking_uri,
        artifact_location=(tmp_path / "artifacts").as_uri(),
    )


def metric_values(logger: MLFlowLogger) -> dict[str, dict[int, list[float]]]:
    """Every metric of the logger's run, read back from the store: ``{key: {step: [values]}}``."""
    client = MlflowClient(logger._tracking_uri)
    history: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(logger.run_id).data.metrics:
        for metric in client.get_metric_history(logger.run_id, key):
            history.setdefault(key, {}).setdefault(metric.step, []).append(metric.value)
    return history


def metric_history(logger: MLFlowLogger) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` for runs that log each key once per step (checked)."""
    history = metric_values(logger)
    for key, steps in history.items():
        repeated = {step: values for step, values in steps.items() if len(values) > 1}
        assert not repeated, f"{key} logged more than once at steps {sorted(repeated)}"
    return {key: {step: values[0] for step, values in steps.items()} for key, steps in history.items()}


def make_trainer(callbacks: list[pl.Callback], logger: Any = False, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": logger,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def subprocess_environment(**extra: str) -> dict[str, str]:
    """The environment for ``python -m lightning_optloss...`` in a subprocess: this checkout first on the path
    (whether or not the package is installed), plus ``extra``."""
    environment = dict(os.environ, **extra)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    return environment


def run_process_group(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a new session; on timeout kill the whole group (torchrun's workers too) and fail."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as timed_out:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            message = f"{command[:4]} ran past {timeout} s (a hang?)\n{stdout[-2000:]}\n{stderr[-4000:]}"
            raise AssertionError(message) from timed_out
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
