"""Every summary tag and metric key of the package, built here and nowhere else.

A tag is what TF called a summary's name, relative to the callback's ``name`` (``global_norm/gradient_norm``);
the metric key MLflow receives is :func:`metric` of the two (``OptimizeLoss/global_norm/gradient_norm``).
Parameter names and globs enter tags as metric keys (:func:`metric_key`): MLflow's logger drops characters
outside ``[a-zA-Z0-9_/. -]``, so they are replaced by ``_`` up front.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LOSS = "loss"
LEARNING_RATE = "learning_rate"
NOISE_SCALE = "gradient_noise_scale"
GLOBAL_NORM = "global_norm/gradient_norm"
CLIPPED_GLOBAL_NORM = "global_norm/clipped_gradient_norm"
ADAPTIVE_MAX_NORM = "global_norm/adaptive_max_gradient_norm"
AUTOCLIP_THRESHOLD = "global_norm/autoclip_threshold"
AGC_CLIPPED_FRACTION = "clip/agc_clipped_fraction"
SPIKE_THRESHOLD = "spike/threshold"
SPIKE_SKIPPED = "spike/skipped"
SPIKE_SKIPPED_STEPS = "spike/skipped_steps"
"""A run tag (not a metric): the last global steps ``skip_spikes`` skipped, comma-separated."""
CLIP_RATIO = "clip/ratio"
"""The global norm after clipping over the one before, in (0, 1] (any clipping)."""
CLIP_ACTIVE = "clip/active"
"""1 when clipping changed a gradient at the step, else 0."""
CLIP_ACTIVITY = (CLIP_RATIO, CLIP_ACTIVE)
"""The metrics beyond TF's summaries that every logged step with clipping carries."""
GRADIENT_NORMS_IMAGE = "gradient_norms"
"""The image key (relative to ``name``) of the per-parameter norm bars before and after clipping."""
GRADIENT_HISTOGRAMS_IMAGE = "gradient_histograms"
"""The image key (relative to ``name``) of the largest parameters' gradient distributions over time."""
UNCLIPPED_GROUP = "unclipped"
"""With per-group clipping, the image group of the parameters outside every group."""
GRADIENT_STATISTICS = ("mean", "std", "min", "max", "norm")
"""The statistics logged per parameter for the ``gradients`` summary, in this order."""

_UNSAFE_KEY_CHARACTERS = re.compile(r"[^a-zA-Z0-9_/. -]")


def metric(name: str, tag: str) -> str:
    """The metric key of ``tag`` for the callback ``name``.

    >>> metric("OptimizeLoss", GLOBAL_NORM)
    'OptimizeLoss/global_norm/gradient_norm'
    """
    return f"{name}/{tag}"


def parameter_norm(key: str) -> str:
    """The tag of one parameter's gradient norm (summary ``gradient_norm``); ``key`` from :func:`metric_keys`."""
    return f"gradient_norm/{key}"


def gradient_statistic(key: str, statistic: str) -> str:
    """The tag of one statistic of one parameter's gradient (summary ``gradients``).

    >>> gradient_statistic("head.weight", "std")
    'gradients/head.weight/std'
    """
    return f"gradients/{key}/{statistic}"


def group_norm(key: str, clipped: bool = False) -> str:
    """The tag of a clip group's global norm, before (or, ``clipped``, after) clipping; ``key`` of its glob."""
    return f"global_norm/{key}/{'clipped_gradient_norm' if clipped else 'gradient_norm'}"


def spike_threshold(watch: str) -> str:
    """The tag of one watched value's spike threshold when ``skip_spikes`` watches two values.

    >>> spike_threshold("loss")
    'spike/loss/threshold'
    """
    return f"spike/{watch}/threshold"


def group_clip_activity(key: str, statistic: str) -> str:
    """The tag of a clip group's activity, ``statistic`` ``"ratio"`` (its clipped over its raw norm) or
    ``"active"``; ``key`` of its glob.

    >>> group_clip_activity("encoder._", "ratio")
    'clip/encoder._/ratio'
    """
    return f"clip/{key}/{statistic}"


def norms_image(group: str | None = None) -> str:
    """The image key (relative to ``name``) of the norm bars, of one clip group's parameters when ``group``.

    >>> norms_image("encoder._")
    'gradient_norms/encoder._'
    """
    return GRADIENT_NORMS_IMAGE if group is None else f"{GRADIENT_NORMS_IMAGE}/{group}"


def metric_key(name: str) -> str:
    """``name`` with every character MLflow would drop replaced by ``_``.

    >>> metric_key("encoder.*")
    'encoder._'
    """
    return _UNSAFE_KEY_CHARACTERS.sub("_", name)


def metric_keys(owner: str, names: Sequence[str]) -> list[str]:
    """Metric-safe keys for parameter names; an error if two names collide after replacement."""
    keys = [metric_key(name) for name in names]
    seen: dict[str, str] = {}
    for name, key in zip(names, keys, strict=True):
        if key in seen:
            raise ValueError(
                f"{owner}: parameters {seen[key]!r} and {name!r} both become metric key {key!r} "
                "(MLflow keys allow only letters, digits and _/. -); rename one of them."
            )
        seen[key] = name
    return keys


def unique_metric_keys(patterns: Sequence[str]) -> list[str]:
    """Metric-safe keys for globs (``encoder.*`` → ``encoder._``), a collision suffixed with its position."""
    keys: list[str] = []
    for index, pattern in enumerate(patterns):
        key = metric_key(pattern)
        keys.append(key if key not in keys else f"{key}_{index}")
    return keys
