"""``OptimizeLoss``: the gradient half of TF's ``optimize_loss`` as a Lightning callback.

The hooks only wire Lightning to the parts: arguments are checked in :mod:`lightning_optloss.callback_arguments`,
gradients processed by :class:`~lightning_optloss.pipeline.GradientPipeline`, the strategy reached through
:mod:`lightning_optloss.distributed.strategies`, and the MLflow run records kept by
:mod:`lightning_optloss.mlflow.run_records`.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_optloss import callback_arguments as arguments
from lightning_optloss import checkpoint_state
from lightning_optloss.callback_arguments import OWNER as _OWNER
from lightning_optloss.common import pickling, tags, transfers, validation
from lightning_optloss.common.parameters import ModuleParameters, NamedParameter, ParameterKey
from lightning_optloss.distributed import strategies
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.gradients.spikes import SpikeSkipping
from lightning_optloss.mlflow import artifacts, run_records
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow.live_images import RunImages
from lightning_optloss.mlflow.logger import warn_if_stock_mlflow_logger
from lightning_optloss.pipeline import (
    NONFINITE_MODES,
    GradientPipeline,
    NoiseScale,
    NonFiniteMonitor,
    StepLoss,
    StepOutcome,
    act_on_spike,
    skip_update,
)
from lightning_optloss.summaries import SummaryRecord, deliver
from lightning_optloss.summaries import validate as validate_summaries
from lightning_optloss.tf.configure import LearningRateDecay


class GlobalStep:
    """TF's ``global_step``: one counter, shared by every OptimizeLoss callback of a Trainer."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


@dataclass
class _FitState:
    """What ``setup`` and ``on_fit_start`` resolve from the Trainer: dropped when pickled (``ddp_spawn``) and
    rebuilt in the worker, never checkpointed (but the seed, which ``state_dict`` saves)."""

    seed: int | None
    pipeline: GradientPipeline | None = None
    access: strategies.GradientAccess | None = None
    scaler: torch.amp.GradScaler | None = None
    by_optimizer: dict[int, list[NamedParameter]] = field(default_factory=dict)
    monitors: dict[int, NonFiniteMonitor] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    pending_update_ops: int = 0
    processed: dict[int, StepOutcome] = field(default_factory=dict)
    ready: list[SummaryRecord] = field(default_factory=list)
    stepped_in_batch: bool = False
    loss_sum: Tensor | None = None
    loss_count: int = 0
    step_loss: StepLoss = field(default_factory=StepLoss)  # this optimizer step's loss, for skip_spikes
    logged_skipped_steps: list[int] = field(default_factory=list)
    log_every_n_steps: int = 1
    logging: bool = False
    world_size: int = 1
    loaded_world_size: int | None = None
    run_artifacts: artifacts.RunArtifacts | None = None
    images_every: int = 0  # resolved images_every_n_steps; 0: no pictures
    run_images: RunImages | None = None


class OptimizeLoss(Callback):
    """TF's ``optimize_loss`` gradient pipeline and summaries, applied before every optimizer step.

    In ``on_before_optimizer_step`` (gradients complete, unscaled under AMP, averaged under DDP) it applies,
    in TF's order: gradient noise → gradient multipliers → clipping, then records TF's summaries, which go
    to every logger of the Trainer (MLflow first) every ``Trainer(log_every_n_steps=...)`` global steps.
    Pair it with :func:`~lightning_optloss.configure_optimizers` for TF's optimizers and learning-rate decay.

    Args:
        gradient_noise_scale: Adds ``truncated_normal(shape) * gradient_noise_scale`` to every gradient
            (zero mean, cut at 2 standard deviations, so its std is ``0.88 * scale``). Default None (off).
            A callable of the global step returning the scale gives a noise schedule.
            Unlike TF, the noise is drawn from generators seeded by ``(seed, global step, chunk)``, chunks of
            the processed parameters' concatenation (:class:`~lightning_optloss.gradients.noise.GradientNoise`):
            identical on every data-parallel replica, the same for any sharding, and reproduced on resume.
        gradient_multipliers: ``{parameter or parameter name: factor}``; each listed gradient is multiplied.
            Unlike TF, a key that names no parameter (a typo) is an error at ``setup``.
        clip_gradients: A float ``c > 0``: global-norm clipping, every gradient times
            ``c / max(global_norm, c)``. Or a callable with TF's contract: takes a list of ``(grad, param)``
            pairs and returns the same structure with the gradients modified (e.g.
            :func:`~lightning_optloss.adaptive_clipping_fn`); if it accepts a ``global_step`` keyword it
            receives the global step, if it accepts ``global_norm`` the pre-clipping global norm (a 0-d
            tensor, over the full parameters also when they are sharded), if it accepts ``names`` the
            parameter names of the pairs, if it accepts ``all_reduce_sum`` a function summing a tensor over
            the shards of sharded parameters (None when unsharded); the callable is wrapped once, here, into
            the clip contract (:mod:`lightning_optloss.gradients.contract`). Under sharded strategies (FSDP2) the pairs
            hold the local shards of gradients and parameters. Clip callables must be picklable for
            ``ddp_spawn``. Or a dict ``{parameter-name glob: c}``: per-group clipping, each group (the
            parameters whose name matches the glob first, :func:`fnmatch.fnmatchcase`) clipped by its own
            global norm at its ``c``; parameters matching no glob are not clipped; a glob matching nothing is
            an error. With ``global_gradient_norm`` or ``gradient_norm`` summaries each group logs
            ``global_norm/<glob>/gradient_norm`` and ``.../clipped_gradient_norm`` (characters MLflow does not
            allow in keys, such as ``*``, become ``_``).
        update_ops: Zero-argument callables run after every optimizer step that OptimizeLoss processed
            (TF's ``UPDATE_OPS``, e.g. an EMA update). Default None.
        variables: Parameters, or their names, whose gradients are processed and summarised. Default: every
            parameter with ``requires_grad``. Each must be updated by one of the Trainer's optimizers.
        name: Prefix of every summary tag (``OptimizeLoss/loss`` ...) and of this callback's checkpoint
            state; two OptimizeLoss callbacks on one Trainer need different names.
        summaries: A subset of :data:`OPTIMIZER_SUMMARIES`. Default ``["loss", "learning_rate",
            "global_gradient_norm"]``. Unlike TF, ``learning_rate`` is logged also without a decay function.
        colocate_gradients_with_ops: Accepted for TF compatibility; it has no meaning in PyTorch.
        increment_global_step: Whether the global step advances after the optimizer steps this callback
            processes. With several optimizers, use one OptimizeLoss per optimizer (``variables`` = its
            parameters, distinct ``name``) and ``increment_global_step=False`` on all but one: they share one
            global step, which then advances once per batch.
        seed: Seed of the gradient noise. Default None: drawn once by rank 0, shared with every rank, and
            saved in checkpoints.
        on_nonfinite: What to do when a gradient norm is inf or NaN (checked after noise and multipliers):
            ``"warn"`` (default) applies the update as TF does and warns, naming the first such step and its
            parameters, at the next logged step or at the end of fit (no host synchronisation);
            ``"skip"`` skips the optimizer step (no parameter changes, the global step, the learning rate and
            ``update_ops`` stay; Lightning's own step counter and schedulers that are not bound to the global
            step still advance) and warns; ``"raise"`` raises ``FloatingPointError``. ``"skip"`` and
            ``"raise"`` read one boolean from the device per step. Under ``16-mixed`` AMP the GradScaler
            skips such steps itself, and none of these applies. Adaptive statistics never take in a
            non-finite norm.
        skip_spikes: Beyond TF. A :func:`~lightning_optloss.spike_skipping_fn`: skips the optimizer step (as
            ``on_nonfinite="skip"`` does) when the global gradient norm, judged after noise and multipliers and
            before clipping, or the step's loss jumps far above its moving statistics; one warning per skipped
            step. Reads the watched values from the device once per step. Refused under DeepSpeed, and with
            ``watch="loss"`` in manual optimization. Default None (off).
        images_every_n_steps: Every that many global steps (logged steps only: a multiple of
            ``Trainer(log_every_n_steps)``), log gradient pictures to the MLflow loggers' image grid
            (:mod:`lightning_optloss.mlflow.live_images`: ``<name>/gradient_norms`` before and after clipping,
            one per clip group with per-group clipping, and ``<name>/gradient_histograms``). Default
            ``"auto"``: ``10 * log_every_n_steps``. None: no pictures. Drawn on rank 0 from the combined
            statistics; a picture takes a few milliseconds and is sent by the logger's worker thread. The
            environment variable ``LIGHTNING_OPTLOSS_PLOTS=0`` turns them off, as it does the end-of-fit plots.

    With clipping, logged steps also carry ``<name>/clip/ratio`` (the global norm after clipping over the one
    before, in (0, 1]) and ``<name>/clip/active`` (1 when clipping changed a gradient, else 0), and with
    per-group clipping ``<name>/clip/<group>/ratio`` and ``.../active`` per group.

    The global step (:attr:`global_step`) is TF's ``global_step``: 0 before the first update, incremented
    after every optimizer step that really updated (not after steps skipped by AMP or ``on_nonfinite``)
    unless ``increment_global_step=False``. It drives decay functions, step-aware adaptive clipping, noise
    seeding and summary steps, is shared by the OptimizeLoss callbacks of a Trainer, and is saved in
    checkpoints. It is not Lightning's ``trainer.global_step``, which counts every optimizer of a batch.

    In manual optimization the pipeline runs inside ``opt.step()`` of ``self.optimizers()``; code that steps
    the raw torch optimizer calls :meth:`apply` first.
    """

    def __init__(
        self,
        gradient_noise_scale: NoiseScale | None = None,
        gradient_multipliers: Mapping[ParameterKey, float] | None = None,
        clip_gradients: arguments.ClipArgument | None = None,
        update_ops: Iterable[Callable[[], Any]] | None = None,
        variables: Iterable[ParameterKey] | None = None,
        name: str = "OptimizeLoss",
        summaries: Iterable[str] | None = None,
        colocate_gradients_with_ops: bool = False,
        increment_global_step: bool = True,
        seed: int | None = None,
        on_nonfinite: str = "warn",
        skip_spikes: SpikeSkipping | None = None,
        images_every_n_steps: int | Literal["auto"] | None = "auto",
    ) -> None:
        self.gradient_noise_scale = arguments.check_noise_scale(gradient_noise_scale)
        self.gradient_multipliers = arguments.check_multipliers(gradient_multipliers)
        self.clip_gradients = arguments.check_clip(clip_gradients)
        self.update_ops = arguments.check_update_ops(update_ops)
        self.variables = arguments.check_variables(variables)
        self.name = arguments.check_name(name)
        self.summaries = validate_summaries(_OWNER, summaries)
        self.colocate_gradients_with_ops = validation.boolean(
            _OWNER, "colocate_gradients_with_ops", colocate_gradients_with_ops
        )
        self.increment_global_step = validation.boolean(_OWNER, "increment_global_step", increment_global_step)
        self.seed = arguments.check_seed(seed)
        self.on_nonfinite = validation.choice(_OWNER, "on_nonfinite", on_nonfinite, NONFINITE_MODES)
        self.skip_spikes = arguments.check_skip_spikes(skip_spikes)
        self._clip = arguments.clip_transform(self.clip_gradients, self.summaries)
        self.images_every_n_steps = arguments.check_images_every_n_steps(images_every_n_steps)
        self._global_step = GlobalStep()
        self._fit = _FitState(self.seed)

    @property
    def global_step(self) -> int:
        """TF's global step: 0 before the first update; see the class documentation."""
        return self._global_step.value

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._global_step.value = value

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_fit"]
        return pickling.checked_state(_OWNER, state, ("clip_gradients", "update_ops", "gradient_noise_scale"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(pickling.unwrapped_state(state))
        self._fit = _FitState(self.seed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        warn_if_stock_mlflow_logger(trainer.loggers)
        if self._clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"{_OWNER}: clip_gradients={validation.show(self.clip_gradients)} and Trainer("
                f"gradient_clip_val={trainer.gradient_clip_val}) would clip twice (Lightning clips after "
                "OptimizeLoss); keep one of them."
            )
        fit = self._fit
        fit.access = strategies.gradient_access(_OWNER, trainer.strategy)
        fit.access.check(_OWNER, trainer, self._clip, self.on_nonfinite, self.skip_spikes is not None)
        if self.skip_spikes is not None:
            self.skip_spikes.check_loss_visible(_OWNER, pl_module.automatic_optimization)
        fit.scaler = strategies.loss_scaler(trainer)
        first = next(callback for callback in trainer.callbacks if isinstance(callback, OptimizeLoss))
        if first is not self:
            self._global_step = first._global_step
        if fit.seed is None:
            fit.seed = trainer.strategy.broadcast(secrets.randbelow(arguments.SEED_LIMIT), src=0)
        fit.log_every_n_steps = trainer.log_every_n_steps
        fit.logging = bool(trainer.loggers) and bool(self.summaries)
        fit.images_every = arguments.images_interval(self.images_every_n_steps, trainer, fit.logging)
        fit.world_size = trainer.world_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Parameters are resolved here, after configure_model (FSDP2 replaces them by DTensors there).
        fit, access = self._fit, self._fit.access
        access.attach(trainer.strategy.model)
        parameters = ModuleParameters(pl_module, access.parameter_name)
        params = parameters.select(_OWNER, "variables", self.variables)
        multipliers = parameters.keyed(_OWNER, "gradient_multipliers", self.gradient_multipliers, params)
        names = [entry.name for entry in params]
        keys = tags.metric_keys(_OWNER, names)
        if self._clip is not None:
            self._clip.validate_names(names)
        by_optimizer = access.params_by_optimizer(_OWNER, trainer.optimizers, params)
        noise = None
        if self.gradient_noise_scale is not None:
            sizes = access.full_sizes([entry.param for entry in params])
            noise = GradientNoise(fit.seed, {entry.index: size for entry, size in zip(params, sizes, strict=True)})
        # Every rank computes the histograms (sharded ones need a collective); rank 0 keeps them.
        mlflow = bool(mlflow_io.mlflow_loggers(trainer.loggers))
        fit.pipeline = GradientPipeline(
            name=self.name,
            noise=noise,
            noise_scale=self.gradient_noise_scale,
            multipliers=multipliers,
            clip=self._clip,
            summaries=self.summaries,
            access=access,
            metric_keys={entry.index: key for entry, key in zip(params, keys, strict=True)},
            on_nonfinite=self.on_nonfinite,
            histograms=fit.logging and "gradients" in self.summaries and mlflow,
            spikes=self.skip_spikes,
        )
        fit.by_optimizer = {id(optimizer): entries for optimizer, entries in by_optimizer}
        for optimizer, _ in by_optimizer:
            after_step = functools.partial(self._after_optimizer_step, id(optimizer))
            fit.hooks.append(access.torch_optimizer(optimizer).register_step_post_hook(after_step))
        bound = {id(access.torch_optimizer(optimizer)) for optimizer, _ in by_optimizer}
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LearningRateDecay) and id(scheduler.optimizer) in bound:
                scheduler.bind_global_step(self._global_step)
        settings = {
            "gradient_noise_scale": self.gradient_noise_scale,
            "multipliers": {names[index]: factor for index, factor in multipliers.items()},
            "clip_gradients": self.clip_gradients,
            "variables": None if self.variables is None else names,
            "summaries": self.summaries,
            "increment_global_step": self.increment_global_step,
            "seed": fit.seed,
            "update_ops": self.update_ops,
            "colocate_gradients_with_ops": self.colocate_gradients_with_ops,
            "skip_spikes": self.skip_spikes,
        }
        fit.run_artifacts = run_records.start(trainer, self.name, settings, set(fit.by_optimizer), fit.logging)
        if fit.images_every:
            fit.run_images = run_records.start_images(trainer, self.name, params, self._clip)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._fit.run_artifacts is not None:  # upload what the failed fit has
            self._fit.run_artifacts.finish()
        self._release()  # Lightning calls no teardown hook after an exception

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit.run_artifacts is not None:
            self._fit.run_artifacts.finish()

    def _release(self) -> None:
        """Remove the optimizer hooks, stop the noise threads, remove the local artifact files."""
        fit = self._fit
        for handle in fit.hooks:
            handle.remove()
        fit.hooks.clear()
        fit.by_optimizer.clear()
        if fit.pipeline is not None and fit.pipeline.noise is not None:
            fit.pipeline.noise.close()
        if fit.run_artifacts is not None:
            fit.run_artifacts.cleanup()
            fit.run_artifacts = None
        fit.run_images = None

    # ------------------------------------------------------------------ the step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.skip_spikes is not None and self.skip_spikes.watches_loss:
            self._fit.step_loss.add(loss, self._fit.scaler)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.apply(optimizer)

    def apply(self, optimizer: Optimizer) -> None:
        """Run the pipeline on ``optimizer``'s gradients now, once per optimizer step.

        Lightning calls it before every optimizer step, automatic or manual (``opt.step()`` of
        ``self.optimizers()``); call it yourself only in manual optimization that steps the raw torch
        optimizer (``self.optimizers(use_pl_optimizer=False)``), after the backward pass and before
        ``step()``. A second call before the step does nothing.
        """
        if self._fit.pipeline is None:
            raise RuntimeError(f"{_OWNER}.apply() runs during trainer.fit(), after the callback's on_fit_start.")
        if not self._fit.access.at_optimizer_step():  # DeepSpeed's accumulating micro-batches
            return
        self._fit.stepped_in_batch = True
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        entries = self._fit.by_optimizer.get(id(optimizer))
        if not entries or id(optimizer) in self._fit.processed:
            return
        step = self.global_step
        logging = self._fit.logging and step % self._fit.log_every_n_steps == 0
        gradients = self._fit.pipeline.gather(entries)
        monitor = None
        if self.on_nonfinite == "warn" and self._fit.scaler is None:
            monitor = self._fit.monitors.get(id(optimizer))
            if monitor is None:
                names = [entry.name for entry in entries]
                monitor = self._fit.monitors[id(optimizer)] = NonFiniteMonitor(names, gradients.grads[0].device)
        spikes = self.skip_spikes
        loss = self._fit.step_loss.take(_OWNER, spikes, self._fit.access) if spikes is not None else None
        images = logging and self._fit.images_every > 0 and step % self._fit.images_every == 0
        outcome = self._fit.pipeline.run(optimizer, gradients, step, logging, monitor, loss, images)
        if outcome.spike is not None:
            act_on_spike(_OWNER, outcome.spike, spikes, optimizer, step)
        if outcome.skip and self._fit.scaler is None and outcome.nonfinite_names:
            self._handle_nonfinite(optimizer, step, outcome.nonfinite_names)
        self._fit.processed[id(optimizer)] = outcome

    def _handle_nonfinite(self, optimizer: Optimizer, step: int, names: list[str]) -> None:
        shown = validation.first_names(names, limit=5)
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{_OWNER}: non-finite gradients at global step {step} in {shown} (on_nonfinite='raise')."
            )
        skip_update(optimizer)
        rank_zero_warn(f"{_OWNER}: skipped the optimizer step at global step {step}: non-finite gradients in {shown}.")

    def _after_optimizer_step(self, key: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after the step of the optimizer ``id`` ``key`` (not after a step AMP skipped: the GradScaler
        does not call it), once per processed step."""
        outcome = self._fit.processed.pop(key, None)
        if outcome is None or outcome.skip:
            return
        if self._fit.access.params_final_after_step:
            self._run_update_ops(1)
        else:
            self._fit.pending_update_ops += 1
        if outcome.record is not None:
            self._fit.ready.append(outcome.record)
        if self.increment_global_step:
            self.global_step += 1

    def _run_update_ops(self, steps: int) -> None:
        for _ in range(steps):
            for update_op in self.update_ops:
                update_op()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if "loss" in self.summaries and isinstance(loss, Tensor):
            loss = loss.detach().float()
            self._fit.loss_sum = loss if self._fit.loss_sum is None else self._fit.loss_sum + loss
            self._fit.loss_count += 1
        if not self._fit.stepped_in_batch:
            return
        self._run_update_ops(self._fit.pending_update_ops)
        self._fit.pending_update_ops = 0
        if self._fit.ready:
            self._complete_records(pl_module)
            if trainer.is_global_zero:
                self._deliver(trainer)
                self._log_skipped_steps(trainer)
        self._fit.ready.clear()
        self._fit.processed.clear()
        self._fit.stepped_in_batch = False
        self._fit.loss_sum = None
        self._fit.loss_count = 0

    def _complete_records(self, pl_module: pl.LightningModule) -> None:
        """Add the step's loss (averaged over replicas: a collective every rank runs) and pending warnings."""
        if self._fit.loss_sum is not None:
            # Lightning divides automatic-optimization losses by accumulate_grad_batches already.
            loss = self._fit.loss_sum if pl_module.automatic_optimization else self._fit.loss_sum / self._fit.loss_count
            loss = self._fit.access.mean_over_replicas(loss)
            for record in self._fit.ready:
                record.add(tags.LOSS, loss)
        for key, monitor in self._fit.monitors.items():
            self._fit.ready[-1].add_nonfinite(key, monitor.pending())

    def _deliver(self, trainer: pl.Trainer) -> None:
        fit = self._fit
        for record in fit.ready:
            summaries = record.resolve()
            deliver(trainer.loggers, summaries.metrics, record.step)
            # Histograms computed for a picture only do not go into the artifacts (the summary decides those).
            kept = summaries.histograms if fit.pipeline.histograms else []
            if fit.run_artifacts is not None:
                fit.run_artifacts.record(record.step, summaries.scalars, summaries.parameter_norms, kept)
            if fit.run_images is not None:
                fit.run_images.log(record.step, summaries.image_norms, summaries.histograms)
            for key, values in summaries.nonfinite.items():
                self._warn_nonfinite(fit.monitors[key], values)

    @staticmethod
    def _warn_nonfinite(monitor: NonFiniteMonitor, values: list[float]) -> None:
        message = monitor.report(values)
        if message:
            rank_zero_warn(message)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for monitor in self._fit.monitors.values():
                self._warn_nonfinite(monitor, transfers.to_host(monitor.pending()))
            self._log_skipped_steps(trainer)

    def _log_skipped_steps(self, trainer: pl.Trainer) -> None:
        if self.skip_spikes is not None:
            fit = self._fit
            fit.logged_skipped_steps = run_records.log_skipped_steps(
                trainer, self.name, self.skip_spikes.skipped_steps, fit.logged_skipped_steps
            )

    # ------------------------------------------------------------------ state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every restore (strategies such as FSDP2 restore callbacks after on_fit_start).
        saved = self._fit.loaded_world_size
        if saved is not None and saved != trainer.world_size:
            rank_zero_warn(
                f"{_OWNER}: resuming a checkpoint written by {saved} process(es) on {trainer.world_size}. Carried "
                f"over unchanged: the global step ({self.global_step}), the noise seed and the clipping statistics; "
                "none depends on the number of processes, so noise and clipping go on as in the saved run. What "
                "changes is the data of each step (the sampler splits the dataset over the new number of "
                "processes, and the global batch is per-process batch x processes), so the run does not continue "
                "bit-identically to the saved one."
            )
        self._fit.loaded_world_size = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "seed": self._fit.seed,
            "world_size": self._fit.world_size,
        }
        clip_state = self._clip.state_dict() if self._clip is not None else {}
        if clip_state:
            state["clip_gradients"] = clip_state
            state["clip_kind"] = checkpoint_state.clip_kind(self.clip_gradients)
        if self.skip_spikes is not None:
            state["skip_spikes"] = self.skip_spikes.state_dict()
        return state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint_state.warn_if_missing(_OWNER, self.state_key, checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fit.loaded_world_size = state_dict.get("world_size")
        self.global_step = int(state_dict["global_step"])
        if state_dict.get("seed") is not None:
            self._fit.seed = int(state_dict["seed"])
            if self._fit.pipeline is not None and self._fit.pipeline.noise is not None:
                self._fit.pipeline.noise.seed = self._fit.seed
        checkpoint_state.restore_clip(_OWNER, self.clip_gradients, state_dict)
        if "skip_spikes" in state_dict and self.skip_spikes is not None:
            self.skip_spikes.load_state_dict(state_dict["skip_spikes"])
