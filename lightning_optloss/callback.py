"""``OptimizeLoss``: the gradient half of TF's ``optimize_loss`` as a Lightning callback.

The hooks only wire Lightning to the parts: arguments are checked in :mod:`lightning_optloss.callback_arguments`,
and what a fit does at each hook is :class:`~lightning_optloss.fit_steps.FitSteps`'s, which processes the
gradients with :class:`~lightning_optloss.pipeline.GradientPipeline`, reaches the strategy through
:mod:`lightning_optloss.distributed.strategies`, and keeps the MLflow run records with
:mod:`lightning_optloss.mlflow.run_records`. The callback keeps its arguments, the global step, its pickling
and its checkpoint state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from lightning_optloss import callback_arguments as arguments
from lightning_optloss import checkpoint_state
from lightning_optloss.callback_arguments import OWNER as _OWNER
from lightning_optloss.common import pickling, validation
from lightning_optloss.common.parameters import ParameterKey
from lightning_optloss.fit_steps import FitSteps
from lightning_optloss.gradients.spikes import SpikeSkipping
from lightning_optloss.pipeline import NONFINITE_MODES, NoiseScale
from lightning_optloss.summaries import validate as validate_summaries


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
        self._fit = FitSteps(self, self._clip)

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
        self._fit = FitSteps(self, self._clip)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ the hooks: FitSteps does the work

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit.check_trainer(trainer, pl_module)
        first = next(callback for callback in trainer.callbacks if isinstance(callback, OptimizeLoss))
        if first is not self:
            self._global_step = first._global_step
        self._fit.resolve_run(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.start(trainer, pl_module, self._global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every restore (strategies such as FSDP2 restore callbacks after on_fit_start).
        self._fit.warn_if_world_size_changed(trainer.world_size)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._fit.before_backward(loss)

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
        self._fit.apply(optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._fit.end_batch(trainer, pl_module, outputs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.end_training(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.finish_artifacts()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit.finish_artifacts()  # upload what the failed fit has
        self._fit.release()  # Lightning calls no teardown hook after an exception

    # ------------------------------------------------------------------ state

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
