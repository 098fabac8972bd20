"""Fixtures: one real sqlite MLflow store per session, an MLflow logger per test."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from support import PARITY_WORST, new_mlflow_logger

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*litlogger.*")
# Every fit with an MLflow logger ends by drawing PNGs (about a second); the suite runs dozens of short fits,
# so only the tests about the plots draw them (they set LIGHTNING_OPTLOSS_PLOTS=1 with monkeypatch).
os.environ.setdefault("LIGHTNING_OPTLOSS_PLOTS", "0")
# DeepSpeed compiles a small C++ op at its first start on a CPU; kept with the environment it was built for
# (another environment sharing ~/.cache/torch_extensions would make every start rebuild it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def pytest_configure(config: pytest.Config) -> None:
    # Filters set while conftest is imported are undone after collection; these last for every test.
    # The suite runs OptimizeLoss with the stock MLFlowLogger on purpose; test_mlflow_logger checks the warning.
    config.addinivalue_line("filterwarnings", "ignore:.*Use lightning_optloss.MLFlowLogger:UserWarning")


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary folder, so that nothing lands in the clone: MLflow puts the artifacts
    of an experiment created without ``artifact_location`` under ``./mlruns`` of the working directory, and a
    logger spills undelivered records there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real sqlite MLflow store for the session (creating the schema takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    path = folder / "mlflow.db"
    # MLflow caches the store per URI with its default artifact root, ./mlruns resolved against the working
    # directory at the first open: opened here, experiments without an artifact_location keep theirs in `folder`.
    working_directory = os.getcwd()
    os.chdir(folder)
    try:
        MlflowClient(f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(working_directory)
    return f"sqlite:///{path}"


@pytest.fixture
def mlflow_logger(tracking_uri: str, tmp_path: Path) -> MLFlowLogger:
    """An MLFlowLogger on the session store, in an experiment of its own."""
    return new_mlflow_logger(tracking_uri, tmp_path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PARITY_WORST:
        terminalreporter.section("TF parity: worst relative error")
        for check, error in sorted(PARITY_WORST.items()):
            terminalreporter.write_line(f"{check:45s} {error:.2e}")
