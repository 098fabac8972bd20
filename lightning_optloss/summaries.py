"""TF's optimizer summaries: names, the per-step record, and delivery to the Trainer's loggers.

TF wrote summaries to TensorBoard event files; here they go to every logger of the Trainer (MLflow loggers
first) as metrics, under TF's tags (:mod:`lightning_optloss.common.tags`) with the callback's ``name`` as
prefix. MLflow has no histogram type, so TF's ``gradients`` histograms become statistics metrics
(``.../gradients/<param>/mean`` ...) plus, with an MLflow logger, binned histograms
(:mod:`lightning_optloss.gradients.histograms`) that travel in the same transfer and become run artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from torch import Tensor

from lightning_optloss.common import tags, transfers, validation
from lightning_optloss.gradients.histograms import Histogram

OPTIMIZER_SUMMARIES = ["learning_rate", "loss", "gradients", "gradient_norm", "global_gradient_norm"]
DEFAULT_SUMMARIES = ["loss", "learning_rate", "global_gradient_norm"]


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


@dataclass
class StepSummaries:
    """One logged step's summaries on the host, as metrics and as the structured values they came from.

    Attributes:
        step: The global step of the gradients.
        metrics: ``{metric key: value}``, what the loggers receive.
        scalars: ``{tag: value}`` of the step's single values (loss, learning rate, global norms, clip values).
        parameter_norms: ``{parameter key: gradient norm}`` (summary ``gradient_norm``), in the module's order.
        histograms: The gradient histograms (summary ``gradients`` with an MLflow logger).
        nonfinite: ``{monitor id: values}`` of the non-finite bookkeeping that rode along (not metrics).
        image_norms: ``{parameter index: (norm before clipping, norm after)}`` on a step that draws pictures.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    parameter_norms: dict[str, float] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)
    nonfinite: dict[int, list[float]] = field(default_factory=dict)
    image_norms: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass
class SummaryRecord:
    """The summaries of one optimizer step, still on the device until :meth:`resolve`.

    ``step`` is the global step at which the gradients were computed (0 for the first update); ``name`` is the
    callback's, the prefix of every metric key. Tags are relative to it (:mod:`lightning_optloss.common.tags`).
    Everything, histogram tables included, is copied to the host in one transfer.
    """

    step: int
    name: str = "OptimizeLoss"
    values: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    vectors: list[tuple[list[str], Tensor]] = field(default_factory=list)
    norm_keys: list[str] = field(default_factory=list)
    norms: Tensor | None = None
    nonfinite: dict[int, Tensor] = field(default_factory=dict)
    histogram_tables: list[tuple[list[str], Tensor]] = field(default_factory=list)
    image_rows: list[tuple[Sequence[int], Tensor]] = field(default_factory=list)

    def add(self, tag: str, value: Tensor | float) -> None:
        """Add one value (a float, or a 0-d tensor) under ``tag``."""
        if isinstance(value, Tensor):
            self.tensors[tag] = value
        else:
            self.values[tag] = float(value)

    def add_rows(self, tags: list[str], values: Tensor) -> None:
        """Add ``values.reshape(-1)[i]`` under ``tags[i]``."""
        self.vectors.append((tags, values))

    def add_parameter_norms(self, keys: list[str], norms: Tensor) -> None:
        """Add each parameter's gradient norm (``keys[i]``: parameter ``i``'s metric key)."""
        self.norm_keys, self.norms = keys, norms

    def add_nonfinite(self, monitor: int, values: Tensor) -> None:
        """Values that travel with the summaries but are not metrics: a non-finite monitor's bookkeeping."""
        self.nonfinite[monitor] = values

    def add_histograms(self, params: list[str], table: Tensor) -> None:
        """Add the histograms of ``params``: row ``i`` of ``table`` (``histogram_table``) is ``params[i]``'s."""
        self.histogram_tables.append((params, table))

    def add_image_rows(self, indices: Sequence[int], norms: Tensor) -> None:
        """Per-parameter norms for the step's pictures: ``norms[0][i]`` before clipping and ``norms[1][i]``
        after, of the parameter with index ``indices[i]``; :meth:`resolve` returns them in
        :attr:`StepSummaries.image_norms`."""
        self.image_rows.append((indices, norms))

    def resolve(self) -> StepSummaries:
        """The summaries as Python floats, with one device-to-host transfer for all tensors."""
        norms = [] if self.norms is None else [self.norms]
        parts = [value.reshape(-1) for value in self.tensors.values()]
        parts += [values.reshape(-1) for values in [*(v for _, v in self.vectors), *norms, *self.nonfinite.values()]]
        parts += [table.reshape(-1) for _, table in self.histogram_tables]
        parts += [rows.reshape(-1) for _, rows in self.image_rows]
        resolved = StepSummaries(self.step, scalars=dict(self.values))
        numbers = self._to_host(parts)
        position = 0
        for tag in self.tensors:
            resolved.scalars[tag] = numbers[position]
            position += 1
        rows: dict[str, float] = {}
        for tags_, _ in self.vectors:
            rows.update(zip(tags_, numbers[position : position + len(tags_)], strict=True))
            position += len(tags_)
        count = len(self.norm_keys)
        resolved.parameter_norms = dict(zip(self.norm_keys, numbers[position : position + count], strict=True))
        position += count
        for monitor, values in self.nonfinite.items():
            resolved.nonfinite[monitor] = numbers[position : position + values.numel()]
            position += values.numel()
        for params, table in self.histogram_tables:
            width = table.shape[-1]
            for param in params:
                resolved.histograms.append(Histogram.from_row(param, numbers[position : position + width]))
                position += width
        for indices, _ in self.image_rows:
            count = len(indices)
            before, after = numbers[position : position + count], numbers[position + count : position + 2 * count]
            resolved.image_norms.update(zip(indices, zip(before, after, strict=True), strict=True))
            position += 2 * count
        named = {**resolved.scalars, **rows}
        named.update((tags.parameter_norm(key), value) for key, value in resolved.parameter_norms.items())
        resolved.metrics = {tags.metric(self.name, tag): value for tag, value in named.items()}
        return resolved

    @staticmethod
    def _to_host(parts: list[Tensor]) -> list[float]:
        if not parts:
            return []
        device = parts[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        return transfers.to_host(torch.cat([part.to(device, dtype) for part in parts]))


def mlflow_first(loggers: Iterable[Logger]) -> list[Logger]:
    """The loggers with every MLflow logger first, otherwise in the Trainer's order."""
    return sorted(loggers, key=lambda logger: not isinstance(logger, MLFlowLogger))


def deliver(loggers: Sequence[Logger], metrics: dict[str, float], step: int) -> None:
    """Send one step's metrics to every logger (one ``log_metrics`` call, a single batch for MLflow)."""
    for logger in mlflow_first(loggers):
        logger.log_metrics(metrics, step=step)
