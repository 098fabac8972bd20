"""TensorFlow 1's ``optimize_loss`` for PyTorch Lightning, with its summaries in MLflow.

- :class:`OptimizeLoss`: a ``Callback`` applying gradient noise, multipliers and clipping in TF's order
  before every optimizer step, and logging TF's summaries.
- :func:`configure_optimizers`: TF's optimizers (by name, class, callable or instance) and learning-rate
  decay, for ``LightningModule.configure_optimizers``.
- :func:`adaptive_clipping_fn`, :mod:`decay`: TF's adaptive clipping and learning-rate schedules.
- Beyond TF: :func:`agc_clipping_fn` (unit-wise adaptive gradient clipping), :func:`autoclip_fn`
  (percentile clipping), :func:`annealed_noise_scale` (annealed gradient noise), :func:`spike_skipping_fn`
  (skip the update on gradient-norm or loss spikes); warmup schedules in
  :mod:`decay`; per-group clipping with ``OptimizeLoss(clip_gradients={glob: value})``.
- :class:`TFCheckpoint`: continue a TF1 run from its ``tf.train.Saver`` checkpoint (weights, optimizer slots,
  global step, adaptive clipping's averages); needs ``pip install 'lightning-optloss[tf]'``.
- :class:`MLFlowLogger`: Lightning's MLflow logger with the server calls off the training thread, surviving outages.

Layers, lowest first; a module imports only its own layer and lower ones, with no import circle, type-only
imports included (``tests/test_layering.py`` checks it)::

    common <- gradients <- distributed <- tf <- mlflow <- core (summaries, pipeline, callback_arguments,
    checkpoint_state, fit_steps, callback, tf.checkpoint) <- this package and demos <- the python -m entry
    modules (demo, example, compare, mlflow_replay, tf_checkpoint)
"""

from lightning_optloss.callback import OptimizeLoss
from lightning_optloss.common.transfers import add_transfer_hook
from lightning_optloss.common.version import __version__
from lightning_optloss.gradients.adaptive_clipping import AdaptiveClipping, adaptive_clipping_fn
from lightning_optloss.gradients.agc import UnitwiseClipping, agc_clipping_fn
from lightning_optloss.gradients.autoclip import AutoClipping, autoclip_fn
from lightning_optloss.gradients.noise_schedules import AnnealedNoiseScale, annealed_noise_scale
from lightning_optloss.gradients.spikes import SpikeSkipping, spike_skipping_fn
from lightning_optloss.mlflow.logger import MLFlowLogger
from lightning_optloss.summaries import OPTIMIZER_SUMMARIES
from lightning_optloss.tf import decay
from lightning_optloss.tf.checkpoint import TFCheckpoint
from lightning_optloss.tf.configure import LearningRateDecay, configure_optimizers
from lightning_optloss.tf.optimizers import OPTIMIZER_CLS_NAMES

__all__ = [
    "OPTIMIZER_CLS_NAMES",
    "OPTIMIZER_SUMMARIES",
    "AdaptiveClipping",
    "AnnealedNoiseScale",
    "AutoClipping",
    "LearningRateDecay",
    "MLFlowLogger",
    "OptimizeLoss",
    "SpikeSkipping",
    "TFCheckpoint",
    "UnitwiseClipping",
    "__version__",
    "adaptive_clipping_fn",
    "add_transfer_hook",
    "agc_clipping_fn",
    "annealed_noise_scale",
    "autoclip_fn",
    "configure_optimizers",
    "decay",
    "spike_skipping_fn",
]
