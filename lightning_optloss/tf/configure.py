"""``configure_optimizers``: the optimizer half of TF's ``optimize_loss``, for ``LightningModule``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_optloss.common import pickling, validation
from lightning_optloss.common.parameters import ModuleParameters, ParameterKey
from lightning_optloss.tf.optimizers import OPTIMIZER_CLS_NAMES

DecayFn = Callable[[float, int], float]
OptimizerSpec = str | type[Optimizer] | Optimizer | Callable[..., Optimizer]
_OWNER = "configure_optimizers"


class LearningRateDecay(LRScheduler):
    """Sets every group's rate to ``decay_fn(initial_rate, global_step)`` (TF's ``learning_rate_decay_fn``).

    Lightning steps it after every optimizer step (``interval="step"``), so the rate used by the update at
    global step ``k`` is ``decay_fn(lr, k)``, ``k`` counted from 0 before the first update, as in TF. The
    global step is the scheduler's own step count until an :class:`~lightning_optloss.OptimizeLoss` that
    handles this optimizer binds its global step (at ``on_fit_start``); then a step that OptimizeLoss does not
    count (``increment_global_step=False``, or an update skipped for inf/NaN gradients under 16-bit AMP)
    leaves the rate unchanged, as TF's ``global_step`` would.

    ``decay_fn`` is not part of :meth:`state_dict` (it may be a ``functools.partial``, which
    ``torch.load(weights_only=True)`` refuses): pass the same function when resuming.
    """

    def __init__(self, optimizer: Optimizer, decay_fn: DecayFn) -> None:
        self.decay_fn = decay_fn
        self._global_step: Callable[[], int] | None = None
        super().__init__(optimizer)

    def bind_global_step(self, global_step: Callable[[], int]) -> None:
        """Read the global step from ``global_step()`` from now on, and set the rates for it."""
        self._global_step = global_step
        self.refresh_rates()

    def refresh_rates(self) -> None:
        """Set every group's rate for the current global step (after the step was set from outside)."""
        for group, rate in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = rate
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def current_step(self) -> int:
        return self.last_epoch if self._global_step is None else self._global_step()

    def get_lr(self) -> list[float]:
        step = self.current_step()
        return [checked_rate(self.decay_fn, base, step) for base in self.base_lrs]

    def __getstate__(self) -> dict[str, Any]:
        return pickling.checked_state("LearningRateDecay", self.__dict__, ("decay_fn",))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(pickling.unwrapped_state(state))

    def state_dict(self) -> dict[str, Any]:
        return {
            key: value for key, value in self.__dict__.items() if key not in ("optimizer", "decay_fn", "_global_step")
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


def checked_rate(decay_fn: DecayFn, learning_rate: float, global_step: int) -> float:
    """``decay_fn(learning_rate, global_step)`` as a float, or an error naming the function and the step."""
    rate = decay_fn(learning_rate, global_step)
    is_scalar_tensor = isinstance(rate, torch.Tensor) and rate.ndim == 0
    value = float(rate) if validation.is_real(rate) or is_scalar_tensor else math.nan
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"learning_rate_decay_fn {validation.callable_name(decay_fn)} returned {validation.show(rate)} "
            f"for learning_rate={learning_rate} at global_step={global_step}; it must return a finite "
            "number >= 0."
        )
    return value


def _learning_rate(value: Any) -> float | None:
    """TF's checks: None, a float >= 0, or a 0-d float tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise validation.invalid(_OWNER, "learning_rate", "a float >= 0 or a 0-d float tensor", value)
        value = float(value.detach().cpu())
    return validation.real(_OWNER, "learning_rate", value, minimum=0.0)


def _build_optimizer(
    spec: OptimizerSpec, params: list[nn.Parameter], learning_rate: float | None, kwargs: dict[str, Any]
) -> Optimizer:
    if isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, Optimizer)):
        if isinstance(spec, str):
            validation.choice(_OWNER, "optimizer", spec, OPTIMIZER_CLS_NAMES)
        if learning_rate is None:
            raise ValueError(
                f"{_OWNER}: `learning_rate` is None, but must be given when `optimizer` is a "
                f"{'name' if isinstance(spec, str) else 'class'} ({validation.show(spec)})."
            )
        optimizer_cls = OPTIMIZER_CLS_NAMES[spec] if isinstance(spec, str) else spec
        return optimizer_cls(params, lr=learning_rate, **kwargs)
    if callable(spec) and not isinstance(spec, type):
        if kwargs:
            raise ValueError(
                f"{_OWNER}: extra keyword arguments {sorted(kwargs)} are passed to an optimizer name or "
                "class; "
                "a callable `optimizer` receives only the parameters (and the learning rate)."
            )
        built = spec(params) if learning_rate is None else spec(params, learning_rate)
        if not isinstance(built, Optimizer):
            raise ValueError(
                f"{_OWNER}: the `optimizer` callable {validation.callable_name(spec)} must return a "
                f"torch.optim.Optimizer; it returned {validation.show(built)}."
            )
        return built
    raise validation.invalid(
        _OWNER,
        "optimizer",
        f"a name from {list(OPTIMIZER_CLS_NAMES)}, a torch.optim.Optimizer subclass or instance, or a "
        "callable fn(params, learning_rate) returning an Optimizer",
        spec,
    )


def _check_instance(
    optimizer: Optimizer,
    params: list[nn.Parameter] | None,
    learning_rate: float | None,
    kwargs: dict[str, Any],
) -> Optimizer:
    """An Optimizer instance is used as is; ``variables`` and ``learning_rate`` may only confirm it."""
    if kwargs:
        raise ValueError(
            f"{_OWNER}: extra keyword arguments {sorted(kwargs)} cannot be applied to an optimizer instance."
        )
    if learning_rate is not None:
        rates = [group["lr"] for group in optimizer.param_groups]
        if any(float(rate) != learning_rate for rate in rates):
            raise ValueError(
                f"{_OWNER}: `learning_rate`={learning_rate} disagrees with the optimizer instance's rates "
                f"{rates}; pass learning_rate=None to keep the instance's."
            )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if params is not None and held != {id(p) for p in params}:
        raise ValueError(
            f"{_OWNER}: `variables` selects {len(params)} parameters, but the optimizer instance holds "
            f"{len(held)} others or more; pass variables=None to keep the instance's parameters."
        )
    return optimizer


def configure_optimizers(
    module: nn.Module,
    optimizer: OptimizerSpec,
    learning_rate: float | torch.Tensor | None = None,
    learning_rate_decay_fn: DecayFn | None = None,
    variables: Iterable[ParameterKey] | None = None,
    **kwargs: Any,
) -> Optimizer | dict[str, Any]:
    """Build what ``LightningModule.configure_optimizers`` returns, the way TF's ``optimize_loss`` did.

    Call it from your module: ``return configure_optimizers(self, "Adam", 0.01, decay_fn)``.

    Args:
        module: The module whose parameters are optimized (usually ``self``).
        optimizer: One of
            - a name from :data:`OPTIMIZER_CLS_NAMES` (``"Adagrad"``, ``"Adam"``, ``"Ftrl"``, ``"Momentum"``,
              ``"RMSProp"``, ``"SGD"``) with TF1's update rules and defaults, built as
              ``cls(params, lr=learning_rate, **kwargs)``;
            - a ``torch.optim.Optimizer`` subclass, built as ``cls(params, lr=learning_rate, **kwargs)``;
            - a callable, called as ``fn(params, learning_rate)``, or ``fn(params)`` when ``learning_rate``
              is None (TF's took no parameters; torch optimizers need them); it must return an Optimizer;
            - an Optimizer instance, used as is (``variables`` and ``learning_rate`` must then be None or
              agree with it).
        learning_rate: The initial rate (float >= 0 or 0-d float tensor). Required for names and classes.
        learning_rate_decay_fn: ``fn(learning_rate, global_step) -> float``, e.g.
            ``functools.partial(decay.exponential_decay, decay_steps=1000, decay_rate=0.5)``. Called with
            the step before it is incremented (0 at the first update). With ``learning_rate=None`` (an
            instance or callable optimizer), it decays each group's own initial rate (TF ignored the decay
            function then). Must be picklable for spawn-based strategies.
        variables: Parameters, or their names, to optimize. Default: every parameter with ``requires_grad``.
        **kwargs: Further hyperparameters for a named or class optimizer (e.g. ``momentum=0.5``).

    Returns:
        The optimizer; with a decay function, ``{"optimizer": ..., "lr_scheduler": {"scheduler":
        LearningRateDecay, "interval": "step", "frequency": 1, "name": "learning_rate"}}``.

    Raises:
        ValueError: for every invalid argument TF rejected (learning rate < 0 or of the wrong type, unknown
            optimizer name, name or class without a learning rate, a callable not returning an Optimizer,
            any other optimizer type), and for unknown or duplicate ``variables``.

    Examples:
        >>> import functools
        >>> import torch
        >>> from lightning_optloss import configure_optimizers, decay
        >>> module = torch.nn.Linear(2, 1)
        >>> type(configure_optimizers(module, "Adam", 0.001)).__name__  # TF1's Adam, by TF's name
        'TFAdam'
        >>> schedule = functools.partial(decay.exponential_decay, decay_steps=1000, decay_rate=0.5)
        >>> config = configure_optimizers(module, "SGD", 0.1, schedule)
        >>> type(config["lr_scheduler"]["scheduler"]).__name__, config["lr_scheduler"]["interval"]
        ('LearningRateDecay', 'step')
        >>> configure_optimizers(module, "Adamax", 0.1)
        Traceback (most recent call last):
            ...
        ValueError: configure_optimizers: `optimizer` must be one of 'Adagrad', ...; got 'Adamax'. Did you mean 'Adam'?
    """
    if not isinstance(module, nn.Module):
        raise validation.invalid(_OWNER, "module", "the LightningModule (an nn.Module), usually `self`", module)
    rate = _learning_rate(learning_rate)
    if learning_rate_decay_fn is not None and not callable(learning_rate_decay_fn):
        raise validation.invalid(
            _OWNER,
            "learning_rate_decay_fn",
            "None or a callable fn(learning_rate, global_step)",
            learning_rate_decay_fn,
        )
    if isinstance(variables, (str, nn.Parameter)):
        raise validation.invalid(_OWNER, "variables", "None or a list of parameters or names", variables)
    parameters = ModuleParameters(module)
    if isinstance(optimizer, Optimizer):
        selected = None if variables is None else parameters.select(_OWNER, "variables", variables)
        built = _check_instance(optimizer, None if selected is None else [e.param for e in selected], rate, kwargs)
    else:
        params = [entry.param for entry in parameters.select(_OWNER, "variables", variables)]
        built = _build_optimizer(optimizer, params, rate, kwargs)
    if learning_rate_decay_fn is None:
        return built
    scheduler = LearningRateDecay(built, learning_rate_decay_fn)
    return {
        "optimizer": built,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "learning_rate"},
    }
