"""TF's optimizer summaries: names, tags, and delivery to the Trainer's loggers.

TF wrote summaries to TensorBoard event files; here they go to every logger of the Trainer (MLflow loggers
first) as metrics, under TF's tags with the callback's ``name`` as prefix. MLflow has no histogram type,
so TF's ``gradients`` histograms become statistics metrics (``.../gradients/<param>/mean`` ...) plus, with an
MLflow logger, binned histograms (:mod:`lightning_optloss.gradients.histograms`) that travel in the same transfer and
become run artifacts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from torch import Tensor

from lightning_optloss.common import transfers, validation
from lightning_optloss.gradients.histograms import Histogram

OPTIMIZER_SUMMARIES = ["learning_rate", "loss", "gradients", "gradient_norm", "global_gradient_norm"]
DEFAULT_SUMMARIES = ["loss", "learning_rate", "global_gradient_norm"]
GRADIENT_STATISTICS = ("mean", "std", "min", "max", "norm")

# MLflow's logger silently drops other characters from metric keys; names are made to fit up front.
_UNSAFE_KEY_CHARACTERS = re.compile(r"[^a-zA-Z0-9_/. -]")


def validate(owner: str, summaries: Iterable[str] | None) -> list[str]:
    """``summaries`` as a list: the TF default when None, else known names without repeats."""
    if summaries is None:
        return list(DEFAULT_SUMMARIES)
    if isinstance(summaries, str):
        raise validation.invalid(owner, "summaries", f"a list of names from {OPTIMIZER_SUMMARIES}", summaries)
    chosen: list[str] = []
    for summary in summaries:
        validation.choice(owner, "summaries", summary, OPTIMIZER_SUMMARIES)
        if summary in chosen:
            raise ValueError(f"{owner}: `summaries` lists {summary!r} twice.")
        chosen.append(summary)
    return chosen


def metric_key(name: str) -> str:
    """``name`` with every character MLflow would drop replaced by ``_``."""
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


@dataclass
class SummaryRecord:
    """The summaries of one optimizer step, still on the device until :meth:`resolve`.

    ``step`` is the global step at which the gradients were computed (0 for the first update). Histogram
    tables (:func:`~lightning_optloss.gradients.histograms.histogram_table`) travel in the same single copy;
    :meth:`resolve` leaves them in :attr:`histograms`.
    """

    step: int
    values: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    vectors: list[tuple[list[str], Tensor]] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)
    histogram_tables: list[tuple[list[str], Tensor]] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    image_rows: list[tuple[list[int], Tensor]] = field(default_factory=list)
    image_norms: dict[int, tuple[float, float]] = field(default_factory=dict)

    def add(self, tag: str, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            self.tensors[tag] = value
        else:
            self.values[tag] = float(value)

    def add_rows(self, tags: list[str], values: Tensor) -> None:
        """Add ``values.reshape(-1)[i]`` under ``tags[i]``."""
        self.vectors.append((tags, values))

    def add_extra(self, key: str, values: Tensor) -> None:
        """Values that travel with the summaries but are not metrics (e.g. non-finite bookkeeping)."""
        self.extras[key] = values

    def add_histograms(self, params: list[str], table: Tensor) -> None:
        """Add the histograms of ``params``: row ``i`` of ``table`` (``histogram_table``) is ``params[i]``'s."""
        self.histogram_tables.append((params, table))

    def add_image_rows(self, indices: list[int], norms: Tensor) -> None:
        """Per-parameter norms for the step's pictures: ``norms[0][i]`` before clipping and ``norms[1][i]``
        after, of the parameter with index ``indices[i]``; :meth:`resolve` leaves them in :attr:`image_norms`."""
        self.image_rows.append((indices, norms))

    def resolve(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The metrics and the extras as Python floats, with one device-to-host transfer for all tensors.

        The histograms come back in the same transfer and are left in :attr:`histograms`.
        """
        parts = [value.reshape(-1) for value in self.tensors.values()]
        parts += [values.reshape(-1) for _, values in self.vectors]
        parts += [values.reshape(-1) for values in self.extras.values()]
        parts += [table.reshape(-1) for _, table in self.histogram_tables]
        parts += [norms.reshape(-1) for _, norms in self.image_rows]
        metrics = dict(self.values)
        if not parts:
            return metrics, {}
        device = parts[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        numbers = transfers.to_host(torch.cat([part.to(device, dtype) for part in parts]))
        position = 0
        for tag in self.tensors:
            metrics[tag] = numbers[position]
            position += 1
        for tags, _ in self.vectors:
            metrics.update(zip(tags, numbers[position : position + len(tags)], strict=True))
            position += len(tags)
        extras = {}
        for key, values in self.extras.items():
            extras[key] = numbers[position : position + values.numel()]
            position += values.numel()
        self.histograms = []
        for params, table in self.histogram_tables:
            width = table.shape[-1]
            for param in params:
                self.histograms.append(Histogram.from_row(param, numbers[position : position + width]))
                position += width
        self.image_norms = {}
        for indices, _ in self.image_rows:
            count = len(indices)
            before, after = numbers[position : position + count], numbers[position + count : position + 2 * count]
            self.image_norms.update(zip(indices, zip(before, after, strict=True), strict=True))
            position += 2 * count
        return metrics, extras


def mlflow_first(loggers: Iterable[Logger]) -> list[Logger]:
    """The loggers with every MLflow logger first, otherwise in the Trainer's order."""
    return sorted(loggers, key=lambda logger: not isinstance(logger, MLFlowLogger))


def deliver(loggers: Sequence[Logger], metrics: dict[str, float], step: int) -> None:
    """Send one step's metrics to every logger (one ``log_metrics`` call, a single batch for MLflow)."""
    for logger in mlflow_first(loggers):
        logger.log_metrics(metrics, step=step)
