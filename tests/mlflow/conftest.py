"""A real ``mlflow server`` on loopback for the MLflow tests that need one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Launched at the module's first use, without waiting: tests that need no answer run while it boots."""
    launched = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    launched.launch()
    yield launched
    launched.kill()


@pytest.fixture
def live_server(server: MlflowServer) -> MlflowServer:
    """The module's server, answering (started again if a failed test left it down)."""
    if server.running:
        server.wait_ready()
    else:
        server.start()
    return server
