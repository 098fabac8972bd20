"""TF1's optimizers (``tf.compat.v1.train.*Optimizer``) as ``torch.optim.Optimizer`` subclasses.

Each class reproduces the update of the TF1 kernel it is named after (``ApplyGradientDescent``,
``ApplyMomentum``, ``ApplyAdagrad``, ``ApplyAdam``, ``ApplyRMSProp`` / ``ApplyCenteredRMSProp``,
``ApplyFtrl``) to float32 rounding: the same initial slot values, the same operations in the same
order, and TF's scalar arithmetic. TF turns a Python float hyperparameter into a float32 tensor and
casts it to the variable's dtype, so ``1 - beta2`` is ``1 - float32(0.999) = 0.00099998713``, not
0.001; here hyperparameters are rounded to float32 the same way and scalar arithmetic runs in float32
(in float64 for float64 parameters, as TF's kernels do).

All of them take the learning rate as ``lr`` in ``defaults`` and in every parameter group, so torch LR
schedulers and Lightning's ``LearningRateMonitor`` work unchanged; their state holds only tensors and
Python numbers, so ``torch.load(..., weights_only=True)`` reads their ``state_dict()``. Slots carry
TF's slot names (the ``name`` of TF's ``optimizer.get_slot(var, name)``). Sparse gradients are refused.

``OPTIMIZER_CLS_NAMES`` maps the names ``optimize_loss`` accepts to these classes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_optloss.common import foreach

__all__ = [
    "OPTIMIZER_CLS_NAMES",
    "TFAdagrad",
    "TFAdam",
    "TFFtrl",
    "TFGradientDescent",
    "TFMomentum",
    "TFRMSProp",
]


@dataclass(frozen=True)
class _Real:
    """A real-valued hyperparameter and the interval it must lie in."""

    low: float
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = False

    def __str__(self) -> str:
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def check(self, owner: str, name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name} must be a real number in {self}, got {value!r} ({type(value).__name__})")
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        if not (above and below):
            raise ValueError(f"{owner}: {name} must be in {self}, got {value}")


@dataclass(frozen=True)
class _Flag:
    """A boolean hyperparameter."""

    def check(self, owner: str, name: str, value: object) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be a bool, got {value!r} ({type(value).__name__})")


_NON_NEGATIVE = _Real(0.0)
_POSITIVE = _Real(0.0, low_closed=False)
_UNIT = _Real(0.0, 1.0)  # [0, 1): a decay whose 1 - beta^t must not vanish


def _tf_scalars(dtype: torch.dtype, *values: float) -> list[np.floating]:
    """Hyperparameters as TF's kernels see them: rounded to float32, then cast to the compute dtype.

    Arithmetic on the returned NumPy scalars stays in that dtype: float64 for float64 parameters,
    float32 otherwise (torch computes float16/bfloat16 ops in float32 too).
    """
    compute = np.float64 if dtype == torch.float64 else np.float32
    return [compute(np.float32(value)) for value in values]


def _sqrt(tensors: list[Tensor]) -> list[Tensor]:
    """Correctly rounded square roots, as TF's (Eigen's) ``sqrt``.

    torch's CPU float32 ``sqrt`` goes through MKL's vector math and is one ulp low for about 0.6% of
    inputs, which would keep Adam and RMSProp from matching TF bit for bit. The float64 square root
    rounded to float32 is exact (53 >= 2 * 24 + 2 bits), so that is what runs on CPU, at the cost of
    about three elementwise passes more per call.
    """
    if tensors and tensors[0].device.type == "cpu" and tensors[0].dtype == torch.float32:
        wide = [tensor.double() for tensor in tensors]
        foreach.sqrt_(wide)
        return [root.float() for root in wide]
    return foreach.sqrt(tensors)


def _moving_average_(averages: list[Tensor], values: list[Tensor], one_minus_decay: np.floating) -> None:
    """``average += (value - average) * (1 - decay)`` in place, TF's form of a moving average."""
    delta = foreach.sub(values, averages)
    foreach.mul_(delta, one_minus_decay)
    foreach.add_(averages, delta)


def _slot(states: list[dict[str, Any]], name: str) -> list[Tensor]:
    return [state[name] for state in states]


class _TFOptimizer(torch.optim.Optimizer):
    """What the TF1 optimizers share: validation, the closure, lazy state and foreach buckets.

    A subclass states its hyperparameters in ``_hyperparameters``, its slots in ``_init_state`` and
    its update in ``_update``, which receives the parameters of one group that have a gradient and
    share a device and a dtype, and runs under ``torch.no_grad()``.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]]

    def __init__(self, params: ParamsT, **hyperparameters: Any) -> None:
        self._validate(hyperparameters)
        super().__init__(params, hyperparameters)

    def _validate(self, hyperparameters: Mapping[str, Any]) -> None:
        for name, value in hyperparameters.items():
            if name in self._hyperparameters:
                self._hyperparameters[name].check(type(self).__name__, name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, after checking the hyperparameters it overrides."""
        self._validate(param_group)
        super().add_param_group(param_group)

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The slots of ``param``, created the first time it has a gradient (none by default)."""
        return {}

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        raise NotImplementedError

    def _buckets(self, group: dict[str, Any]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
        """The group's parameters that have a gradient, by (device, dtype)."""
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.layout != torch.strided:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients, got one with layout "
                    f"{param.grad.layout} for a parameter of shape {tuple(param.shape)}; "
                    "use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            if param.is_complex():
                raise RuntimeError(f"{type(self).__name__} supports real parameters only, got dtype {param.dtype}")
            buckets.setdefault((param.device, param.dtype), []).append(param)
        return buckets

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (if given), then update every parameter that has a gradient.

        The closure runs first, with gradients enabled, and gradients are read after it returns:
        Lightning runs ``on_before_optimizer_step`` and its gradient clipping inside the closure.
        Parameters without a gradient are left alone and get no state.

        Returns:
            What ``closure`` returned (the loss), or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                for params in self._buckets(group).values():
                    states = []
                    for param in params:
                        state = self.state.get(param)
                        if not state:
                            state = self._init_state(param, group)
                            if state:
                                self.state[param] = state
                        states.append(state)
                    self._update(group, params, [param.grad for param in params], states)
        return loss


class TFGradientDescent(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.GradientDescentOptimizer``: ``var -= lr * g``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``>= 0`` (no default, as in TF).

    Same rule as ``torch.optim.SGD`` without momentum; TF rounds ``lr * g`` before subtracting
    where torch fuses the two (``add_(g, alpha=-lr)``), which can differ in the last bit.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {"lr": _NON_NEGATIVE}

    def __init__(self, params: ParamsT, lr: float) -> None:
        super().__init__(params, lr=lr)

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        (lr,) = _tf_scalars(params[0].dtype, group["lr"])
        foreach.sub_(params, foreach.mul(grads, lr))


class TFMomentum(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.MomentumOptimizer``.

    ``accum = momentum * accum + g; var -= lr * accum``, or with ``use_nesterov``
    ``var -= lr * g + lr * momentum * accum`` (after updating ``accum``). The slot ``momentum``
    (``accum``) starts at 0.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``>= 0``.
        momentum: ``>= 0``; 0.9 by default because ``optimize_loss``'s ``"Momentum"`` fixes it so
            (TF's class has no default).
        use_nesterov: Nesterov momentum, False by default.

    The same rule as ``torch.optim.SGD(momentum=..., dampening=0, nesterov=...)``: the accumulator
    holds gradients, not steps, so a change of ``lr`` applies to the whole accumulator at once.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {
        "lr": _NON_NEGATIVE,
        "momentum": _NON_NEGATIVE,
        "use_nesterov": _Flag(),
    }

    def __init__(self, params: ParamsT, lr: float, momentum: float = 0.9, use_nesterov: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, use_nesterov=use_nesterov)

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"momentum": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        lr, momentum = _tf_scalars(params[0].dtype, group["lr"], group["momentum"])
        accums = _slot(states, "momentum")
        foreach.mul_(accums, momentum)
        foreach.add_(accums, grads)
        if group["use_nesterov"]:
            step = foreach.mul(grads, lr)
            ahead = foreach.mul(accums, momentum)
            foreach.mul_(ahead, lr)
            foreach.add_(step, ahead)
        else:
            step = foreach.mul(accums, lr)
        foreach.sub_(params, step)


class TFAdagrad(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.AdagradOptimizer``: ``acc += g^2; var -= lr * g / sqrt(acc)``.

    The slot ``accumulator`` starts at ``initial_accumulator_value``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``>= 0``.
        initial_accumulator_value: Starting value of the accumulator, ``> 0``; 0.1 by default.

    Unlike ``torch.optim.Adagrad`` there is no epsilon (torch divides by ``sqrt(acc) + 1e-10``), the
    accumulator starts at 0.1 rather than 0, and there is no ``lr_decay`` or weight decay.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {
        "lr": _NON_NEGATIVE,
        "initial_accumulator_value": _POSITIVE,
    }

    def __init__(self, params: ParamsT, lr: float, initial_accumulator_value: float = 0.1) -> None:
        super().__init__(params, lr=lr, initial_accumulator_value=initial_accumulator_value)

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # TF builds this slot from the Python float in the variable's dtype (no float32 rounding).
        value = group["initial_accumulator_value"]
        return {"accumulator": torch.full_like(param, value, memory_format=torch.preserve_format)}

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        (lr,) = _tf_scalars(params[0].dtype, group["lr"])
        accums = _slot(states, "accumulator")
        foreach.add_(accums, foreach.mul(grads, grads))
        step = foreach.mul(grads, lr)
        foreach.mul_(step, foreach.rsqrt(accums))
        foreach.sub_(params, step)


class TFAdam(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.AdamOptimizer``, in TF's form with epsilon outside the correction.

    With ``beta1_power = beta1^t`` and ``beta2_power = beta2^t`` at step ``t`` (1 on the first
    update)::

        lr_t = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
        m += (g - m) * (1 - beta1)
        v += (g^2 - v) * (1 - beta2)
        var -= lr_t * m / (sqrt(v) + epsilon)

    The slots ``m`` and ``v`` start at 0. As in TF the powers are float32 numbers that start at
    ``beta`` and are multiplied by it after every update (never ``beta ** t``), and ``1 - beta`` is
    computed in float32 (``1 - beta2 = 0.00099998713``). TF keeps one pair of powers per optimizer;
    here every parameter keeps its own (``beta1_power``, ``beta2_power`` in its state), which is the
    same as long as every parameter gets a gradient at every step (always so in a TF graph).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``>= 0``; 0.001 by default.
        beta1: Decay of the first moment, in ``[0, 1)``; 0.9 by default.
        beta2: Decay of the second moment, in ``[0, 1)``; 0.999 by default.
        epsilon: ``> 0``; 1e-8 by default.

    Unlike ``torch.optim.Adam``, epsilon is added to ``sqrt(v)`` before the bias correction, not to
    ``sqrt(v / (1 - beta2^t))`` (Kingma & Ba's "epsilon hat"), so it weighs ``1 / sqrt(1 - beta2^t)``
    times more in early steps; torch also computes ``1 - beta`` and the powers in double precision.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {
        "lr": _NON_NEGATIVE,
        "beta1": _UNIT,
        "beta2": _UNIT,
        "epsilon": _POSITIVE,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__(params, lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon)

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "m": torch.zeros_like(param, memory_format=torch.preserve_format),
            "v": torch.zeros_like(param, memory_format=torch.preserve_format),
            # float32 values held as Python floats: load_state_dict leaves them alone.
            "beta1_power": float(np.float32(group["beta1"])),
            "beta2_power": float(np.float32(group["beta2"])),
        }

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        lr, beta1, beta2, epsilon = _tf_scalars(
            params[0].dtype, group["lr"], group["beta1"], group["beta2"], group["epsilon"]
        )
        one = lr.dtype.type(1)
        alphas: list[float] = []
        by_powers: dict[tuple[float, float], float] = {}
        for state in states:
            powers = (state["beta1_power"], state["beta2_power"])
            if powers not in by_powers:
                beta1_power, beta2_power = _tf_scalars(params[0].dtype, *powers)
                by_powers[powers] = float(lr * np.sqrt(one - beta2_power) / (one - beta1_power))
            alphas.append(by_powers[powers])
            state["beta1_power"] = float(np.float32(state["beta1_power"]) * np.float32(group["beta1"]))
            state["beta2_power"] = float(np.float32(state["beta2_power"]) * np.float32(group["beta2"]))

        ms, vs = _slot(states, "m"), _slot(states, "v")
        _moving_average_(ms, grads, one - beta1)
        _moving_average_(vs, foreach.mul(grads, grads), one - beta2)
        step = foreach.mul(ms, alphas)
        denom = _sqrt(vs)
        foreach.add_(denom, epsilon)
        foreach.div_(step, denom)
        foreach.sub_(params, step)


class TFRMSProp(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.RMSPropOptimizer``, the mean square starting at 1.

    ::

        ms += (g^2 - ms) * (1 - decay)
        mom = momentum * mom + lr * g / sqrt(ms + epsilon)
        var -= mom

    and with ``centered``: ``mg += (g - mg) * (1 - decay)`` and ``sqrt(ms - mg^2 + epsilon)`` as the
    denominator. The slots are ``rms`` (starts at 1), ``momentum`` (0) and, if centered, ``mg`` (0).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``>= 0``.
        decay: Decay of the mean square, in ``[0, 1]``; 0.9 by default.
        momentum: ``>= 0``; 0 by default.
        epsilon: ``> 0``; 1e-10 by default.
        centered: Divide by the estimated variance instead of the mean square; False by default.

    Unlike ``torch.optim.RMSprop`` the mean square starts at 1, not 0 (so early steps are about
    ``lr * g`` rather than ``lr * g / |g| / sqrt(1 - decay)``), epsilon is added inside the square
    root instead of after it, the decay defaults to 0.9 (torch's ``alpha`` to 0.99) and the
    learning rate is inside the momentum buffer, not applied to it.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {
        "lr": _NON_NEGATIVE,
        "decay": _Real(0.0, 1.0, high_closed=True),
        "momentum": _NON_NEGATIVE,
        "epsilon": _POSITIVE,
        "centered": _Flag(),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        decay: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-10,
        centered: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, decay=decay, momentum=momentum, epsilon=epsilon, centered=centered)

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = {
            "rms": torch.ones_like(param, memory_format=torch.preserve_format),
            "momentum": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
        if group["centered"]:
            state["mg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        lr, decay, momentum, epsilon = _tf_scalars(
            params[0].dtype, group["lr"], group["decay"], group["momentum"], group["epsilon"]
        )
        one_minus_decay = decay.dtype.type(1) - decay
        rms, moms = _slot(states, "rms"), _slot(states, "momentum")
        _moving_average_(rms, foreach.mul(grads, grads), one_minus_decay)
        if group["centered"]:
            mgs = _slot(states, "mg")
            _moving_average_(mgs, grads, one_minus_decay)
            denom = foreach.sub(rms, foreach.mul(mgs, mgs))
            foreach.add_(denom, epsilon)
        else:
            denom = foreach.add(rms, epsilon)
        step = foreach.mul(grads, lr)
        foreach.div_(step, _sqrt(denom))
        foreach.mul_(moms, momentum)
        foreach.add_(moms, step)
        foreach.sub_(params, moms)


class TFFtrl(_TFOptimizer):
    """TF1's ``tf.compat.v1.train.FtrlOptimizer``: FTRL-Proximal (McMahan et al., 2013), ``ApplyFtrl``.

    With ``p = learning_rate_power`` (``x^(-p)`` is ``sqrt(x)`` for the default -0.5)::

        n' = n + g^2
        sigma = (n'^(-p) - n^(-p)) / lr
        z += g - sigma * var
        var = (sign(z) * l1 - z) / (n'^(-p) / lr + 2 * l2)  if |z| > l1 else 0
        n = n'

    The slots are ``accum`` (``n``, starts at ``initial_accumulator_value``) and ``linear`` (``z``,
    starts at 0). The variable's value before the first update only enters through ``sigma * var``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, ``> 0`` (FTRL divides by it).
        learning_rate_power: ``<= 0``; -0.5 by default, 0 for a fixed learning rate.
        initial_accumulator_value: ``> 0``; 0.1 by default (TF also accepts 0, which gives 0/0
            wherever a gradient is 0 on the first step with the default power).
        l1_regularization_strength: ``>= 0``; 0 by default.
        l2_regularization_strength: ``>= 0``; 0 by default.

    torch has no FTRL. TF's ``l2_shrinkage_regularization_strength`` and ``beta`` (``ApplyFtrlV2``)
    are not reproduced.
    """

    _hyperparameters: ClassVar[Mapping[str, _Real | _Flag]] = {
        "lr": _POSITIVE,
        "learning_rate_power": _Real(-math.inf, 0.0, low_closed=False, high_closed=True),
        "initial_accumulator_value": _POSITIVE,
        "l1_regularization_strength": _NON_NEGATIVE,
        "l2_regularization_strength": _NON_NEGATIVE,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        learning_rate_power: float = -0.5,
        initial_accumulator_value: float = 0.1,
        l1_regularization_strength: float = 0.0,
        l2_regularization_strength: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            learning_rate_power=learning_rate_power,
            initial_accumulator_value=initial_accumulator_value,
            l1_regularization_strength=l1_regularization_strength,
            l2_regularization_strength=l2_regularization_strength,
        )

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # TF builds this slot from the Python float in the variable's dtype (no float32 rounding).
        value = group["initial_accumulator_value"]
        return {
            "accum": torch.full_like(param, value, memory_format=torch.preserve_format),
            "linear": torch.zeros_like(param, memory_format=torch.preserve_format),
        }

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        lr, power, l1, l2 = _tf_scalars(
            params[0].dtype,
            group["lr"],
            group["learning_rate_power"],
            group["l1_regularization_strength"],
            group["l2_regularization_strength"],
        )

        def root(tensors: list[Tensor]) -> list[Tensor]:  # x^(-p), TF's sqrt when p == -0.5
            return _sqrt(tensors) if power == -0.5 else foreach.pow(tensors, -power)

        accums, linears = _slot(states, "accum"), _slot(states, "linear")
        new_accums = foreach.add(accums, foreach.mul(grads, grads))
        new_roots = root(new_accums)
        sigma_var = foreach.sub(new_roots, root(accums))
        foreach.div_(sigma_var, lr)
        foreach.mul_(sigma_var, params)
        foreach.add_(linears, foreach.sub(grads, sigma_var))
        # clamp(z, -l1, l1) - z is sign(z) * l1 - z where |z| > l1 and exactly 0 elsewhere.
        numer = foreach.clamp_max(foreach.clamp_min(linears, -l1), l1)
        foreach.sub_(numer, linears)
        foreach.div_(new_roots, lr)
        foreach.add_(new_roots, l2.dtype.type(2) * l2)
        foreach.div_(numer, new_roots)
        foreach.copy_(params, numer)
        foreach.copy_(accums, new_accums)


OPTIMIZER_CLS_NAMES: dict[str, type[torch.optim.Optimizer]] = {
    "Adagrad": TFAdagrad,
    "Adam": TFAdam,
    "Ftrl": TFFtrl,
    "Momentum": TFMomentum,
    "RMSProp": TFRMSProp,
    "SGD": TFGradientDescent,
}
"""TF's optimizer names, as ``optimize_loss`` takes them; called as ``cls(params, lr=..., **kwargs)``."""
