"""``OptimizeLoss``: the gradient half of TF's ``optimize_loss`` as a Lightning callback."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_optloss import artifacts, histograms, mlflow_io, run_info, strategies, transforms, validation
from lightning_optloss.configure import LearningRateDecay
from lightning_optloss.parameters import ModuleParameters, NamedParameter, ParameterKey
from lightning_optloss.summaries import (
    GRADIENT_STATISTICS,
    SummaryRecord,
    deliver,
    metric_key,
    metric_keys,
)
from lightning_optloss.summaries import validate as validate_summaries

ClipFn = Callable[..., Sequence[tuple[Tensor | None, Tensor]]]
_OWNER = "OptimizeLoss"
_SEED_LIMIT = 1 << 63


class OptimizeLoss(Callback):
    """TF's ``optimize_loss`` gradient pipeline and summaries, applied before every optimizer step.

    In ``on_before_optimizer_step`` (gradients complete, unscaled under AMP, averaged under DDP) it applies,
    in TF's order: gradient noise → gradient multipliers → clipping, then records TF's summaries, which go
    to every logger of the Trainer (MLflow first) every ``Trainer(log_every_n_steps=...)`` global steps.
    Pair it with :func:`~lightning_optloss.configure_optimizers` for TF's optimizers and learning-rate decay.

    Args:
        gradient_noise_scale: Adds ``truncated_normal(shape) * gradient_noise_scale`` to every gradient
            (zero mean, cut at 2 standard deviations, so its std is ``0.88 * scale``). Default None (off).
            Unlike TF, the noise is drawn from a generator seeded by ``(seed, global step, parameter
            index)``: identical on every data-parallel replica and reproduced on resume.
        gradient_multipliers: ``{parameter or parameter name: factor}``; each listed gradient is multiplied.
            Unlike TF, a key that names no parameter (a typo) is an error at ``setup``.
        clip_gradients: A float ``c > 0``: global-norm clipping, every gradient times
            ``c / max(global_norm, c)``. Or a callable with TF's contract: takes a list of ``(grad, param)``
            pairs and returns the same structure with the gradients modified (e.g.
            :func:`~lightning_optloss.adaptive_clipping_fn`); if it accepts a ``global_step`` keyword it
            receives the global step, if it accepts ``global_norm`` the pre-clipping global norm (a 0-d
            tensor). Clip callables must be picklable for ``ddp_spawn``.
        update_ops: Zero-argument callables run after every optimizer step that OptimizeLoss processed
            (TF's ``UPDATE_OPS``, e.g. an EMA update). Default None.
        variables: Parameters, or their names, whose gradients are processed and summarised. Default: every
            parameter with ``requires_grad``. Each must be updated by one of the Trainer's optimizers.
        name: Prefix of every summary tag (``OptimizeLoss/loss`` ...) and of this callback's checkpoint
            state; two OptimizeLoss callbacks on one Trainer need different names.
        summaries: A subset of :data:`OPTIMIZER_SUMMARIES`. Default ``["loss", "learning_rate",
            "global_gradient_norm"]``. Unlike TF, ``learning_rate`` is logged also without a decay function.
        colocate_gradients_with_ops: Accepted for TF compatibility; it has no meaning in PyTorch.
        increment_global_step: Whether this callback's global step advances after each optimizer step.
        seed: Seed of the gradient noise. Default None: drawn once by rank 0, shared with every rank, and
            saved in checkpoints.

    The global step (:attr:`global_step`) is the callback's own, TF's ``global_step``: 0 before the first
    update, incremented after every optimizer step unless ``increment_global_step=False``. It drives decay
    functions, step-aware adaptive clipping, noise seeding and summary steps, and it is not Lightning's
    ``trainer.global_step`` (which counts every optimizer of a batch). It is saved in checkpoints.
    """

    def __init__(
        self,
        gradient_noise_scale: float | None = None,
        gradient_multipliers: Mapping[ParameterKey, float] | None = None,
        clip_gradients: float | ClipFn | None = None,
        update_ops: Iterable[Callable[[], Any]] | None = None,
        variables: Iterable[ParameterKey] | None = None,
        name: str = "OptimizeLoss",
        summaries: Iterable[str] | None = None,
        colocate_gradients_with_ops: bool = False,
        increment_global_step: bool = True,
        seed: int | None = None,
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
        self.global_step = 0
        self._norm_summaries = bool({"gradients", "gradient_norm", "global_gradient_norm"} & set(self.summaries))
        self._clip_keywords = {
            keyword
            for keyword in ("global_step", "global_norm")
            if callable(self.clip_gradients) and validation.accepts_keyword(self.clip_gradients, keyword)
        }
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What ``setup`` and ``on_fit_start`` resolve; not pickled (``ddp_spawn``), never checkpointed."""
        self._params: list[NamedParameter] = []
        self._multiplier_by_index: dict[int, float] = {}
        self._metric_names: dict[int, str] = {}
        self._access = strategies.GradientAccess()
        self._noise: transforms.GradientNoise | None = None
        self._resolved_seed: int | None = self.seed
        self._by_optimizer: dict[int, list[NamedParameter]] = {}
        self._hooks: list[RemovableHandle] = []
        self._processed: dict[int, SummaryRecord | None] = {}
        self._ready: list[SummaryRecord] = []
        self._stepped_in_batch = False
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._log_every_n_steps = 1
        self._logging = False
        self._run_artifacts: artifacts.RunArtifacts | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in [key for key in state if key.startswith("_") and key not in _CONFIGURATION]:
            del state[key]
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
        self._check_trainer(trainer)
        self._access = strategies.gradient_access(_OWNER, trainer.strategy)
        parameters = ModuleParameters(pl_module)
        self._params = parameters.select(_OWNER, "variables", self.variables)
        self._multiplier_by_index = parameters.keyed(
            _OWNER, "gradient_multipliers", self.gradient_multipliers, self._params
        )
        keys = metric_keys(_OWNER, [entry.name for entry in self._params])
        self._metric_names = {entry.index: key for entry, key in zip(self._params, keys, strict=True)}
        if self._resolved_seed is None:
            self._resolved_seed = trainer.strategy.broadcast(secrets.randbelow(_SEED_LIMIT), src=0)
        if self.gradient_noise_scale:
            self._noise = transforms.GradientNoise(self.gradient_noise_scale, self._resolved_seed)
        self._log_every_n_steps = trainer.log_every_n_steps
        self._logging = bool(trainer.loggers) and bool(self.summaries)

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        if self.clip_gradients is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"{_OWNER}: clip_gradients={validation.show(self.clip_gradients)} and Trainer("
                f"gradient_clip_val={trainer.gradient_clip_val}) would clip twice (Lightning clips after "
                "OptimizeLoss); keep one of them."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unclaimed = {entry.index: entry for entry in self._params}
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [entry for entry in self._params if id(entry.param) in held]
            if not mine:
                continue
            self._by_optimizer[id(optimizer)] = mine
            for entry in mine:
                unclaimed.pop(entry.index, None)
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if unclaimed:
            names = ", ".join(repr(entry.name) for entry in unclaimed.values())
            raise ValueError(
                f"{_OWNER}: `variables` includes parameters that no optimizer of the Trainer updates: "
                f"{names}. "
                "Pass only optimized parameters (configure_optimizers(..., variables=...) chooses those)."
            )
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LearningRateDecay) and id(scheduler.optimizer) in self._by_optimizer:
                scheduler.bind_global_step(self._current_global_step)
        self._start_mlflow_records(trainer)

    def _current_global_step(self) -> int:
        return self.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._by_optimizer.clear()
        if self._run_artifacts is not None:
            self._run_artifacts.cleanup()
            self._run_artifacts = None

    # ------------------------------------------------------------------ the step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._stepped_in_batch = True
        entries = self._by_optimizer.get(id(optimizer))
        if entries:
            self._processed[id(optimizer)] = self.process(optimizer, entries)

    def process(self, optimizer: Optimizer, entries: list[NamedParameter]) -> SummaryRecord | None:
        """Run noise → multipliers → clipping on the gradients of ``entries``; return the step's summaries.

        Returns the summaries (still on the device) when this global step logs, else None.
        """
        grads_or_none = self._access.grads([entry.param for entry in entries])
        live = [(entry, grad) for entry, grad in zip(entries, grads_or_none, strict=True) if grad is not None]
        if not live:
            raise ValueError(
                f"{_OWNER}: no gradient reached any of the {len(entries)} parameters this optimizer updates "
                "(TF: 'No gradients provided for any variable'); does the loss depend on them?"
            )
        entries = [entry for entry, _ in live]
        grads = [grad for _, grad in live]
        step = self.global_step
        logging = self._logging and step % self._log_every_n_steps == 0
        if self._noise is not None:
            self._noise.add_(grads, [entry.index for entry in entries], step)
        if self._multiplier_by_index:
            transforms.multiply_(grads, [self._multiplier_by_index.get(e.index, 1.0) for e in entries])
        record = SummaryRecord(step) if logging else None
        norms_logged = logging and self._norm_summaries
        norms = None
        if norms_logged or isinstance(self.clip_gradients, float) or "global_norm" in self._clip_keywords:
            norms = transforms.parameter_norms(grads, self._access.all_reduce_sum)
        if record is not None:
            self._record_before_clipping(record, optimizer, norms)
        norms = self._clip(grads, entries, norms, step, norms_logged)
        if record is not None:
            self._record_after_clipping(record, grads, entries, norms)
        return record

    def _clip(
        self,
        grads: list[Tensor],
        entries: list[NamedParameter],
        norms: Tensor | None,
        step: int,
        norms_logged: bool,
    ) -> Tensor | None:
        """Clip in place; return the per-parameter norms after clipping when known or logged."""
        clip = self.clip_gradients
        if clip is None:
            return norms
        if isinstance(clip, float):
            factor = transforms.clip_by_global_norm_(grads, clip, transforms.global_norm(norms))
            return norms * factor
        keywords: dict[str, Any] = {}
        if "global_step" in self._clip_keywords:
            keywords["global_step"] = step
        if "global_norm" in self._clip_keywords:
            keywords["global_norm"] = transforms.global_norm(norms)
        pairs = [(grad, entry.param) for grad, entry in zip(grads, entries, strict=True)]
        returned = clip(pairs, **keywords)
        for grad, new in zip(grads, _clipped_gradients(clip, pairs, returned), strict=True):
            if new is not grad:
                grad.copy_(new)
        return transforms.parameter_norms(grads, self._access.all_reduce_sum) if norms_logged else None

    def _global_norms_logged(self) -> bool:
        # TF logs both global norms for either summary name.
        return "global_gradient_norm" in self.summaries or "gradient_norm" in self.summaries

    def _record_before_clipping(self, record: SummaryRecord, optimizer: Optimizer, norms: Tensor | None) -> None:
        if "learning_rate" in self.summaries:
            record.add(f"{self.name}/learning_rate", optimizer.param_groups[0]["lr"])
        if norms is not None and self._global_norms_logged():
            record.add(f"{self.name}/global_norm/gradient_norm", transforms.global_norm(norms))

    def _record_after_clipping(
        self, record: SummaryRecord, grads: list[Tensor], entries: list[NamedParameter], norms: Tensor | None
    ) -> None:
        for tag, value in getattr(self.clip_gradients, "summaries", dict)().items():
            record.add(f"{self.name}/{tag}", value)
        if norms is None:
            return
        keys = [self._metric_names[entry.index] for entry in entries]
        if self.clip_gradients is not None and self._global_norms_logged():
            record.add(f"{self.name}/global_norm/clipped_gradient_norm", transforms.global_norm(norms))
        if "gradient_norm" in self.summaries:
            record.add_rows([f"{self.name}/gradient_norm/{key}" for key in keys], norms)
        if "gradients" in self.summaries:
            tags = [f"{self.name}/gradients/{key}/{statistic}" for key in keys for statistic in GRADIENT_STATISTICS]
            record.add_rows(tags, transforms.gradient_statistics(grads, norms))
            if self._run_artifacts is not None:
                record.add_histograms([entry.name for entry in entries], histograms.histogram_table(grads))

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after an optimizer update that really happened (AMP skips both the update and this)."""
        if id(optimizer) not in self._processed:
            return
        record = self._processed.pop(id(optimizer))
        for update_op in self.update_ops:
            update_op()
        if record is not None:
            self._ready.append(record)
        if self.increment_global_step:
            self.global_step += 1

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
        if self._loss_sum is not None:
            # Lightning divides automatic-optimization losses by accumulate_grad_batches already.
            mean_loss = self._loss_sum if pl_module.automatic_optimization else self._loss_sum / self._loss_count
            for record in self._ready:
                record.add(f"{self.name}/loss", mean_loss)
        if trainer.is_global_zero:
            for record in self._ready:
                metrics = record.resolve()
                deliver(trainer.loggers, metrics, record.step)
                if self._run_artifacts is not None:
                    self._run_artifacts.record(record.step, metrics, record.histograms)
        self._ready.clear()
        self._processed.clear()
        self._stepped_in_batch = False
        self._loss_sum = None
        self._loss_count = 0

    # ------------------------------------------------------------------ MLflow run records

    def _start_mlflow_records(self, trainer: pl.Trainer) -> None:
        """Rank 0, with an MLflow logger: log the run configuration (``run_info``), start the artifacts."""
        if not trainer.is_global_zero or not mlflow_io.mlflow_loggers(trainer.loggers):
            return
        names = {entry.index: entry.name for entry in self._params}
        configuration = run_info.callback_configuration(
            name=self.name,
            gradient_noise_scale=self.gradient_noise_scale,
            multipliers={names[index]: factor for index, factor in self._multiplier_by_index.items()},
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
        if self._logging:
            self._run_artifacts = artifacts.RunArtifacts(trainer.loggers, self.name)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run_artifacts is not None:
            self._run_artifacts.finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._run_artifacts is not None:  # upload what the failed fit has (no teardown hook follows)
            self._run_artifacts.finish()
            self._run_artifacts.cleanup()
            self._run_artifacts = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global_step": self.global_step, "seed": self._resolved_seed}
        if hasattr(self.clip_gradients, "state_dict"):
            state["clip_gradients"] = self.clip_gradients.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.global_step = int(state_dict["global_step"])
        if state_dict.get("seed") is not None:
            self._resolved_seed = int(state_dict["seed"])
            if self._noise is not None:
                self._noise.seed = self._resolved_seed
        if "clip_gradients" in state_dict and hasattr(self.clip_gradients, "load_state_dict"):
            self.clip_gradients.load_state_dict(state_dict["clip_gradients"])


# What __init__ sets from its arguments: kept when pickled for ddp_spawn; the rest is rebuilt at setup.
_CONFIGURATION = frozenset({"_norm_summaries", "_clip_keywords"})


def _clipped_gradients(clip: ClipFn, pairs: list[tuple[Tensor, Tensor]], returned: Any) -> list[Tensor]:
    """The gradients a clip callable returned, checked against TF's contract."""
    fn = validation.callable_name(clip)
    if not isinstance(returned, (list, tuple)) or len(returned) != len(pairs):
        raise ValueError(
            f"{_OWNER}: clip_gradients callable {fn} must return a list of {len(pairs)} "
            "(gradient, parameter) pairs, like the one it was given; "
            f"it returned {validation.show(returned)}."
        )
    grads = []
    for position, (item, (grad, param)) in enumerate(zip(returned, pairs, strict=True)):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[1] is not param:
            raise ValueError(
                f"{_OWNER}: clip_gradients callable {fn} returned {validation.show(item)} at position "
                f"{position}; expected the pair (gradient, parameter) with the same parameter as given."
            )
        new = item[0]
        if not isinstance(new, Tensor) or new.shape != grad.shape:
            shape = tuple(new.shape) if isinstance(new, Tensor) else None
            raise ValueError(
                f"{_OWNER}: clip_gradients callable {fn} returned a gradient of shape {shape} "
                f"({validation.show(new) if shape is None else 'a tensor'}) at position {position}; the "
                f"parameter's gradient has shape {tuple(grad.shape)}."
            )
        grads.append(new)
    return grads


def _check_noise_scale(value: Any) -> float | None:
    if value is None:
        return None
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


def _check_clip(value: Any) -> float | ClipFn | None:
    if value is None or callable(value):
        return value
    accepted = "None, a float > 0 (global-norm clipping) or a callable taking (gradient, parameter) pairs"
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
