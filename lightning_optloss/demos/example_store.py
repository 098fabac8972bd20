"""Where the example's MLflow store lives and what it holds: shared by :mod:`~lightning_optloss.demos.example`
(which writes it) and :mod:`~lightning_optloss.demos.demo` (whose closing lines point to it), so neither imports
the other at module level in both directions."""

from __future__ import annotations

EXPERIMENT = "lightning_optloss-example"
RUN_NAMES = ("no-clipping", "clip-1.0", "adaptive-clipping", "noise-0.01")
DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"


def ui_command(folder: str = "mlruns_example", port: int | None = None) -> str:
    """The ``mlflow ui`` command that shows the example store in ``folder`` (relative to the working directory)."""
    command = (
        f"mlflow ui --backend-store-uri sqlite:///{folder}/{DATABASE} --artifacts-destination {folder}/{ARTIFACTS}"
    )
    return command if port is None else f"{command} --port {port}"
