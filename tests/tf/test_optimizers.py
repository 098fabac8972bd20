"""Tests for ``lightning_optloss.tf.optimizers``: TF1's update rules, state, closure and validation.

The references below are TF1's kernels (``training_ops.cc``) written out in NumPy float32, one array
at a time, in TF's order of operations; hyperparameters are float32 as in TF's graph.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from lightning_optloss.tf.optimizers import (
    OPTIMIZER_CLS_NAMES,
    TFAdagrad,
    TFAdam,
    TFFtrl,
    TFGradientDescent,
    TFMomentum,
    TFRMSProp,
)

SHAPES = [(), (7,), (3, 4), (2, 3, 5)]
STEPS = 10
f32 = np.float32

Arrays = list[np.ndarray]


def initial_values(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def gradients(seed: int = 1, steps: int = STEPS) -> list[Arrays]:
    """``gradients()[t][i]``: the gradient of parameter ``i`` at step ``t``."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(np.float32) for shape in SHAPES] for _ in range(steps)]


# --- NumPy references: each returns the values of all variables after every step. ---


def reference_gradient_descent(values: Arrays, grads: list[Arrays], lr: float) -> list[Arrays]:
    lr = f32(lr)
    values = [v.copy() for v in values]
    trajectory = []
    for step_grads in grads:
        for var, g in zip(values, step_grads, strict=True):
            var -= g * lr
        trajectory.append([v.copy() for v in values])
    return trajectory


def reference_momentum(
    values: Arrays, grads: list[Arrays], lr: float, momentum: float = 0.9, use_nesterov: bool = False
) -> list[Arrays]:
    lr, momentum = f32(lr), f32(momentum)
    values = [v.copy() for v in values]
    accums = [np.zeros_like(v) for v in values]
    trajectory = []
    for step_grads in grads:
        for var, accum, g in zip(values, accums, step_grads, strict=True):
            accum[...] = accum * momentum + g
            if use_nesterov:
                var -= g * lr + accum * momentum * lr
            else:
                var -= accum * lr
        trajectory.append([v.copy() for v in values])
    return trajectory


def reference_adagrad(
    values: Arrays, grads: list[Arrays], lr: float, initial_accumulator_value: float = 0.1
) -> list[Arrays]:
    lr = f32(lr)
    values = [v.copy() for v in values]
    accums = [np.full_like(v, initial_accumulator_value) for v in values]
    trajectory = []
    for step_grads in grads:
        for var, accum, g in zip(values, accums, step_grads, strict=True):
            accum += g * g
            var -= g * lr * (f32(1) / np.sqrt(accum))
        trajectory.append([v.copy() for v in values])
    return trajectory


def reference_adam(
    values: Arrays,
    grads: list[Arrays],
    lr: float = 0.001,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
) -> list[Arrays]:
    lr, beta1, beta2, epsilon = f32(lr), f32(beta1), f32(beta2), f32(epsilon)
    values = [v.copy() for v in values]
    ms = [np.zeros_like(v) for v in values]
    vs = [np.zeros_like(v) for v in values]
    beta1_power, beta2_power = beta1, beta2
    trajectory = []
    for step_grads in grads:
        lr_t = lr * np.sqrt(f32(1) - beta2_power) / (f32(1) - beta1_power)
        for var, m, v, g in zip(values, ms, vs, step_grads, strict=True):
            m += (g - m) * (f32(1) - beta1)
            v += (g * g - v) * (f32(1) - beta2)
            var -= m * lr_t / (np.sqrt(v) + epsilon)
        beta1_power, beta2_power = beta1_power * beta1, beta2_power * beta2
        trajectory.append([v.copy() for v in values])
    return trajectory


def reference_rmsprop(
    values: Arrays,
    grads: list[Arrays],
    lr: float,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
) -> list[Arrays]:
    lr, decay, momentum, epsilon = f32(lr), f32(decay), f32(momentum), f32(epsilon)
    values = [v.copy() for v in values]
    mean_squares = [np.ones_like(v) for v in values]
    mean_grads = [np.zeros_like(v) for v in values]
    moms = [np.zeros_like(v) for v in values]
    trajectory = []
    for step_grads in grads:
        for var, ms, mg, mom, g in zip(values, mean_squares, mean_grads, moms, step_grads, strict=True):
            ms += (g * g - ms) * (f32(1) - decay)
            if centered:
                mg += (g - mg) * (f32(1) - decay)
                denom = ms - mg * mg + epsilon
            else:
                denom = ms + epsilon
            mom[...] = mom * momentum + g * lr / np.sqrt(denom)
            var -= mom
        trajectory.append([v.copy() for v in values])
    return trajectory


def reference_ftrl(
    values: Arrays,
    grads: list[Arrays],
    lr: float,
    learning_rate_power: float = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: float = 0.0,
    l2_regularization_strength: float = 0.0,
) -> list[Arrays]:
    lr, power = f32(lr), f32(learning_rate_power)
    l1, l2 = f32(l1_regularization_strength), f32(l2_regularization_strength)
    values = [v.copy() for v in values]
    accums = [np.full_like(v, initial_accumulator_value) for v in values]
    linears = [np.zeros_like(v) for v in values]
    trajectory = []
    for step_grads in grads:
        for var, accum, linear, g in zip(values, accums, linears, step_grads, strict=True):
            new_accum = accum + g * g
            sigma = (new_accum ** (-power) - accum ** (-power)) / lr
            linear += g - sigma * var
            shrunk = np.abs(linear) > l1
            var[...] = np.where(
                shrunk, (np.sign(linear) * l1 - linear) / (new_accum ** (-power) / lr + f32(2) * l2), f32(0)
            )
            accum[...] = new_accum
        trajectory.append([v.copy() for v in values])
    return trajectory


REFERENCES: dict[type[torch.optim.Optimizer], Callable[..., list[Arrays]]] = {
    TFGradientDescent: reference_gradient_descent,
    TFMomentum: reference_momentum,
    TFAdagrad: reference_adagrad,
    TFAdam: reference_adam,
    TFRMSProp: reference_rmsprop,
    TFFtrl: reference_ftrl,
}

FTRL_L1_L2 = {
    "lr": 0.2,
    "learning_rate_power": -0.3,
    "initial_accumulator_value": 0.5,
    "l1_regularization_strength": 0.3,
    "l2_regularization_strength": 0.1,
}

CONFIGS = [
    pytest.param(TFGradientDescent, {"lr": 0.1}, id="sgd"),
    pytest.param(TFMomentum, {"lr": 0.1}, id="momentum"),
    pytest.param(TFMomentum, {"lr": 0.1, "momentum": 0.7, "use_nesterov": True}, id="momentum-nesterov"),
    pytest.param(TFAdagrad, {"lr": 0.1}, id="adagrad"),
    pytest.param(TFAdagrad, {"lr": 0.3, "initial_accumulator_value": 0.01}, id="adagrad-small-init"),
    pytest.param(TFAdam, {"lr": 0.01}, id="adam"),
    pytest.param(TFAdam, {"lr": 0.05, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-3}, id="adam-custom"),
    pytest.param(TFRMSProp, {"lr": 0.01}, id="rmsprop"),
    pytest.param(TFRMSProp, {"lr": 0.01, "decay": 0.8, "momentum": 0.7, "epsilon": 1e-6}, id="rmsprop-momentum"),
    pytest.param(TFRMSProp, {"lr": 0.01, "momentum": 0.7, "centered": True}, id="rmsprop-centered"),
    pytest.param(TFFtrl, {"lr": 0.1}, id="ftrl"),
    pytest.param(TFFtrl, FTRL_L1_L2, id="ftrl-l1-l2-power"),
    pytest.param(
        TFFtrl,
        {"lr": 0.2, "learning_rate_power": 0.0, "l2_regularization_strength": 0.5},
        id="ftrl-fixed-rate",
    ),
]


def as_parameters(values: Arrays, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=dtype, requires_grad=True) for v in values]


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[Arrays]) -> list[Arrays]:
    trajectory = []
    for step_grads in grads:
        for param, g in zip(params, step_grads, strict=True):
            param.grad = torch.tensor(g, dtype=param.dtype)
        optimizer.step()
        trajectory.append([param.detach().numpy().copy() for param in params])
    return trajectory


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_updates_match_tf1_kernels_step_by_step(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    values, grads = initial_values(), gradients()
    params = as_parameters(values)
    got = run_steps(cls(params, **kwargs), params, grads)
    expected = REFERENCES[cls](values, grads, **kwargs)
    atol = 1e-7
    if cls is TFFtrl and kwargs.get("learning_rate_power", -0.5) not in (-0.5, 0.0):
        # x**0.3 is within an ulp, not correctly rounded, in torch and NumPy (TF differs again), and
        # n'**0.3 - n**0.3 cancels: a weight near 0 can be off by a few ulps of the linear slot (~0.3).
        atol = 1e-6
    for step, (got_values, expected_values) in enumerate(zip(got, expected, strict=True)):
        for i, (g, e) in enumerate(zip(got_values, expected_values, strict=True)):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=atol, err_msg=f"step {step}, parameter {i}")


def test_ftrl_l1_sets_weights_exactly_to_zero_where_linear_is_within_l1() -> None:
    params = as_parameters(initial_values())
    optimizer = TFFtrl(params, **FTRL_L1_L2)
    run_steps(optimizer, params, gradients())
    linear = torch.cat([optimizer.state[p]["linear"].flatten() for p in params])
    weights = torch.cat([p.detach().flatten() for p in params])
    inside = linear.abs() <= FTRL_L1_L2["l1_regularization_strength"]
    assert 0 < int(inside.sum()) < inside.numel()  # both branches are exercised
    assert torch.all(weights[inside] == 0)
    assert torch.all(weights[~inside] != 0)


def test_adagrad_has_no_epsilon_unlike_torch() -> None:
    # With a tiny accumulator, torch's eps=1e-10 outside the square root dominates; TF has none.
    g = 1e-10
    tf_param = torch.zeros(1, requires_grad=True)
    torch_param = torch.zeros(1, requires_grad=True)
    tf_opt = TFAdagrad([tf_param], lr=1.0, initial_accumulator_value=1e-20)
    torch_opt = torch.optim.Adagrad([torch_param], lr=1.0, initial_accumulator_value=1e-20)
    for param, opt in ((tf_param, tf_opt), (torch_param, torch_opt)):
        param.grad = torch.full((1,), g)
        opt.step()
    # TF: g / sqrt(2 g^2) = 1/sqrt(2); torch: g / (sqrt(2 g^2) + g) = 1/(sqrt(2) + 1).
    assert tf_param.item() == pytest.approx(-1 / math.sqrt(2), rel=1e-6)
    assert torch_param.item() == pytest.approx(-1 / (math.sqrt(2) + 1), rel=1e-6)


def test_rmsprop_mean_square_starts_at_one_unlike_torch() -> None:
    g, lr = 0.01, 0.1
    tf_param = torch.zeros(1, requires_grad=True)
    torch_param = torch.zeros(1, requires_grad=True)
    tf_opt = TFRMSProp([tf_param], lr=lr)
    torch_opt = torch.optim.RMSprop([torch_param], lr=lr, alpha=0.9)
    for param, opt in ((tf_param, tf_opt), (torch_param, torch_opt)):
        param.grad = torch.full((1,), g)
        opt.step()
    assert tf_opt.state[tf_param]["rms"].item() == pytest.approx(0.9 + 0.1 * g * g, rel=1e-6)
    assert tf_param.item() == pytest.approx(-lr * g / math.sqrt(0.9 + 0.1 * g * g), rel=1e-6)
    # torch starts at 0: its first step is lr / sqrt(0.1), about 300 times larger here.
    assert torch_param.item() == pytest.approx(-lr / math.sqrt(0.1), rel=1e-5)


def test_adam_computes_one_minus_beta_in_float32_like_tf() -> None:
    param = torch.zeros(3, requires_grad=True)
    optimizer = TFAdam([param])
    grad = torch.tensor([0.5, -2.0, 3.0])
    param.grad = grad.clone()
    optimizer.step()
    one_minus_beta2 = f32(1) - f32(0.999)
    assert one_minus_beta2 == f32(0.00099998713)
    assert torch.equal(optimizer.state[param]["v"], grad * grad * float(one_minus_beta2))
    assert not torch.equal(optimizer.state[param]["v"], grad * grad * 0.001)


def test_adam_beta_powers_are_repeated_float32_products() -> None:
    param = torch.zeros(2, requires_grad=True)
    optimizer = TFAdam([param], beta1=0.9, beta2=0.999)
    for _ in range(3):
        param.grad = torch.ones(2)
        optimizer.step()
    state = optimizer.state[param]
    # Used at step 4: beta * beta * beta * beta, rounded to float32 after every product.
    assert state["beta1_power"] == float(f32(0.9) * f32(0.9) * f32(0.9) * f32(0.9))
    assert state["beta2_power"] == float(f32(0.999) * f32(0.999) * f32(0.999) * f32(0.999))


def test_float64_parameters_see_float32_hyperparameters_like_tf() -> None:
    # TF turns the Python float into a float32 tensor and casts that to the variable's dtype...
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = TFGradientDescent([param], lr=0.1)
    param.grad = torch.ones(1, dtype=torch.float64)
    optimizer.step()
    assert param.item() == -float(f32(0.1))
    # ...but builds Adagrad's accumulator from the Python float in the variable's dtype.
    adagrad = TFAdagrad([param], lr=0.1, initial_accumulator_value=0.1)
    adagrad.step()
    assert adagrad.state[param]["accumulator"].item() == 0.1 + 1.0


def test_parameters_of_different_dtypes_in_one_group_update_as_if_alone() -> None:
    values, grads = initial_values(), gradients(steps=3)
    mixed = as_parameters(values[:2]) + as_parameters(values[2:], torch.float64)
    alone32, alone64 = as_parameters(values[:2]), as_parameters(values[2:], torch.float64)
    run_steps(TFAdam(mixed, lr=0.01), mixed, grads)
    run_steps(TFAdam(alone32, lr=0.01), alone32, [g[:2] for g in grads])
    run_steps(TFAdam(alone64, lr=0.01), alone64, [g[2:] for g in grads])
    for got, expected in zip(mixed, alone32 + alone64, strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_closure_runs_before_the_update_with_grad_enabled_and_its_loss_is_returned() -> None:
    param = torch.tensor([1.0, -2.0], requires_grad=True)
    optimizer = TFGradientDescent([param], lr=0.1)
    seen: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        seen.append(param.detach().clone())
        loss = (param * param).sum()
        loss.backward()  # needs grad mode, even though step() is called under no_grad below
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert loss is not None
    assert loss.item() == 5.0
    assert torch.equal(seen[0], torch.tensor([1.0, -2.0]))  # the closure saw the parameter before the update
    assert torch.equal(param.detach(), torch.tensor([1.0, -2.0]) - torch.tensor([2.0, -4.0]) * f32(0.1))
    assert optimizer.step() is None


def test_lightning_hook_changes_to_gradients_reach_the_update() -> None:
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return (self.weight * batch).sum()

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.weight.grad.mul_(0.5)  # runs inside the closure, before TFGradientDescent reads it

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return TFGradientDescent(self.parameters(), lr=0.1)

    module = Module()
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.ones(4, 3), batch_size=1))
    step = f32(0.5) * f32(0.1)
    assert torch.equal(module.weight.detach(), torch.full((3,), float(f32(1) - step - step)))


@pytest.mark.parametrize("name", list(OPTIMIZER_CLS_NAMES))
def test_parameters_without_gradient_are_untouched_and_get_no_state(name: str) -> None:
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = OPTIMIZER_CLS_NAMES[name]([used, unused], lr=0.1)
    for _ in range(2):
        used.grad = torch.full((3,), 0.5)
        optimizer.step()
    assert not torch.equal(used.detach(), torch.ones(3))
    assert torch.equal(unused.detach(), torch.ones(2))
    assert unused not in optimizer.state
    assert 1 not in optimizer.state_dict()["state"]


def test_scheduler_changes_to_the_learning_rate_are_honoured() -> None:
    param = torch.zeros(1, requires_grad=True)
    optimizer = TFGradientDescent([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    expected = f32(0)
    for step in range(4):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**step)
        param.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
        expected -= f32(0.1 * 0.5**step)
        assert param.item() == expected


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_state_dict_round_trip_resumes_bit_identically(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    values, grads = initial_values(), gradients()
    params = as_parameters(values)
    uninterrupted = run_steps(cls(params, **kwargs), params, grads)[-1]

    params = as_parameters(values)
    optimizer = cls(params, **kwargs)
    run_steps(optimizer, params, grads[:4])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed = cls(resumed_params, **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    final = run_steps(resumed, resumed_params, grads[4:])[-1]
    for got, expected in zip(final, uninterrupted, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_sparse_gradients_are_refused() -> None:
    param = torch.zeros(4, requires_grad=True)
    optimizer = TFAdagrad([param], lr=0.1)
    param.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,), check_invariants=True)
    with pytest.raises(RuntimeError, match="TFAdagrad does not support sparse gradients"):
        optimizer.step()


def test_optimizer_cls_names_are_tf_names_callable_with_lr() -> None:
    assert list(OPTIMIZER_CLS_NAMES) == ["Adagrad", "Adam", "Ftrl", "Momentum", "RMSProp", "SGD"]
    assert list(OPTIMIZER_CLS_NAMES.values()) == [
        TFAdagrad,
        TFAdam,
        TFFtrl,
        TFMomentum,
        TFRMSProp,
        TFGradientDescent,
    ]
    for cls in OPTIMIZER_CLS_NAMES.values():
        optimizer = cls([torch.zeros(1, requires_grad=True)], lr=0.01)
        assert isinstance(optimizer, torch.optim.Optimizer)
        assert optimizer.defaults["lr"] == 0.01
        assert optimizer.param_groups[0]["lr"] == 0.01
    assert OPTIMIZER_CLS_NAMES["Momentum"]([torch.zeros(1)], lr=0.01).defaults["momentum"] == 0.9


INVALID = [
    (TFGradientDescent, {"lr": -0.1}, ValueError, "lr must be in [0, inf), got -0.1"),
    (TFGradientDescent, {"lr": math.inf}, ValueError, "lr must be in [0, inf), got inf"),
    (TFGradientDescent, {"lr": math.nan}, ValueError, "lr must be in [0, inf), got nan"),
    (TFGradientDescent, {"lr": "0.1"}, TypeError, "lr must be a real number in [0, inf), got '0.1' (str)"),
    (TFGradientDescent, {"lr": True}, TypeError, "lr must be a real number in [0, inf), got True (bool)"),
    (TFMomentum, {"lr": 0.1, "momentum": -0.9}, ValueError, "momentum must be in [0, inf), got -0.9"),
    (TFMomentum, {"lr": 0.1, "use_nesterov": 1}, TypeError, "use_nesterov must be a bool, got 1 (int)"),
    (TFAdagrad, {"lr": -1}, ValueError, "lr must be in [0, inf), got -1"),
    (
        TFAdagrad,
        {"lr": 0.1, "initial_accumulator_value": 0.0},
        ValueError,
        "initial_accumulator_value must be in (0, inf), got 0.0",
    ),
    (TFAdam, {"lr": -0.001}, ValueError, "lr must be in [0, inf), got -0.001"),
    (TFAdam, {"beta1": 1.0}, ValueError, "beta1 must be in [0, 1), got 1.0"),
    (TFAdam, {"beta1": -0.1}, ValueError, "beta1 must be in [0, 1), got -0.1"),
    (TFAdam, {"beta2": 1.5}, ValueError, "beta2 must be in [0, 1), got 1.5"),
    (TFAdam, {"epsilon": 0.0}, ValueError, "epsilon must be in (0, inf), got 0.0"),
    (TFAdam, {"epsilon": None}, TypeError, "epsilon must be a real number in (0, inf), got None (NoneType)"),
    (TFRMSProp, {"lr": -0.1}, ValueError, "lr must be in [0, inf), got -0.1"),
    (TFRMSProp, {"lr": 0.1, "decay": 1.5}, ValueError, "decay must be in [0, 1], got 1.5"),
    (TFRMSProp, {"lr": 0.1, "momentum": -0.5}, ValueError, "momentum must be in [0, inf), got -0.5"),
    (TFRMSProp, {"lr": 0.1, "epsilon": 0.0}, ValueError, "epsilon must be in (0, inf), got 0.0"),
    (TFRMSProp, {"lr": 0.1, "centered": "yes"}, TypeError, "centered must be a bool, got 'yes' (str)"),
    (TFFtrl, {"lr": 0.0}, ValueError, "lr must be in (0, inf), got 0.0"),
    (
        TFFtrl,
        {"lr": 0.1, "learning_rate_power": 0.5},
        ValueError,
        "learning_rate_power must be in (-inf, 0], got 0.5",
    ),
    (
        TFFtrl,
        {"lr": 0.1, "initial_accumulator_value": -0.1},
        ValueError,
        "initial_accumulator_value must be in (0, inf), got -0.1",
    ),
    (
        TFFtrl,
        {"lr": 0.1, "l1_regularization_strength": -1.0},
        ValueError,
        "l1_regularization_strength must be in [0, inf), got -1.0",
    ),
    (
        TFFtrl,
        {"lr": 0.1, "l2_regularization_strength": -2.0},
        ValueError,
        "l2_regularization_strength must be in [0, inf), got -2.0",
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "message"), INVALID)
def test_invalid_hyperparameters_are_rejected_with_the_argument_and_value(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as excinfo:
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    assert str(excinfo.value) == f"{cls.__name__}: {message}"


def test_parameter_group_overrides_are_validated_too() -> None:
    with pytest.raises(ValueError, match=r"TFAdam: beta2 must be in \[0, 1\), got 1.5"):
        TFAdam([{"params": [torch.zeros(1)], "beta2": 1.5}])
    optimizer = TFMomentum([torch.zeros(1)], lr=0.1)
    with pytest.raises(ValueError, match=r"TFMomentum: lr must be in \[0, inf\), got -1"):
        optimizer.add_param_group({"params": [torch.zeros(1)], "lr": -1})
    assert len(optimizer.param_groups) == 1
