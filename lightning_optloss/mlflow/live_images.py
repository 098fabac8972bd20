"""The per-step gradient pictures of a fit, logged to MLflow's image grid while it trains.

On rank 0, every ``images_every_n_steps`` global steps (logged steps only), :class:`RunImages` draws from the
step's summaries (already on the host, combined over ranks and shards like every summary) and logs, with
:func:`lightning_optloss.mlflow.io.log_image` (through :class:`lightning_optloss.MLFlowLogger`'s queue)::

    <name>/gradient_norms          per-parameter norms before and after clipping (images.gradient_norms_image)
    <name>/gradient_norms/<group>  the same, one picture per clip group with per-group clipping (and
                                   <name>/gradient_norms/unclipped for parameters outside every group)
    <name>/gradient_histograms     the distributions of the 4 largest parameters over the steps so far that
                                   have histograms: every logged step with the ``gradients`` summary, else
                                   the picture steps (images.gradient_histograms_image)

A picture that cannot be drawn or queued (a full disk) is a warning, once; training goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from lightning_optloss.common import tags
from lightning_optloss.gradients.histograms import Histogram
from lightning_optloss.mlflow import images
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow.artifacts import LargestHistograms


class RunImages:
    """Draws and logs one fit's per-step pictures on rank 0.

    Args:
        loggers: The Trainer's loggers; the MLflow ones receive the pictures.
        name: The callback's ``name``: the prefix of the image keys.
        names: ``{parameter index: parameter name}``, in the module's order.
        groups: With per-group clipping, ``{parameter index: group}`` (-1 or absent: in no group), and
        group_keys: the metric-safe key of each group.
    """

    def __init__(
        self,
        loggers: Iterable[Logger],
        name: str,
        names: Mapping[int, str],
        groups: Mapping[int, int] | None = None,
        group_keys: list[str] | None = None,
    ) -> None:
        self.loggers = mlflow_io.mlflow_loggers(loggers)
        self.name = name
        self.names = dict(names)
        self.histograms = LargestHistograms()
        self.groups = dict(groups or {})
        self.group_keys = list(group_keys or [])
        self._warned = False

    def pictures(self, step: int, norms: Mapping[int, tuple[float, float]]) -> dict[str, Image.Image]:
        """The step's pictures by image key, from ``{parameter index: (norm before, norm after clipping)}``."""
        drawn: dict[str, Image.Image] = {}
        for group, indices in self._norm_sets(norms):
            key = tags.metric(self.name, tags.norms_image(group))
            drawn[key] = images.gradient_norms_image(
                [self.names[i] for i in indices],
                [norms[i][0] for i in indices],
                [norms[i][1] for i in indices],
                f"{key}, step {step}",
            )
        largest = {param: rows for param, rows in self.histograms.rows().items() if rows}
        if largest:
            key = tags.metric(self.name, tags.GRADIENT_HISTOGRAMS_IMAGE)
            drawn[key] = images.gradient_histograms_image(largest, f"{key}, steps up to {step}")
        return drawn

    def _norm_sets(self, norms: Mapping[int, tuple[float, float]]) -> list[tuple[str | None, list[int]]]:
        """``(clip group key or None, parameter indices)`` of each norms picture, in the module's order."""
        ordered = [index for index in self.names if index in norms]
        if not self.group_keys:
            return [(None, ordered)] if ordered else []
        sets = []
        for group, key in enumerate(self.group_keys):
            members = [index for index in ordered if self.groups.get(index, -1) == group]
            if members:
                sets.append((key, members))
        outside = [index for index in ordered if self.groups.get(index, -1) == -1]
        if outside:
            sets.append((tags.UNCLIPPED_GROUP, outside))
        return sets

    def log(self, step: int, norms: Mapping[int, tuple[float, float]], histograms: Sequence[Histogram]) -> None:
        """Take a logged step's histograms; on a picture step (``norms`` given) draw the step's pictures and queue
        them to every MLflow logger. A failure is one warning."""
        if histograms:
            self.histograms.add(step, histograms)
        if not norms:
            return
        try:
            drawn = self.pictures(step, norms)
            for logger in self.loggers:
                for key, picture in drawn.items():
                    mlflow_io.log_image(logger, key, picture, step)
        except Exception as error:  # pictures are a convenience; training and the metrics go on
            if not self._warned:
                self._warned = True
                rank_zero_warn(f"OptimizeLoss: could not log the gradient pictures of step {step}: {error!r}")
