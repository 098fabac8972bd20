"""A real ``mlflow server`` on 127.0.0.1, started, killed and restarted on the same port and store by tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from lightning_optloss.mlflow.server import free_port, wait_until_healthy


class MlflowServer:
    """``mlflow server`` with a sqlite store and a local artifact root under ``root``, one worker process."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.store_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = root / "artifacts"
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._log = root / "server-0.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self, timeout: float = 90.0) -> None:
        """Start it and wait until ``/health`` answers (at most ``timeout`` seconds)."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start it without waiting (it takes seconds to answer)."""
        assert self._process is None, "already running"
        self._starts += 1
        self._log = self.root / f"server-{self._starts}.log"
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store_uri]
        command += ["--default-artifact-root", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1"]
        with open(self._log, "wb") as log:
            # A session of its own, so that kill() ends the server and its uvicorn worker, and nothing else.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until ``/health`` answers, at most ``timeout`` seconds."""
        assert self._process is not None, "not launched"
        try:
            wait_until_healthy(self.uri, self._process, timeout, f"mlflow server (log: {self._log})", interval=0.1)
        except RuntimeError:
            if self._process.poll() is None:
                self.kill()
            else:
                self._process = None
            raise

    def kill(self) -> None:
        """SIGKILL the server's process group: an outage, not a shutdown."""
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=30)
        self._process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.kill()
