"""What a run was configured with, as MLflow params, tags and ``optimize_loss/config.json``.

:class:`~lightning_optloss.OptimizeLoss` calls :func:`log_run_configuration` once per fit, on rank 0, at
``on_fit_start`` (the MLflow run exists by then). Every key starts with ``optimize_loss.`` (with a callback
``name`` other than ``"OptimizeLoss"``, params start with ``optimize_loss.<name>.``), so they never collide
with the module's ``save_hyperparameters`` params. Values are strings: numbers as Python writes them, lists
and dicts as JSON, ``None`` as ``None``.

MLflow caps a param value at ``MAX_PARAM_VAL_LENGTH`` characters (6000 in MLflow 3.17, read from
``mlflow.utils.validation``). A longer value is logged cut, ending with
``... [truncated: N characters; full value in optimize_loss/config.json]``, and listed in the tag
``optimize_loss.truncated_params``; the JSON artifact always holds every value in full.
"""

from __future__ import annotations

import functools
import json
import platform
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_optloss.common import tags
from lightning_optloss.gradients.adaptive_clipping import AdaptiveClipping
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.tf.configure import LearningRateDecay

PREFIX = "optimize_loss"
DEFAULT_NAME = "OptimizeLoss"
CONFIG_FILE = "config.json"
TRUNCATED_TAG = f"{PREFIX}.truncated_params"


def param_prefix(name: str) -> str:
    """``optimize_loss.`` for the default callback name, ``optimize_loss.<name>.`` for any other."""
    return f"{PREFIX}." if name == DEFAULT_NAME else f"{PREFIX}.{name}."


def artifact_root(name: str) -> str:
    """The run's artifact folder of a callback: ``optimize_loss`` (``optimize_loss/<name>`` for other names)."""
    return PREFIX if name == DEFAULT_NAME else f"{PREFIX}/{name}"


def describe_callable(fn: Any) -> str:
    """A stable, address-free description: ``module.qualname``, a partial with its arguments, or a repr."""
    if isinstance(fn, functools.partial):
        arguments = [repr(a) for a in fn.args] + [f"{key}={value!r}" for key, value in fn.keywords.items()]
        return f"{describe_callable(fn.func)}({', '.join(arguments)})"
    plain = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)
    if not isinstance(fn, plain) and type(fn).__repr__ is not object.__repr__:
        return repr(fn)
    owner = fn if isinstance(fn, plain) else type(fn)
    qualname = getattr(owner, "__qualname__", None) or type(owner).__qualname__
    module = getattr(owner, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def clip_mode(clip: Any) -> str:
    """``none``, ``global_norm`` (a float), ``per_group`` (a dict of globs), ``adaptive``
    (:func:`adaptive_clipping_fn`) or ``callable``."""
    if clip is None:
        return "none"
    if isinstance(clip, float):
        return "global_norm"
    if isinstance(clip, dict):
        return "per_group"
    return "adaptive" if isinstance(clip, AdaptiveClipping) else "callable"


def callback_configuration(
    *,
    name: str,
    gradient_noise_scale: float | Callable[[int], float] | None,
    multipliers: Mapping[str, float],
    clip_gradients: Any,
    variables: Sequence[str] | None,
    summaries: Sequence[str],
    increment_global_step: bool,
    seed: int | None,
    update_ops: Sequence[Callable[[], Any]],
    colocate_gradients_with_ops: bool,
    histogram_bins: int,
    skip_spikes: Any = None,
) -> dict[str, Any]:
    """The callback's arguments as resolved at fit start (parameter names, the seed drawn), unprefixed;
    ``skip_spikes`` only when it is set."""
    plain_clip = clip_gradients is None or isinstance(clip_gradients, (float, dict))
    spikes = {} if skip_spikes is None else {"skip_spikes": repr(skip_spikes)}
    return {
        "name": name,
        "gradient_noise_scale": _plain(gradient_noise_scale),
        "gradient_multipliers": dict(multipliers) or None,
        "clip_mode": clip_mode(clip_gradients),
        "clip_gradients": clip_gradients if plain_clip else describe_callable(clip_gradients),
        "variables": list(variables) if variables is not None else "all",
        "summaries": list(summaries),
        "increment_global_step": increment_global_step,
        "seed": seed,
        "update_ops": [describe_callable(op) for op in update_ops] or None,
        "colocate_gradients_with_ops": colocate_gradients_with_ops,
        "histogram_bins": histogram_bins if "gradients" in summaries else None,
        **spikes,
    }


def _plain(value: Any) -> Any:
    """A JSON-able copy: tuples as lists, 0-d tensors as numbers, other objects described."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    return describe_callable(value)


def optimizer_configuration(
    optimizers: Sequence[tuple[int, Optimizer]], lr_scheduler_configs: Iterable[LRSchedulerConfig], numbered: bool
) -> dict[str, Any]:
    """Each optimizer's class and param-group hyperparameters (all but ``params``), and its schedule.

    ``lr`` is the rate the group was configured with (a scheduler's ``initial_lr``), not the scheduled rate of
    the current step (that is the metric ``<name>/learning_rate``), so runs compare by their configuration
    and a resumed fit logs the same value.

    Keys: ``optimizer`` (class), ``optimizer.<hyperparameter>``; with several param groups
    ``optimizer.param_groups.<g>.<hyperparameter>``; with several optimizers on the Trainer (``numbered``)
    ``optimizer.<i>...``. The schedule: ``learning_rate_decay_fn`` (the function) and
    ``learning_rate_decay_fn.<argument>`` for each argument of a ``functools.partial``, or ``lr_scheduler``
    (class), ``lr_scheduler.interval`` and ``lr_scheduler.frequency`` for other schedulers; with several
    optimizers under ``optimizer.<i>.``.
    """
    configs = list(lr_scheduler_configs)
    described: dict[str, Any] = {}
    for index, optimizer in optimizers:
        base = f"optimizer.{index}" if numbered else "optimizer"
        described[base] = describe_callable(type(optimizer))
        groups = optimizer.param_groups
        for number, group in enumerate(groups):
            group_base = f"{base}.param_groups.{number}" if len(groups) > 1 else base
            for key, value in group.items():
                if key not in ("params", "initial_lr"):
                    described[f"{group_base}.{key}"] = _plain(group.get("initial_lr", value) if key == "lr" else value)
        schedule_base = f"{base}." if numbered else ""
        schedulers = [config for config in configs if getattr(config.scheduler, "optimizer", None) is optimizer]
        if not schedulers:
            described[f"{schedule_base}learning_rate_decay_fn"] = None
        for config in schedulers:
            described.update(_schedule(schedule_base, config))
    return described


def _schedule(base: str, config: LRSchedulerConfig) -> dict[str, Any]:
    scheduler = config.scheduler
    if isinstance(scheduler, LearningRateDecay):
        fn = scheduler.decay_fn
        key = f"{base}learning_rate_decay_fn"
        if not isinstance(fn, functools.partial):
            return {key: describe_callable(fn)}
        described: dict[str, Any] = {key: describe_callable(fn.func)}
        if fn.args:
            described[f"{key}.args"] = _plain(list(fn.args))
        for argument, value in fn.keywords.items():
            described[f"{key}.{argument}"] = _plain(value)
        return described
    key = f"{base}lr_scheduler"
    return {
        key: describe_callable(type(scheduler)),
        f"{key}.interval": config.interval,
        f"{key}.frequency": config.frequency,
    }


def run_tags(trainer: pl.Trainer) -> dict[str, str]:
    """``optimize_loss.*`` tags: strategy, world size, precision, accelerator and the library versions."""
    return {
        f"{PREFIX}.strategy": type(trainer.strategy).__name__,
        f"{PREFIX}.world_size": str(trainer.world_size),
        f"{PREFIX}.precision": str(trainer.precision),
        f"{PREFIX}.accelerator": type(trainer.accelerator).__name__,
        f"{PREFIX}.version": _version("lightning-optloss"),
        f"{PREFIX}.torch_version": torch.__version__,
        f"{PREFIX}.lightning_version": pl.__version__,
        f"{PREFIX}.mlflow_version": _version("mlflow-skinny", "mlflow"),
        f"{PREFIX}.python_version": platform.python_version(),
    }


def _version(*distributions: str) -> str:
    for distribution in distributions:
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    if distributions[0] == "lightning-optloss":
        from lightning_optloss.common.version import __version__

        return __version__
    return "unknown"


def format_value(value: Any) -> str:
    """A param value as a string: JSON for lists and dicts, ``str`` for the rest."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def capped(text: str, limit: int, full_value_in: str) -> tuple[str, bool]:
    """``text`` within ``limit`` characters; a cut value says so and names the artifact with the full one."""
    if len(text) <= limit:
        return text, False
    note = f" ... [truncated: {len(text)} characters; full value in {full_value_in}]"
    return text[: limit - len(note)] + note, True


def log_run_configuration(
    loggers: Iterable[Logger], configuration: Mapping[str, Any], tags: Mapping[str, str], name: str = DEFAULT_NAME
) -> dict[str, str]:
    """Log ``configuration`` (unprefixed keys, plain values) as params and ``tags`` to every MLflow logger.

    Each MLflow logger's run gets the params (prefixed, capped at MLflow's limit), the tags, and the artifact
    ``<artifact_root(name)>/config.json``: ``{"params": {key: full value}, "tags": {...}}`` with values as
    JSON values (not strings). Params the run already has with the same value are skipped; one with another
    value (a second ``fit`` on the same run with another configuration) keeps its first value, with a warning
    (MLflow refuses to change a param). A logging failure is a warning: it never stops training.

    Returns:
        The params as logged (strings, capped).
    """
    prefix = param_prefix(name)
    config_file = f"{artifact_root(name)}/{CONFIG_FILE}"
    full = {f"{prefix}{key}": value for key, value in configuration.items()}
    params: dict[str, str] = {}
    truncated = []
    for key, value in full.items():
        params[key], cut = capped(format_value(value), mlflow_io.MAX_PARAM_VAL_LENGTH, config_file)
        if cut:
            truncated.append(key)
    all_tags = dict(tags)
    if truncated:
        all_tags[TRUNCATED_TAG if name == DEFAULT_NAME else f"{TRUNCATED_TAG}.{name}"] = ", ".join(truncated)
    document = json.dumps({"params": full, "tags": all_tags}, indent=2)
    for logger in mlflow_io.mlflow_loggers(loggers):
        try:
            existing = mlflow_io.logged_params(logger)
            changed = sorted(key for key, value in params.items() if key in existing and existing[key] != value)
            if changed:
                rank_zero_warn(
                    f"OptimizeLoss: MLflow run {logger.run_id} already has params {changed} with other values "
                    f"(MLflow cannot change a param); they keep their first values. {config_file} now "
                    "describes this fit."
                )
            new = {key: value for key, value in params.items() if key not in existing}
            mlflow_io.log_params_and_tags(logger, new, all_tags)
            mlflow_io.log_text(logger, document, config_file)
        except Exception as error:  # the run's metadata must not stop a training
            rank_zero_warn(f"OptimizeLoss: could not log the run configuration to MLflow: {error!r}")
    return params


def log_skipped_steps(loggers: Iterable[Logger], name: str, steps: Sequence[int]) -> None:
    """Set the tag ``<name>/spike/skipped_steps`` (the last global steps skip_spikes skipped, comma-separated)
    on every MLflow logger's run. A failure is a warning: it never stops training."""
    for logger in mlflow_io.mlflow_loggers(loggers):
        try:
            tag = {tags.metric(name, tags.SPIKE_SKIPPED_STEPS): ", ".join(map(str, steps))}
            mlflow_io.log_params_and_tags(logger, {}, tag)
        except Exception as error:
            rank_zero_warn(f"OptimizeLoss: could not tag the skipped steps in MLflow: {error!r}")
