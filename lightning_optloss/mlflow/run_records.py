"""What OptimizeLoss records in the MLflow run besides metrics: its configuration, then the fit's artifacts.

:func:`start` runs at the start of fit on rank 0 with an MLflow logger: it logs the run configuration
(:mod:`lightning_optloss.mlflow.run_info`) and, when summaries are logged, returns the
:class:`~lightning_optloss.mlflow.artifacts.RunArtifacts` that collects the plots and histograms, which the
callback feeds every logged step and finishes at the end of fit (or after an exception). :func:`start_images`
returns the :class:`~lightning_optloss.mlflow.live_images.RunImages` that draws the per-step pictures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_optloss.common.parameters import NamedParameter
from lightning_optloss.gradients import histograms
from lightning_optloss.gradients.clipping import GroupClipping
from lightning_optloss.gradients.contract import ClipTransform
from lightning_optloss.mlflow import artifacts, run_info
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow.live_images import RunImages


def start(
    trainer: pl.Trainer, name: str, settings: Mapping[str, Any], optimizer_ids: set[int], logging: bool
) -> artifacts.RunArtifacts | None:
    """Log the configuration of the callback ``name`` to every MLflow logger; the artifacts collector if
    ``logging``.

    Args:
        trainer: The Trainer, at ``on_fit_start``.
        name: The callback's ``name``.
        settings: The keyword arguments of :func:`~lightning_optloss.mlflow.run_info.callback_configuration`
            but ``name`` and ``histogram_bins``.
        optimizer_ids: ``id`` of each of the Trainer's optimizers whose parameters the callback processes.
        logging: Whether summaries are logged (then the plots and histograms are collected).

    Returns:
        None off rank 0, without an MLflow logger, or without ``logging``.
    """
    if not trainer.is_global_zero or not mlflow_io.mlflow_loggers(trainer.loggers):
        return None
    configuration = run_info.callback_configuration(name=name, histogram_bins=histograms.HISTOGRAM_BINS, **settings)
    optimizers = [(i, optimizer) for i, optimizer in enumerate(trainer.optimizers) if id(optimizer) in optimizer_ids]
    numbered = len(trainer.optimizers) > 1
    configuration.update(run_info.optimizer_configuration(optimizers, trainer.lr_scheduler_configs, numbered))
    run_info.log_run_configuration(trainer.loggers, configuration, run_info.run_tags(trainer), name)
    return artifacts.RunArtifacts(trainer.loggers, name) if logging else None


def log_skipped_steps(trainer: pl.Trainer, name: str, steps: list[int], logged: list[int]) -> list[int]:
    """Rank 0: tag ``<name>/spike/skipped_steps`` on every MLflow run when ``steps`` (the last steps
    ``skip_spikes`` skipped) differ from ``logged``, the steps tagged before; returns the steps tagged now."""
    if steps != logged:
        run_info.log_skipped_steps(trainer.loggers, name, steps)
    return list(steps)


def start_images(
    trainer: pl.Trainer, name: str, params: Sequence[NamedParameter], clip: ClipTransform | None
) -> RunImages | None:
    """The per-step pictures of the callback ``name`` on rank 0 with an MLflow logger (None elsewhere): one
    norms picture per clip group with per-group clipping (``clip`` a
    :class:`~lightning_optloss.gradients.clipping.GroupClipping`)."""
    if not trainer.is_global_zero or not mlflow_io.mlflow_loggers(trainer.loggers):
        return None
    names = {entry.index: entry.name for entry in params}
    if not isinstance(clip, GroupClipping):
        return RunImages(trainer.loggers, name, names)
    groups = dict(zip(names, clip.groups(list(names.values())), strict=True))
    return RunImages(trainer.loggers, name, names, groups, clip.group_keys)
