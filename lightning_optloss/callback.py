"""``OptimizeLoss``: the gradient half of TF's ``optimize_loss`` as a Lightning callback."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_optloss.common import transfers, validation
from lightning_optloss.common.parameters import ModuleParameters, NamedParameter, ParameterKey
from lightning_optloss.distributed import strategies
from lightning_optloss.gradients import clipping, histograms
from lightning_optloss.gradients.noise import GradientNoise
from lightning_optloss.mlflow import artifacts, run_info
from lightning_optloss.mlflow import io as mlflow_io
from lightning_optloss.mlflow.live_images import RunImages
from lightning_optloss.mlflow.logger import warn_if_stock_mlflow_logger
from lightning_optloss.pipeline import (
    NONFINITE_MODES,
    ClipFn,
    ClipGroups,
    GradientPipeline,
    NoiseScale,
    NonFiniteMonitor,
    StepOutcome,
)
from lightning_optloss.summaries import SummaryRecord, deliver, metric_key, metric_keys
from lightning_optloss.summaries import validate as validate_summaries
from lightning_optloss.tf.configure import LearningRateDecay

_OWNER = "OptimizeLoss"
_SEED_LIMIT = 1 << 63


class GlobalStep:
    """TF's ``global_step``: one counter, shared by every OptimizeLoss callback of a Trainer."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


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
            the shards of sharded parameters (None when unsharded). Under sharded strategies (FSDP2) the pairs
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
        clip_gradients: float | ClipFn | ClipGroups | None = None,
        update_ops: Iterable[Callable[[], Any]] | None = None,
        variables: Iterable[ParameterKey] | None = None,
        name: str = "OptimizeLoss",
        summaries: Iterable[str] | None = None,
        colocate_gradients_with_ops: bool = False,
        increment_global_step: bool = True,
        seed: int | None = None,
        on_nonfinite: str = "warn",
        images_every_n_steps: int | Literal["auto"] | None = "auto",
    ) -> None:
        self.gradient_noise_scale = _check_noise_scale(gradient_noise_scale)
        self.gradient_multipliers = _check_multipliers(gradient_multipliers)
        self.clip_gradients = _check_clip(clip_gradients)
        self.update_ops = _check_update_ops(update_ops)
        self.variables = _check_variables(variables)
        self.name = _check_name(name)
        self.summaries = validate_summaries(_OWNER, summaries)
        self.colocate_gradients_with_ops = validation.boolean(
            _OWNER, "colocate_gradients_with_ops", colocate_gradients_with_ops
        )
        self.increment_global_step = validation.boolean(_OWNER, "increment_global_step", increment_global_step)
        self.seed = _check_seed(seed)
        self.on_nonfinite = validation.choice(_OWNER, "on_nonfinite", on_nonfinite, NONFINITE_MODES)
        self.images_every_n_steps = _check_images_every_n_steps(images_every_n_steps)
        self._global_step = GlobalStep()
        self._reset_run_state()

    @property
    def global_step(self) -> int:
        """TF's global step: 0 before the first update; see the class documentation."""
        return self._global_step.value

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._global_step.value = value

    def _reset_run_state(self) -> None:
        """What ``setup`` and ``on_fit_start`` resolve; not pickled (``ddp_spawn``), never checkpointed."""
        self._pipeline: GradientPipeline | None = None
        self._access: strategies.GradientAccess | None = None
        self._resolved_seed: int | None = self.seed
        self._scaler: torch.amp.GradScaler | None = None
        self._by_optimizer: dict[int, list[NamedParameter]] = {}
        self._monitors: dict[int, NonFiniteMonitor] = {}
        self._hooks: list[RemovableHandle] = []
        self._pending_update_ops = 0
        self._processed: dict[int, StepOutcome] = {}
        self._ready: list[SummaryRecord] = []
        self._stepped_in_batch = False
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._log_every_n_steps = 1
        self._logging = False
        self._world_size = 1
        self._loaded_world_size: int | None = None
        self._run_artifacts: artifacts.RunArtifacts | None = None
        self._run_images: RunImages | None = None
        self._images_every = 0  # resolved images_every_n_steps; 0: no pictures

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in _RUN_STATE:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_run_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        warn_if_stock_mlflow_logger(trainer.loggers)
        if self.clip_gradients is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"{_OWNER}: clip_gradients={validation.show(self.clip_gradients)} and Trainer("
                f"gradient_clip_val={trainer.gradient_clip_val}) would clip twice (Lightning clips after "
                "OptimizeLoss); keep one of them."
            )
        self._access = strategies.gradient_access(_OWNER, trainer.strategy)
        self._access.check(_OWNER, trainer, self.clip_gradients, self.on_nonfinite)
        self._scaler = strategies.loss_scaler(trainer)
        first = next(callback for callback in trainer.callbacks if isinstance(callback, OptimizeLoss))
        if first is not self:
            self._global_step = first._global_step
        if self._resolved_seed is None:
            self._resolved_seed = trainer.strategy.broadcast(secrets.randbelow(_SEED_LIMIT), src=0)
        self._log_every_n_steps = trainer.log_every_n_steps
        self._logging = bool(trainer.loggers) and bool(self.summaries)
        self._images_every = self._resolve_images_every(trainer)
        self._world_size = trainer.world_size

    def _resolve_images_every(self, trainer: pl.Trainer) -> int:
        """``images_every_n_steps`` in steps (0: no pictures), checked against the Trainer's logging interval."""
        every = self.images_every_n_steps
        if every is None:
            return 0
        if every == "auto":
            every = 10 * self._log_every_n_steps
        elif every % self._log_every_n_steps:
            raise ValueError(
                f"{_OWNER}: images_every_n_steps={every} is not a multiple of Trainer(log_every_n_steps="
                f'{self._log_every_n_steps}); pictures are drawn on logged steps only. Pass a multiple, "auto" '
                "(10 x log_every_n_steps) or None."
            )
        # Pictures need logged steps and an MLflow logger; LIGHTNING_OPTLOSS_PLOTS=0 turns off every picture.
        if not self._logging or not mlflow_io.mlflow_loggers(trainer.loggers) or not artifacts.plots_enabled():
            return 0
        return every

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Parameters are resolved here, after configure_model (FSDP2 replaces them by DTensors there).
        self._access.attach(trainer.strategy.model)
        parameters = ModuleParameters(pl_module, self._access.parameter_name)
        params = parameters.select(_OWNER, "variables", self.variables)
        multipliers = parameters.keyed(_OWNER, "gradient_multipliers", self.gradient_multipliers, params)
        names = [entry.name for entry in params]
        keys = metric_keys(_OWNER, names)
        by_optimizer = _params_by_optimizer(trainer.optimizers, params, self._access)
        noise = None
        if self.gradient_noise_scale is not None:
            sizes = self._access.full_sizes([entry.param for entry in params])
            noise = GradientNoise(
                self._resolved_seed, {entry.index: size for entry, size in zip(params, sizes, strict=True)}
            )
        # Every rank computes the histograms (sharded ones need a collective); rank 0 keeps them.
        histograms = self._logging and "gradients" in self.summaries and bool(mlflow_io.mlflow_loggers(trainer.loggers))
        self._pipeline = GradientPipeline(
            name=self.name,
            noise=noise,
            noise_scale=self.gradient_noise_scale,
            multipliers=multipliers,
            clip=self.clip_gradients,
            clip_groups=self._resolve_clip(params),
            summaries=self.summaries,
            access=self._access,
            metric_keys={entry.index: key for entry, key in zip(params, keys, strict=True)},
            on_nonfinite=self.on_nonfinite,
            histograms=histograms,
        )
        self._by_optimizer = {id(optimizer): entries for optimizer, entries in by_optimizer}
        for optimizer, _ in by_optimizer:
            after_step = functools.partial(self._after_optimizer_step, id(optimizer))
            self._hooks.append(self._access.torch_optimizer(optimizer).register_step_post_hook(after_step))
        bound = {id(self._access.torch_optimizer(optimizer)) for optimizer, _ in by_optimizer}
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LearningRateDecay) and id(scheduler.optimizer) in bound:
                scheduler.bind_global_step(self._global_step)
        self._start_mlflow_records(trainer, params, multipliers)

    def _resolve_clip(self, params: list[NamedParameter]) -> dict[int, int] | None:
        """Per-group clipping: ``{parameter index: group}``; a callable's ``exclude`` globs checked by name."""
        names = [entry.name for entry in params]
        if isinstance(self.clip_gradients, dict):
            group_of = clipping.resolve_clip_groups(_OWNER, self.clip_gradients, names)
            return {entry.index: group for entry, group in zip(params, group_of, strict=True)}
        if hasattr(self.clip_gradients, "validate_names"):
            self.clip_gradients.validate_names(names)
        return None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._run_artifacts is not None:  # upload what the failed fit has
            self._run_artifacts.finish()
        self._release()  # Lightning calls no teardown hook after an exception

    def _release(self) -> None:
        """Remove the optimizer hooks, stop the noise threads, remove the local artifact files."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._by_optimizer.clear()
        if self._pipeline is not None and self._pipeline.noise is not None:
            self._pipeline.noise.close()
        if self._run_artifacts is not None:
            self._run_artifacts.cleanup()
            self._run_artifacts = None
        self._run_images = None

    # ------------------------------------------------------------------ the step

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
        if self._pipeline is None:
            raise RuntimeError(f"{_OWNER}.apply() runs during trainer.fit(), after the callback's on_fit_start.")
        if not self._access.at_optimizer_step():  # DeepSpeed's accumulating micro-batches
            return
        self._stepped_in_batch = True
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        entries = self._by_optimizer.get(id(optimizer))
        if not entries or id(optimizer) in self._processed:
            return
        step = self.global_step
        logging = self._logging and step % self._log_every_n_steps == 0
        gradients = self._pipeline.gather(entries)
        monitor = None
        if self.on_nonfinite == "warn" and self._scaler is None:
            monitor = self._monitors.get(id(optimizer))
            if monitor is None:
                names = [entry.name for entry in entries]
                monitor = self._monitors[id(optimizer)] = NonFiniteMonitor(names, gradients.grads[0].device)
        images = logging and self._images_every > 0 and step % self._images_every == 0
        outcome = self._pipeline.run(optimizer, gradients, step, logging, monitor, images)
        if outcome.skip and self._scaler is None:
            self._handle_nonfinite(optimizer, step, outcome.nonfinite_names)
        self._processed[id(optimizer)] = outcome

    def _handle_nonfinite(self, optimizer: Optimizer, step: int, names: list[str]) -> None:
        shown = ", ".join(repr(name) for name in names[:5]) + (" ..." if len(names) > 5 else "")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{_OWNER}: non-finite gradients at global step {step} in {shown} (on_nonfinite='raise')."
            )
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # the optimizer then updates nothing: the step is skipped
        rank_zero_warn(f"{_OWNER}: skipped the optimizer step at global step {step}: non-finite gradients in {shown}.")

    def _after_optimizer_step(self, key: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after the step of the optimizer ``id`` ``key`` (not after a step AMP skipped: the GradScaler
        does not call it), once per processed step."""
        outcome = self._processed.pop(key, None)
        if outcome is None or outcome.skip:
            return
        if self._access.params_final_after_step:
            self._run_update_ops(1)
        else:
            self._pending_update_ops += 1
        if outcome.record is not None:
            self._ready.append(outcome.record)
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
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        if not self._stepped_in_batch:
            return
        self._run_update_ops(self._pending_update_ops)
        self._pending_update_ops = 0
        if self._ready:
            self._complete_records(pl_module)
            if trainer.is_global_zero:
                self._deliver(trainer)
        self._ready.clear()
        self._processed.clear()
        self._stepped_in_batch = False
        self._loss_sum = None
        self._loss_count = 0

    def _complete_records(self, pl_module: pl.LightningModule) -> None:
        """Add the step's loss (averaged over replicas: a collective every rank runs) and pending warnings."""
        if self._loss_sum is not None:
            # Lightning divides automatic-optimization losses by accumulate_grad_batches already.
            loss = self._loss_sum if pl_module.automatic_optimization else self._loss_sum / self._loss_count
            loss = self._access.mean_over_replicas(loss)
            for record in self._ready:
                record.add(f"{self.name}/loss", loss)
        for key, monitor in self._monitors.items():
            self._ready[-1].add_extra(f"nonfinite/{key}", monitor.pending())

    def _deliver(self, trainer: pl.Trainer) -> None:
        for record in self._ready:
            metrics, extras = record.resolve()
            deliver(trainer.loggers, metrics, record.step)
            # Histograms computed for a picture only do not go into the artifacts (the summary decides those).
            histograms = record.histograms if self._pipeline.histograms else []
            if self._run_artifacts is not None:
                self._run_artifacts.record(record.step, metrics, histograms)
            if self._run_images is not None:
                self._run_images.log(record.step, record.image_norms, record.histograms)
            for key, values in extras.items():
                self._warn_nonfinite(self._monitors[int(key.split("/")[1])], values)

    @staticmethod
    def _warn_nonfinite(monitor: NonFiniteMonitor, values: list[float]) -> None:
        message = monitor.report(values)
        if message:
            rank_zero_warn(message)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for monitor in self._monitors.values():
                self._warn_nonfinite(monitor, transfers.to_host(monitor.pending()))

    # ------------------------------------------------------------------ MLflow run records

    def _start_mlflow_records(
        self, trainer: pl.Trainer, params: list[NamedParameter], multipliers: dict[int, float]
    ) -> None:
        """Rank 0, with an MLflow logger: log the run configuration (``run_info``), start the artifacts."""
        if not trainer.is_global_zero or not mlflow_io.mlflow_loggers(trainer.loggers):
            return
        names = {entry.index: entry.name for entry in params}
        configuration = run_info.callback_configuration(
            name=self.name,
            gradient_noise_scale=self.gradient_noise_scale,
            multipliers={names[index]: factor for index, factor in multipliers.items()},
            clip_gradients=self.clip_gradients,
            variables=None if self.variables is None else list(names.values()),
            summaries=self.summaries,
            increment_global_step=self.increment_global_step,
            seed=self._resolved_seed,
            update_ops=self.update_ops,
            colocate_gradients_with_ops=self.colocate_gradients_with_ops,
            histogram_bins=histograms.HISTOGRAM_BINS,
        )
        optimizers = [
            (i, optimizer) for i, optimizer in enumerate(trainer.optimizers) if id(optimizer) in self._by_optimizer
        ]
        numbered = len(trainer.optimizers) > 1
        configuration.update(run_info.optimizer_configuration(optimizers, trainer.lr_scheduler_configs, numbered))
        run_info.log_run_configuration(trainer.loggers, configuration, run_info.run_tags(trainer), self.name)
        if self._logging:  # the plots of the logged summaries, and the histograms when there are any
            self._run_artifacts = artifacts.RunArtifacts(trainer.loggers, self.name)
        if self._images_every:
            pipeline = self._pipeline
            self._run_images = RunImages(trainer.loggers, self.name, names, pipeline.clip_groups, pipeline.group_keys)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run_artifacts is not None:
            self._run_artifacts.finish()

    # ------------------------------------------------------------------ state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every restore (strategies such as FSDP2 restore callbacks after on_fit_start).
        saved = self._loaded_world_size
        if saved is not None and saved != trainer.world_size:
            rank_zero_warn(
                f"{_OWNER}: resuming a checkpoint written by {saved} process(es) on {trainer.world_size}. Carried "
                f"over unchanged: the global step ({self.global_step}), the noise seed and the clipping statistics; "
                "none depends on the number of processes, so noise and clipping go on as in the saved run. What "
                "changes is the data of each step (the sampler splits the dataset over the new number of "
                "processes, and the global batch is per-process batch x processes), so the run does not continue "
                "bit-identically to the saved one."
            )
        self._loaded_world_size = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "seed": self._resolved_seed,
            "world_size": self._world_size,
        }
        if hasattr(self.clip_gradients, "state_dict"):
            state["clip_gradients"] = self.clip_gradients.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_world_size = state_dict.get("world_size")
        self.global_step = int(state_dict["global_step"])
        if state_dict.get("seed") is not None:
            self._resolved_seed = int(state_dict["seed"])
            if self._pipeline is not None and self._pipeline.noise is not None:
                self._pipeline.noise.seed = self._resolved_seed
        if "clip_gradients" in state_dict and hasattr(self.clip_gradients, "load_state_dict"):
            self.clip_gradients.load_state_dict(state_dict["clip_gradients"])


# Resolved by setup/on_fit_start from the Trainer: dropped when pickled for ddp_spawn, rebuilt in the worker.
_RUN_STATE = (
    "_pipeline",
    "_access",
    "_scaler",
    "_by_optimizer",
    "_monitors",
    "_hooks",
    "_pending_update_ops",
    "_processed",
    "_ready",
    "_stepped_in_batch",
    "_loss_sum",
    "_loss_count",
    "_log_every_n_steps",
    "_logging",
    "_world_size",
    "_loaded_world_size",
    "_run_artifacts",
    "_run_images",
    "_images_every",
)


def _params_by_optimizer(
    optimizers: list[Optimizer], params: list[NamedParameter], access: strategies.GradientAccess
) -> list[tuple[Optimizer, list[NamedParameter]]]:
    """The processed parameters each optimizer updates; an error for any that no optimizer updates."""
    pairs = []
    unclaimed = {entry.index: entry for entry in params}
    for optimizer in optimizers:
        held = {id(p) for p in access.optimized_parameters(optimizer)}
        mine = [entry for entry in params if id(entry.param) in held]
        if mine:
            pairs.append((optimizer, mine))
            for entry in mine:
                unclaimed.pop(entry.index, None)
    if unclaimed:
        names = ", ".join(repr(entry.name) for entry in unclaimed.values())
        raise ValueError(
            f"{_OWNER}: `variables` includes parameters that no optimizer of the Trainer updates: {names}. "
            "Pass only optimized parameters (configure_optimizers(..., variables=...) chooses those)."
        )
    return pairs


def _check_noise_scale(value: Any) -> NoiseScale | None:
    if value is None or (callable(value) and not isinstance(value, type)):
        return value
    if not validation.is_real(value):
        raise validation.invalid(
            _OWNER, "gradient_noise_scale", "None, a finite number >= 0, or a callable of the global step", value
        )
    return validation.real(_OWNER, "gradient_noise_scale", value, minimum=0.0)


def _check_multipliers(value: Any) -> dict[ParameterKey, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise validation.invalid(_OWNER, "gradient_multipliers", "None or a dict {parameter or name: float}", value)
    checked: dict[ParameterKey, float] = {}
    for key, factor in value.items():
        if not isinstance(key, (str, torch.nn.Parameter)):
            raise validation.invalid(
                _OWNER, "gradient_multipliers", "a dict keyed by parameter names or nn.Parameter objects", key
            )
        argument = f"gradient_multipliers[{key!r}]" if isinstance(key, str) else "gradient_multipliers[<param>]"
        checked[key] = validation.real(_OWNER, argument, factor)
    return checked


def _check_clip(value: Any) -> float | ClipFn | ClipGroups | None:
    if value is None or callable(value):
        return value
    accepted = (
        "None, a float > 0 (global-norm clipping), a callable taking (gradient, parameter) pairs, or a dict "
        "{parameter-name glob: float > 0} (per-group clipping)"
    )
    if isinstance(value, Mapping):
        if not value or not all(isinstance(key, str) and key for key in value):
            raise validation.invalid(_OWNER, "clip_gradients", accepted, value)
        return {
            key: validation.real(_OWNER, f"clip_gradients[{key!r}]", clip, minimum=0.0, strictly=True)
            for key, clip in value.items()
        }
    if not validation.is_real(value):
        raise validation.invalid(_OWNER, "clip_gradients", accepted, value)
    return validation.real(_OWNER, "clip_gradients", value, minimum=0.0, strictly=True)


def _check_update_ops(value: Any) -> tuple[Callable[[], Any], ...]:
    if value is None:
        return ()
    accepted = "None or a list of zero-argument callables"
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise validation.invalid(_OWNER, "update_ops", accepted + " (wrap a single callable in a list)", value)
    ops = tuple(value)
    for op in ops:
        if not callable(op):
            raise validation.invalid(_OWNER, "update_ops", accepted, op)
    return ops


def _check_variables(value: Any) -> list[ParameterKey] | None:
    if value is None:
        return None
    if isinstance(value, (str, torch.Tensor)) or not isinstance(value, Iterable):
        raise validation.invalid(_OWNER, "variables", "None or a list of parameters or parameter names", value)
    chosen = list(value)
    if not chosen:
        raise validation.invalid(_OWNER, "variables", "None or a non-empty list of parameters or names", value)
    for key in chosen:
        if not isinstance(key, (str, torch.nn.Parameter)):
            raise validation.invalid(_OWNER, "variables", "parameter names (str) or nn.Parameter objects", key)
    return chosen


def _check_images_every_n_steps(value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise validation.invalid(
            _OWNER, "images_every_n_steps", '"auto" (10 x log_every_n_steps), None (off) or an integer >= 1', value
        )
    return value


def _check_name(value: Any) -> str:
    accepted = "a non-empty string of letters, digits and _ . - / (it prefixes MLflow metric keys)"
    if not isinstance(value, str) or not value or metric_key(value) != value or " " in value:
        raise validation.invalid(_OWNER, "name", accepted, value)
    return value


def _check_seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _SEED_LIMIT:
        raise validation.invalid(_OWNER, "seed", "None or an integer in [0, 2**63)", value)
    return value
