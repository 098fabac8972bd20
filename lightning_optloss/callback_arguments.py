"""The arguments of :class:`~lightning_optloss.OptimizeLoss`, checked at construction.

Each function takes the value as given and returns it checked (or raises ``ValueError`` naming the argument,
what was given and what is accepted). :func:`clip_transform` is the one place where ``clip_gradients``
(a float, a dict of globs, a clip object or a TF-style callable) becomes a
:class:`~lightning_optloss.gradients.contract.ClipTransform`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_optloss.common import tags, validation
from lightning_optloss.common.parameters import ParameterKey
from lightning_optloss.gradients.clipping import GlobalNormClipping, GroupClipping
from lightning_optloss.gradients.contract import ClipTransform, as_clip_transform
from lightning_optloss.gradients.spikes import SpikeSkipping
from lightning_optloss.mlflow import artifacts
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.pipeline import NoiseScale

OWNER = "OptimizeLoss"
SEED_LIMIT = 1 << 63
ClipArgument = float | dict[str, float] | Callable[..., Any]


def check_noise_scale(value: Any) -> NoiseScale | None:
    if value is None or (callable(value) and not isinstance(value, type)):
        return value
    if not validation.is_real(value):
        raise validation.invalid(
            OWNER, "gradient_noise_scale", "None, a finite number >= 0, or a callable of the global step", value
        )
    return validation.real(OWNER, "gradient_noise_scale", value, minimum=0.0)


def check_multipliers(value: Any) -> dict[ParameterKey, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise validation.invalid(OWNER, "gradient_multipliers", "None or a dict {parameter or name: float}", value)
    checked: dict[ParameterKey, float] = {}
    for key, factor in value.items():
        if not isinstance(key, (str, torch.nn.Parameter)):
            raise validation.invalid(
                OWNER, "gradient_multipliers", "a dict keyed by parameter names or nn.Parameter objects", key
            )
        argument = f"gradient_multipliers[{key!r}]" if isinstance(key, str) else "gradient_multipliers[<param>]"
        checked[key] = validation.real(OWNER, argument, factor)
    return checked


def check_skip_spikes(value: Any) -> SpikeSkipping | None:
    if value is not None and not isinstance(value, SpikeSkipping):
        raise validation.invalid(OWNER, "skip_spikes", "None or spike_skipping_fn(...)", value)
    return value


def check_clip(value: Any) -> ClipArgument | None:
    if value is None or callable(value):
        return value
    accepted = (
        "None, a float > 0 (global-norm clipping), a callable taking (gradient, parameter) pairs, or a dict "
        "{parameter-name glob: float > 0} (per-group clipping)"
    )
    if isinstance(value, Mapping):
        if not value or not all(isinstance(key, str) and key for key in value):
            raise validation.invalid(OWNER, "clip_gradients", accepted, value)
        return {
            key: validation.real(OWNER, f"clip_gradients[{key!r}]", clip, minimum=0.0, strictly=True)
            for key, clip in value.items()
        }
    if not validation.is_real(value):
        raise validation.invalid(OWNER, "clip_gradients", accepted, value)
    return validation.real(OWNER, "clip_gradients", value, minimum=0.0, strictly=True)


def check_update_ops(value: Any) -> tuple[Callable[[], Any], ...]:
    if value is None:
        return ()
    accepted = "None or a list of zero-argument callables"
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise validation.invalid(OWNER, "update_ops", accepted + " (wrap a single callable in a list)", value)
    ops = tuple(value)
    for op in ops:
        if not callable(op):
            raise validation.invalid(OWNER, "update_ops", accepted, op)
    return ops


def check_variables(value: Any) -> list[ParameterKey] | None:
    if value is None:
        return None
    if isinstance(value, (str, torch.Tensor)) or not isinstance(value, Iterable):
        raise validation.invalid(OWNER, "variables", "None or a list of parameters or parameter names", value)
    chosen = list(value)
    if not chosen:
        raise validation.invalid(OWNER, "variables", "None or a non-empty list of parameters or names", value)
    for key in chosen:
        if not isinstance(key, (str, torch.nn.Parameter)):
            raise validation.invalid(OWNER, "variables", "parameter names (str) or nn.Parameter objects", key)
    return chosen


def check_name(value: Any) -> str:
    accepted = "a non-empty string of letters, digits and _ . - / (it prefixes MLflow metric keys)"
    if not isinstance(value, str) or not value or tags.metric_key(value) != value or " " in value:
        raise validation.invalid(OWNER, "name", accepted, value)
    return value


def check_seed(value: Any) -> int | None:
    if value is None:
        return None
    seed = validation.as_integer(value)
    if seed is None or not 0 <= seed < SEED_LIMIT:
        raise validation.invalid(OWNER, "seed", "None or an integer in [0, 2**63)", value)
    return seed


def check_images_every_n_steps(value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise validation.invalid(
            OWNER, "images_every_n_steps", '"auto" (10 x log_every_n_steps), None (off) or an integer >= 1', value
        )
    return value


def images_interval(every: int | str | None, trainer: pl.Trainer, logging: bool) -> int:
    """``images_every_n_steps`` (checked by :func:`check_images_every_n_steps`) in steps, 0 for no pictures,
    checked at ``setup`` against ``Trainer(log_every_n_steps)``: pictures are drawn on logged steps only, with
    an MLflow logger, unless ``LIGHTNING_OPTLOSS_PLOTS=0``."""
    if every is None:
        return 0
    log_every = trainer.log_every_n_steps
    if every == "auto":
        every = 10 * log_every
    elif every % log_every:
        raise ValueError(
            f"{OWNER}: images_every_n_steps={every} is not a multiple of Trainer(log_every_n_steps={log_every}); "
            'pictures are drawn on logged steps only. Pass a multiple, "auto" (10 x log_every_n_steps) or None.'
        )
    if not logging or not mlflow_io.mlflow_loggers(trainer.loggers) or not artifacts.plots_enabled():
        return 0
    return int(every)


def clip_transform(clip_gradients: ClipArgument | None, summaries: Sequence[str]) -> ClipTransform | None:
    """``clip_gradients`` (checked by :func:`check_clip`) as a clip transform, made once at construction.

    A float is :class:`~lightning_optloss.gradients.clipping.GlobalNormClipping`, a dict
    :class:`~lightning_optloss.gradients.clipping.GroupClipping` (reporting the group norms with the
    ``global_gradient_norm`` or ``gradient_norm`` summary), a clip object of the package itself, and any other
    callable a :class:`~lightning_optloss.gradients.contract.CallableClipping`.
    """
    if clip_gradients is None:
        return None
    if isinstance(clip_gradients, float):
        return GlobalNormClipping(clip_gradients)
    if isinstance(clip_gradients, dict):
        report = "global_gradient_norm" in summaries or "gradient_norm" in summaries
        return GroupClipping(clip_gradients, report_norms=report)
    return as_clip_transform(clip_gradients)
