"""What one ``trainer.fit`` of :class:`~lightning_optloss.OptimizeLoss` does at each of its hooks.

:class:`FitSteps` owns the state a fit resolves from the Trainer (the strategy's gradient access, the AMP scaler,
the :class:`~lightning_optloss.pipeline.GradientPipeline`, the optimizer step hooks, the non-finite monitors,
the records waiting for delivery, the run's artifacts and pictures) and the work of each stage: check the Trainer
and resolve the run at ``setup``, resolve the parameters and build the pipeline at ``on_fit_start``, process an
optimizer's gradients, run ``update_ops`` and advance the global step after an optimizer step, complete the
records with the loss and deliver them to the loggers at the end of a batch, and release everything at the end.
The callback keeps its arguments, its pickling and its checkpoint state, and calls in here from its hooks.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_optloss import callback_arguments as arguments
from lightning_optloss.callback_arguments import OWNER as _OWNER
from lightning_optloss.common import tags, transfers, validation
from lightning_optloss.common.parameters import ModuleParameters, NamedParameter, ParameterKey
from lightning_optloss.distributed import strategies
from lightning_optloss.gradients.contract import ClipTransform
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.gradients.spikes import SpikeSkipping
from lightning_optloss.mlflow import artifacts, run_records
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow.live_images import RunImages
from lightning_optloss.mlflow.logger import warn_if_stock_mlflow_logger
from lightning_optloss.pipeline import (
    GradientPipeline,
    NoiseScale,
    NonFiniteMonitor,
    StepLoss,
    StepOutcome,
    act_on_spike,
    skip_update,
)
from lightning_optloss.summaries import SummaryRecord, deliver
from lightning_optloss.tf.configure import LearningRateDecay


class CallbackOptions(Protocol):
    """The checked arguments of :class:`~lightning_optloss.OptimizeLoss` that a fit reads (the callback
    implements it), and its global step, which the fit reads and advances."""

    gradient_noise_scale: NoiseScale | None
    gradient_multipliers: dict[ParameterKey, float]
    clip_gradients: arguments.ClipArgument | None
    update_ops: tuple[Callable[[], Any], ...]
    variables: list[ParameterKey] | None
    name: str
    summaries: list[str]
    colocate_gradients_with_ops: bool
    increment_global_step: bool
    seed: int | None
    on_nonfinite: str
    skip_spikes: SpikeSkipping | None
    images_every_n_steps: int | Literal["auto"] | None
    global_step: int


class FitSteps:
    """The state and the work of one fit of an OptimizeLoss callback: made with the callback, dropped when the
    callback is pickled (``ddp_spawn``) and made anew in the worker, never checkpointed (but the seed, which
    the callback's ``state_dict`` saves).

    Args:
        options: The callback, read when each stage runs.
        clip: The callback's ``clip_gradients`` as a clip transform (None: no clipping).
    """

    def __init__(self, options: CallbackOptions, clip: ClipTransform | None) -> None:
        self.options = options
        self.clip = clip
        self.seed = options.seed
        self.pipeline: GradientPipeline | None = None
        self.access: strategies.GradientAccess | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.by_optimizer: dict[int, list[NamedParameter]] = {}
        self.monitors: dict[int, NonFiniteMonitor] = {}
        self.hooks: list[RemovableHandle] = []
        self.pending_update_ops = 0
        self.processed: dict[int, StepOutcome] = {}
        self.ready: list[SummaryRecord] = []
        self.stepped_in_batch = False
        self.loss_sum: Tensor | None = None
        self.loss_count = 0
        self.step_loss = StepLoss()  # this optimizer step's loss, for skip_spikes
        self.logged_skipped_steps: list[int] = []
        self.log_every_n_steps = 1
        self.logging = False
        self.world_size = 1
        self.loaded_world_size: int | None = None
        self.run_artifacts: artifacts.RunArtifacts | None = None
        self.images_every = 0  # resolved images_every_n_steps; 0: no pictures
        self.run_images: RunImages | None = None

    # ------------------------------------------------------------------ setup, on_fit_start, on_train_start

    def check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``setup``: refuse what the Trainer cannot combine with the options; reach the strategy."""
        options = self.options
        warn_if_stock_mlflow_logger(trainer.loggers)
        if self.clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"{_OWNER}: clip_gradients={validation.show(options.clip_gradients)} and Trainer("
                f"gradient_clip_val={trainer.gradient_clip_val}) would clip twice (Lightning clips after "
                "OptimizeLoss); keep one of them."
            )
        self.access = strategies.gradient_access(_OWNER, trainer.strategy)
        self.access.check(_OWNER, trainer, self.clip, options.on_nonfinite, options.skip_spikes is not None)
        if options.skip_spikes is not None:
            options.skip_spikes.check_loss_visible(_OWNER, pl_module.automatic_optimization)
        self.scaler = strategies.loss_scaler(trainer)

    def resolve_run(self, trainer: pl.Trainer) -> None:
        """At ``setup``: the noise seed (drawn by rank 0 when not given), the logging and picture intervals."""
        if self.seed is None:
            self.seed = trainer.strategy.broadcast(secrets.randbelow(arguments.SEED_LIMIT), src=0)
        self.log_every_n_steps = trainer.log_every_n_steps
        self.logging = bool(trainer.loggers) and bool(self.options.summaries)
        self.images_every = arguments.images_interval(self.options.images_every_n_steps, trainer, self.logging)
        self.world_size = trainer.world_size

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, global_step: Callable[[], int]) -> None:
        """At ``on_fit_start``: resolve the parameters, build the pipeline, hook every optimizer's step, bind the
        :class:`~lightning_optloss.LearningRateDecay` schedulers of those optimizers to ``global_step``, and
        start the run records."""
        # Parameters are resolved here, after configure_model (FSDP2 replaces them by DTensors there).
        options, access = self.options, self.access
        access.attach(trainer.strategy.model)
        parameters = ModuleParameters(pl_module, access.parameter_name)
        params = parameters.select(_OWNER, "variables", options.variables)
        multipliers = parameters.keyed(_OWNER, "gradient_multipliers", options.gradient_multipliers, params)
        names = [entry.name for entry in params]
        keys = tags.metric_keys(_OWNER, names)
        if self.clip is not None:
            self.clip.validate_names(names)
        by_optimizer = access.params_by_optimizer(_OWNER, trainer.optimizers, params)
        noise = None
        if options.gradient_noise_scale is not None:
            sizes = access.full_sizes([entry.param for entry in params])
            noise = GradientNoise(self.seed, {entry.index: size for entry, size in zip(params, sizes, strict=True)})
        # Every rank computes the histograms (sharded ones need a collective); rank 0 keeps them.
        mlflow = bool(mlflow_io.mlflow_loggers(trainer.loggers))
        self.pipeline = GradientPipeline(
            name=options.name,
            noise=noise,
            noise_scale=options.gradient_noise_scale,
            multipliers=multipliers,
            clip=self.clip,
            summaries=options.summaries,
            access=access,
            metric_keys={entry.index: key for entry, key in zip(params, keys, strict=True)},
            on_nonfinite=options.on_nonfinite,
            histograms=self.logging and "gradients" in options.summaries and mlflow,
            spikes=options.skip_spikes,
        )
        self.by_optimizer = {id(optimizer): entries for optimizer, entries in by_optimizer}
        for optimizer, _ in by_optimizer:
            after_step = functools.partial(self._after_optimizer_step, id(optimizer))
            self.hooks.append(access.torch_optimizer(optimizer).register_step_post_hook(after_step))
        bound = {id(access.torch_optimizer(optimizer)) for optimizer, _ in by_optimizer}
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LearningRateDecay) and id(scheduler.optimizer) in bound:
                scheduler.bind_global_step(global_step)
        settings = {
            "gradient_noise_scale": options.gradient_noise_scale,
            "multipliers": {names[index]: factor for index, factor in multipliers.items()},
            "clip_gradients": options.clip_gradients,
            "variables": None if options.variables is None else names,
            "summaries": options.summaries,
            "increment_global_step": options.increment_global_step,
            "seed": self.seed,
            "update_ops": options.update_ops,
            "colocate_gradients_with_ops": options.colocate_gradients_with_ops,
            "skip_spikes": options.skip_spikes,
        }
        self.run_artifacts = run_records.start(trainer, options.name, settings, set(self.by_optimizer), self.logging)
        if self.images_every:
            self.run_images = run_records.start_images(trainer, options.name, params, self.clip)

    def warn_if_world_size_changed(self, world_size: int) -> None:
        """At ``on_train_start``, after every restore: warn when the checkpoint loaded since was written by
        another number of processes than ``world_size``."""
        saved = self.loaded_world_size
        if saved is not None and saved != world_size:
            rank_zero_warn(
                f"{_OWNER}: resuming a checkpoint written by {saved} process(es) on {world_size}. Carried over "
                f"unchanged: the global step ({self.options.global_step}), the noise seed and the clipping "
                "statistics; none depends on the number of processes, so noise and clipping go on as in the saved "
                "run. What changes is the data of each step (the sampler splits the dataset over the new number of "
                "processes, and the global batch is per-process batch x processes), so the run does not continue "
                "bit-identically to the saved one."
            )
        self.loaded_world_size = None

    # ------------------------------------------------------------------ the end of fit

    def finish_artifacts(self) -> None:
        """Upload the run's artifacts (the end-of-fit plots), if any."""
        if self.run_artifacts is not None:
            self.run_artifacts.finish()

    def release(self) -> None:
        """Remove the optimizer hooks, stop the noise threads, remove the local artifact files."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        self.by_optimizer.clear()
        if self.pipeline is not None and self.pipeline.noise is not None:
            self.pipeline.noise.close()
        if self.run_artifacts is not None:
            self.run_artifacts.cleanup()
            self.run_artifacts = None
        self.run_images = None

    # ------------------------------------------------------------------ the step

    def before_backward(self, loss: Tensor) -> None:
        """Keep the loss for ``skip_spikes`` when it watches the loss."""
        spikes = self.options.skip_spikes
        if spikes is not None and spikes.watches_loss:
            self.step_loss.add(loss, self.scaler)

    def apply(self, optimizer: Optimizer) -> None:
        """Run the pipeline on ``optimizer``'s gradients, once per optimizer step (the callback's
        :meth:`~lightning_optloss.OptimizeLoss.apply`)."""
        if self.pipeline is None:
            raise RuntimeError(f"{_OWNER}.apply() runs during trainer.fit(), after the callback's on_fit_start.")
        if not self.access.at_optimizer_step():  # DeepSpeed's accumulating micro-batches
            return
        self.stepped_in_batch = True
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        entries = self.by_optimizer.get(id(optimizer))
        if not entries or id(optimizer) in self.processed:
            return
        options = self.options
        step = options.global_step
        logging = self.logging and step % self.log_every_n_steps == 0
        gradients = self.pipeline.gather(entries)
        monitor = None
        if options.on_nonfinite == "warn" and self.scaler is None:
            monitor = self.monitors.get(id(optimizer))
            if monitor is None:
                names = [entry.name for entry in entries]
                monitor = self.monitors[id(optimizer)] = NonFiniteMonitor(names, gradients.grads[0].device)
        spikes = options.skip_spikes
        loss = self.step_loss.take(_OWNER, spikes, self.access) if spikes is not None else None
        images = logging and self.images_every > 0 and step % self.images_every == 0
        outcome = self.pipeline.run(optimizer, gradients, step, logging, monitor, loss, images)
        if outcome.spike is not None:
            act_on_spike(_OWNER, outcome.spike, spikes, optimizer, step)
        if outcome.skip and self.scaler is None and outcome.nonfinite_names:
            self._handle_nonfinite(optimizer, step, outcome.nonfinite_names)
        self.processed[id(optimizer)] = outcome

    def _handle_nonfinite(self, optimizer: Optimizer, step: int, names: list[str]) -> None:
        shown = validation.first_names(names, limit=5)
        if self.options.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{_OWNER}: non-finite gradients at global step {step} in {shown} (on_nonfinite='raise')."
            )
        skip_update(optimizer)
        rank_zero_warn(f"{_OWNER}: skipped the optimizer step at global step {step}: non-finite gradients in {shown}.")

    def _after_optimizer_step(self, key: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after the step of the optimizer ``id`` ``key`` (not after a step AMP skipped: the GradScaler
        does not call it), once per processed step."""
        outcome = self.processed.pop(key, None)
        if outcome is None or outcome.skip:
            return
        if self.access.params_final_after_step:
            self._run_update_ops(1)
        else:
            self.pending_update_ops += 1
        if outcome.record is not None:
            self.ready.append(outcome.record)
        if self.options.increment_global_step:
            self.options.global_step += 1

    def _run_update_ops(self, steps: int) -> None:
        for _ in range(steps):
            for update_op in self.options.update_ops:
                update_op()

    # ------------------------------------------------------------------ the end of a batch

    def end_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        """At ``on_train_batch_end``: add the batch's loss; after a batch that stepped, run the pending
        ``update_ops``, complete the batch's records and deliver them (rank 0)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if "loss" in self.options.summaries and isinstance(loss, Tensor):
            loss = loss.detach().float()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.loss_count += 1
        if not self.stepped_in_batch:
            return
        self._run_update_ops(self.pending_update_ops)
        self.pending_update_ops = 0
        if self.ready:
            self._complete_records(pl_module)
            if trainer.is_global_zero:
                self._deliver(trainer)
                self._log_skipped_steps(trainer)
        self.ready.clear()
        self.processed.clear()
        self.stepped_in_batch = False
        self.loss_sum = None
        self.loss_count = 0

    def _complete_records(self, pl_module: pl.LightningModule) -> None:
        """Add the step's loss (averaged over replicas: a collective every rank runs) and pending warnings."""
        if self.loss_sum is not None:
            # Lightning divides automatic-optimization losses by accumulate_grad_batches already.
            loss = self.loss_sum if pl_module.automatic_optimization else self.loss_sum / self.loss_count
            loss = self.access.mean_over_replicas(loss)
            for record in self.ready:
                record.add(tags.LOSS, loss)
        for key, monitor in self.monitors.items():
            self.ready[-1].add_nonfinite(key, monitor.pending())

    def _deliver(self, trainer: pl.Trainer) -> None:
        for record in self.ready:
            summaries = record.resolve()
            deliver(trainer.loggers, summaries.metrics, record.step)
            # Histograms computed for a picture only do not go into the artifacts (the summary decides those).
            kept = summaries.histograms if self.pipeline.histograms else []
            if self.run_artifacts is not None:
                self.run_artifacts.record(record.step, summaries.scalars, summaries.parameter_norms, kept)
            if self.run_images is not None:
                self.run_images.log(record.step, summaries.image_norms, summaries.histograms)
            for key, values in summaries.nonfinite.items():
                _warn_nonfinite(self.monitors[key], values)

    def end_training(self, trainer: pl.Trainer) -> None:
        """At ``on_train_end``, rank 0: the non-finite warnings still pending, the skipped steps' tag."""
        if trainer.is_global_zero:
            for monitor in self.monitors.values():
                _warn_nonfinite(monitor, transfers.to_host(monitor.pending()))
            self._log_skipped_steps(trainer)

    def _log_skipped_steps(self, trainer: pl.Trainer) -> None:
        spikes = self.options.skip_spikes
        if spikes is not None:
            self.logged_skipped_steps = run_records.log_skipped_steps(
                trainer, self.options.name, spikes.skipped_steps, self.logged_skipped_steps
            )


def _warn_nonfinite(monitor: NonFiniteMonitor, values: list[float]) -> None:
    message = monitor.report(values)
    if message:
        rank_zero_warn(message)
