"""The few calls lightning_optloss makes to an MLflow logger's run besides ``log_metrics``.

Params, tags and artifacts go through the logger's ``experiment`` client and ``run_id``, as Lightning's
``MLFlowLogger`` exposes them (its ``log_hyperparams`` cuts values at 250 characters, which the run
configuration must not suffer). With :class:`lightning_optloss.MLFlowLogger` the writes go through its queue
(``logger.queued()``), so they never block on, nor are lost to, a server that is away; reads happen at the
start of fit, while the server answers.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger
from PIL import Image

try:  # MLflow's own limits, so a future MLflow that raises them is followed
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - the values of MLflow 3.17
    MAX_PARAM_VAL_LENGTH = 6000
    MAX_PARAMS_TAGS_PER_BATCH = 100


def mlflow_loggers(loggers: Iterable[Logger]) -> list[MLFlowLogger]:
    """The MLflow loggers among ``loggers`` (Lightning's ``MLFlowLogger`` and its subclasses)."""
    return [logger for logger in loggers if isinstance(logger, MLFlowLogger)]


def _writes(logger: MLFlowLogger) -> contextlib.AbstractContextManager[object]:
    """Where ``logger.experiment``'s writes go: the logger's queue when it has one, else straight to MLflow."""
    return logger.queued() if _queues(logger) else contextlib.nullcontext()


def _queues(logger: MLFlowLogger) -> bool:
    """Whether the logger queues its writes; it is then never read from (a read would wait on an outage)."""
    return hasattr(logger, "queued")


def run_name(logger: MLFlowLogger) -> str:
    """The run's name as MLflow shows it (a queuing logger: the name it was given, else the run id)."""
    if _queues(logger):
        return logger._run_name or logger.run_id
    return logger.experiment.get_run(logger.run_id).info.run_name


def logged_params(logger: MLFlowLogger) -> dict[str, str]:
    """The params the logger's run already has; {} for a queuing logger, which reports a refused param itself."""
    if _queues(logger):
        return {}
    return dict(logger.experiment.get_run(logger.run_id).data.params)


def log_params_and_tags(logger: MLFlowLogger, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
    """Log string params and tags to the logger's run, in batches of MLflow's maximum size."""
    from mlflow.entities import Param, RunTag

    entities = [Param(key, value) for key, value in params.items()] + [RunTag(k, v) for k, v in tags.items()]
    run_id = logger.run_id
    with _writes(logger):
        for start in range(0, len(entities), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = entities[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            logger.experiment.log_batch(
                run_id,
                params=[entity for entity in chunk if isinstance(entity, Param)],
                tags=[entity for entity in chunk if isinstance(entity, RunTag)],
            )


def log_text(logger: MLFlowLogger, text: str, artifact_file: str) -> None:
    """Store ``text`` as the run artifact ``artifact_file`` (e.g. ``optimize_loss/config.json``)."""
    run_id = logger.run_id
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as directory:  # a queued upload stages (copies) the file first
        local = Path(directory) / path.name
        local.write_text(text)
        with _writes(logger):
            logger.experiment.log_artifact(run_id, str(local), path.parent.as_posix() if path.parent.parts else None)


def log_artifacts(logger: MLFlowLogger, local_dir: Path, artifact_path: str) -> None:
    """Upload every file under ``local_dir`` to the run, under ``artifact_path``."""
    run_id = logger.run_id
    with _writes(logger):
        logger.experiment.log_artifacts(run_id, str(local_dir), artifact_path)


def log_image(logger: MLFlowLogger, key: str, image: Image.Image, step: int) -> None:
    """Log ``image`` as frame ``step`` of the run's image grid under ``key`` (MLflow's ``log_image``).

    Through the queue of a :class:`lightning_optloss.MLFlowLogger` (:meth:`~lightning_optloss.MLFlowLogger.log_image`);
    for Lightning's stock logger, ``MlflowClient.log_image`` on the calling thread.
    """
    if _queues(logger):
        logger.log_image(key, image, step)
    else:
        logger.experiment.log_image(logger.run_id, image, key=key, step=step)
