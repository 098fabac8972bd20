"""Every invalid argument gets a ValueError that names the argument and the value, before the first step."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceXLAStrategy
from support import TinyRegression, make_trainer, regression_data

from lightning_optloss import OptimizeLoss, agc_clipping_fn, configure_optimizers
from lightning_optloss.distributed import strategies
from lightning_optloss.tf import decay

# (keyword arguments, text the message must contain besides the argument's name)
CONSTRUCTION_ERRORS = [
    ({"gradient_noise_scale": -0.1}, "-0.1"),
    ({"gradient_noise_scale": "0.1"}, "'0.1'"),
    ({"gradient_noise_scale": math.nan}, "nan"),
    ({"gradient_noise_scale": True}, "True"),
    ({"gradient_multipliers": [("w1", 2.0)]}, "[('w1', 2.0)]"),
    ({"gradient_multipliers": {"w1": "2"}}, "'2'"),
    ({"gradient_multipliers": {"w1": math.inf}}, "inf"),
    ({"gradient_multipliers": {3: 1.0}}, "3"),
    ({"clip_gradients": 0.0}, "0.0"),
    ({"clip_gradients": -1.0}, "-1.0"),
    ({"clip_gradients": "1.0"}, "'1.0'"),
    ({"clip_gradients": math.inf}, "inf"),
    ({"clip_gradients": [1.0]}, "[1.0]"),
    ({"update_ops": print}, "wrap a single callable"),
    ({"update_ops": [1]}, "1"),
    ({"update_ops": "op"}, "'op'"),
    ({"variables": "w1"}, "'w1'"),
    ({"variables": []}, "[]"),
    ({"variables": [3]}, "3"),
    ({"variables": torch.zeros(2)}, "tensor"),
    ({"name": ""}, "''"),
    ({"name": "Optimize Loss"}, "'Optimize Loss'"),
    ({"name": "a:b"}, "'a:b'"),
    ({"name": 3}, "3"),
    ({"summaries": ["los"]}, "Did you mean 'loss'"),
    ({"summaries": ["Loss"]}, "Did you mean 'loss'"),
    ({"summaries": "loss"}, "'loss'"),
    ({"summaries": ["loss", "loss"]}, "twice"),
    ({"colocate_gradients_with_ops": "yes"}, "'yes'"),
    ({"increment_global_step": 1}, "1"),
    ({"seed": -1}, "-1"),
    ({"seed": 2**63}, str(2**63)),
    ({"seed": 1.5}, "1.5"),
    ({"seed": True}, "True"),
    ({"on_nonfinite": "Skip"}, "Did you mean 'skip'"),
    ({"on_nonfinite": "ignore"}, "'ignore'"),
    ({"clip_gradients": {}}, "{}"),
    ({"clip_gradients": {"": 1.0}}, "{'': 1.0}"),
    ({"clip_gradients": {"w*": 0.0}}, "0.0"),
    ({"clip_gradients": {"w*": "1"}}, "'1'"),
    ({"clip_gradients": {3: 1.0}}, "{3: 1.0}"),
    ({"gradient_noise_scale": int}, "int"),
]


@pytest.mark.parametrize(("kwargs", "shown"), CONSTRUCTION_ERRORS, ids=[repr(k) for k, _ in CONSTRUCTION_ERRORS])
def test_invalid_callback_arguments_fail_at_construction(kwargs, shown):
    (argument,) = kwargs
    with pytest.raises(ValueError) as error:
        OptimizeLoss(**kwargs)
    message = str(error.value)
    assert message.startswith("OptimizeLoss: ")
    assert argument in message
    assert shown in message


class WithExtraParameters(TinyRegression):
    """Adds a parameter that no loss reaches and a ParameterDict whose keys MLflow cannot tell apart."""

    def __init__(self, collide: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.unused = torch.nn.Parameter(torch.zeros(2))
        if collide:
            self.extra = torch.nn.ParameterDict({"a:b": torch.zeros(1), "a_b": torch.zeros(1)})


def _fit(callback, model=None, **trainer_kwargs):
    trainer = make_trainer([callback], **{"max_steps": 2, **trainer_kwargs})
    trainer.fit(model or TinyRegression(), regression_data(2))
    return trainer


SETUP_ERRORS = [
    (lambda: OptimizeLoss(gradient_multipliers={"w_2": 2.0}), None, "Did you mean 'w2'"),
    (lambda: OptimizeLoss(variables=["w1"], gradient_multipliers={"w2": 2.0}), None, "not among the parameters"),
    (lambda: OptimizeLoss(gradient_multipliers={torch.nn.Parameter(torch.zeros(2)): 2.0}), None, "not a"),
    (lambda: OptimizeLoss(variables=["w1", "w9"]), None, "'w9'"),
    (lambda: OptimizeLoss(variables=["w1", "w1"]), None, "twice"),
    (lambda: OptimizeLoss(variables=[torch.nn.Parameter(torch.zeros(3))]), None, "shape (3,)"),
    (lambda: OptimizeLoss(), lambda: WithExtraParameters(collide=True), "both become metric key"),
    (lambda: OptimizeLoss(clip_gradients={"w*": 1.0, "bias*": 0.5}), None, "'bias*'"),
    (lambda: OptimizeLoss(clip_gradients={"w*": 1.0, "w1": 0.5}), None, "never apply"),
    (lambda: OptimizeLoss(clip_gradients=agc_clipping_fn(exclude="head.*")), None, "'head.*'"),
]


@pytest.mark.parametrize(("callback", "model", "shown"), SETUP_ERRORS)
def test_invalid_names_and_parameters_fail_at_setup(callback, model, shown):
    started = []

    class NoStep(pl.Callback):
        def on_train_batch_start(self, *args):
            started.append(True)

    trainer = make_trainer([callback(), NoStep()], max_steps=1)
    with pytest.raises(ValueError, match=r"OptimizeLoss|agc_clipping_fn") as error:
        trainer.fit(model() if model else TinyRegression(), regression_data(1))
    assert shown in str(error.value)
    assert not started


def test_frozen_parameter_in_variables_is_rejected():
    model = TinyRegression()
    model.w1.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        _fit(OptimizeLoss(variables=["w1"]), model)


def test_clipping_in_both_trainer_and_callback_is_rejected():
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5"):
        _fit(OptimizeLoss(clip_gradients=1.0), gradient_clip_val=0.5)


def test_two_callbacks_with_the_same_name_are_rejected_by_lightning():
    # `name` is the state key; Lightning refuses two stateful callbacks with one key when building the Trainer.
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer([OptimizeLoss(), OptimizeLoss()], max_steps=1)
    make_trainer([OptimizeLoss(), OptimizeLoss(name="Second")], max_steps=1)


def test_variables_that_no_optimizer_updates_are_rejected_at_fit_start():
    class OnlyW2(TinyRegression):
        def configure_optimizers(self):
            return configure_optimizers(self, "SGD", 0.1, variables=["w2"])

    with pytest.raises(ValueError, match="no optimizer of the Trainer updates: 'w1'"):
        _fit(OptimizeLoss(), OnlyW2())


def test_parameters_without_any_gradient_fail_at_the_first_step():
    class ExtraInOptimizer(WithExtraParameters):
        def configure_optimizers(self):
            return configure_optimizers(self, "SGD", 0.1)

    with pytest.raises(ValueError, match="no gradient reached any of the 1 parameters"):
        _fit(OptimizeLoss(variables=["unused"]), ExtraInOptimizer())


def test_strategies_not_supported_are_refused_by_name():
    xla = SingleDeviceXLAStrategy.__new__(SingleDeviceXLAStrategy)  # built without a TPU: only its type matters
    with pytest.raises(ValueError, match="SingleDeviceXLAStrategy, which lightning_optloss does not support"):
        strategies.gradient_access("OptimizeLoss", xla)


def test_fsdp1_without_original_parameters_is_refused():
    with pytest.raises(ValueError, match=r"use_orig_params=False\) hides the module's parameters"):
        strategies.gradient_access("OptimizeLoss", FSDPStrategy(use_orig_params=False))
    access = strategies.gradient_access("OptimizeLoss", FSDPStrategy())
    assert isinstance(access, strategies.FlatParameterGradientAccess)


def _module():
    return TinyRegression()


class NotAnOptimizer:
    pass


HELPER_ERRORS = [
    ({"optimizer": "SGD", "learning_rate": -0.1}, "learning_rate", "-0.1"),
    ({"optimizer": "SGD", "learning_rate": "0.1"}, "learning_rate", "'0.1'"),
    ({"optimizer": "SGD", "learning_rate": math.nan}, "learning_rate", "nan"),
    ({"optimizer": "SGD", "learning_rate": torch.tensor([0.1])}, "learning_rate", "tensor([0.1000])"),
    ({"optimizer": "SGD", "learning_rate": torch.tensor(1)}, "learning_rate", "tensor(1)"),
    ({"optimizer": "Adamm", "learning_rate": 0.1}, "optimizer", "Did you mean 'Adam'"),
    ({"optimizer": "rmsprop", "learning_rate": 0.1}, "optimizer", "Did you mean 'RMSProp'"),
    ({"optimizer": 3, "learning_rate": 0.1}, "optimizer", "3"),
    ({"optimizer": NotAnOptimizer, "learning_rate": 0.1}, "optimizer", "NotAnOptimizer"),
    ({"optimizer": "Adam"}, "learning_rate", "'Adam'"),
    ({"optimizer": torch.optim.SGD}, "learning_rate", "SGD"),
    ({"optimizer": lambda params, lr: "sgd", "learning_rate": 0.1}, "optimizer", "returned 'sgd'"),
    ({"optimizer": lambda params: [], "learning_rate": None}, "optimizer", "returned []"),
    ({"optimizer": "SGD", "learning_rate": 0.1, "learning_rate_decay_fn": 0.5}, "learning_rate_decay_fn", "0.5"),
    (
        {"optimizer": "SGD", "learning_rate": 0.1, "learning_rate_decay_fn": lambda lr, step: -lr},
        "learning_rate_decay_fn",
        "returned -0.1",
    ),
    (
        {"optimizer": "SGD", "learning_rate": 0.1, "learning_rate_decay_fn": lambda lr, step: math.nan},
        "learning_rate_decay_fn",
        "returned nan",
    ),
    (
        {"optimizer": "SGD", "learning_rate": 0.1, "learning_rate_decay_fn": lambda lr, step: "0.1"},
        "learning_rate_decay_fn",
        "returned '0.1'",
    ),
    ({"optimizer": "SGD", "learning_rate": 0.1, "variables": ["w5"]}, "variables", "'w5'"),
    ({"optimizer": "SGD", "learning_rate": 0.1, "variables": "w1"}, "variables", "'w1'"),
    ({"optimizer": "SGD", "learning_rate": 0.1, "variables": ["w1", "w1"]}, "variables", "twice"),
    (
        {"optimizer": lambda params, lr: torch.optim.SGD(params, lr), "learning_rate": 0.1, "momentum": 0.5},
        "keyword",
        "momentum",
    ),
]


@pytest.mark.parametrize(("kwargs", "argument", "shown"), HELPER_ERRORS, ids=lambda v: repr(v)[:60])
def test_invalid_helper_arguments_fail_when_called(kwargs, argument, shown):
    with pytest.raises(ValueError) as error:
        configure_optimizers(_module(), **kwargs)
    message = str(error.value)
    assert argument in message
    assert shown in message


def test_optimizer_instance_must_agree_with_learning_rate_and_variables():
    module = _module()
    optimizer = torch.optim.SGD([module.w1, module.w2], lr=0.1)
    assert configure_optimizers(module, optimizer) is optimizer
    assert configure_optimizers(module, optimizer, 0.1, variables=["w1", "w2"]) is optimizer
    with pytest.raises(ValueError, match="disagrees with the optimizer instance's rates"):
        configure_optimizers(module, optimizer, 0.2)
    with pytest.raises(ValueError, match="`variables` selects 1 parameters"):
        configure_optimizers(module, optimizer, variables=["w1"])
    with pytest.raises(ValueError, match="extra keyword arguments"):
        configure_optimizers(module, optimizer, momentum=0.5)


def test_helper_needs_a_module():
    with pytest.raises(ValueError, match="`module`"):
        configure_optimizers([torch.nn.Parameter(torch.zeros(1))], "SGD", 0.1)


def test_failure_at_fit_start_leaves_no_hooks_and_no_bound_scheduler():
    class WithSchedule(TinyRegression):
        def configure_optimizers(self):
            return configure_optimizers(self, "SGD", 0.1, functools.partial(decay.cosine_decay, decay_steps=10))

    callback = OptimizeLoss(gradient_multipliers={"w9": 2.0})
    trainer = make_trainer([callback], max_steps=2)
    with pytest.raises(ValueError, match="'w9'"):
        trainer.fit(WithSchedule(), regression_data(2))
    (optimizer,) = trainer.optimizers
    assert not optimizer._optimizer_step_post_hooks
    assert trainer.lr_scheduler_configs[0].scheduler._global_step is None
    assert callback._fit.pipeline is None and callback.global_step == 0


def test_decay_fn_failing_later_names_itself_and_the_step():
    def fragile(learning_rate, global_step):
        return -1.0 if global_step == 2 else learning_rate

    class Fragile(TinyRegression):
        def configure_optimizers(self):
            return configure_optimizers(self, "SGD", 0.1, fragile)

    with pytest.raises(ValueError, match=r"learning_rate_decay_fn .*fragile returned -1.0 .* global_step=2"):
        _fit(OptimizeLoss(), Fragile(), max_steps=4)


def test_an_exception_during_fit_removes_the_optimizer_hooks():
    class Failing(TinyRegression):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    trainer = make_trainer([OptimizeLoss()], max_steps=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), regression_data(3))
    (optimizer,) = trainer.optimizers
    assert not optimizer._optimizer_step_post_hooks
