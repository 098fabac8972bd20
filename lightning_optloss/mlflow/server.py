"""Starting a local ``mlflow server``: a free loopback port, and waiting until it answers ``/health``.

Used by :mod:`lightning_optloss.demos.example` (the example store's UI) and by the tests' restartable server
(``tests/mlflow_server.py``).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the MLflow server at ``url`` answers ``/health`` with 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``url``'s ``/health`` every ``interval`` seconds until it answers.

    Raises:
        RuntimeError: naming ``what`` (the command, or where its log is) when ``process`` exits first or
            ``timeout`` seconds pass; the process is left as it is.
    """
    deadline = time.monotonic() + timeout
    while not healthy(url, timeout=min(2.0, max(interval * 2, 1.0))):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer at {url} within {timeout} s")
        time.sleep(interval)
