"""configure_optimizers: every way TF accepted an optimizer, and learning-rate decay through Lightning."""

from __future__ import annotations

import functools
import io
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OPTIMIZER_CLS_NAMES, LearningRateDecay, configure_optimizers
from lightning_optloss.tf import decay
from lightning_optloss.tf.optimizers import TFAdagrad, TFMomentum


def test_names_build_tf_optimizers_with_tf_defaults():
    module = TinyRegression()
    assert list(OPTIMIZER_CLS_NAMES) == ["Adagrad", "Adam", "Ftrl", "Momentum", "RMSProp", "SGD"]
    for name, optimizer_cls in OPTIMIZER_CLS_NAMES.items():
        optimizer = configure_optimizers(module, name, 0.1)
        assert type(optimizer) is optimizer_cls
        assert optimizer.param_groups[0]["lr"] == 0.1
        assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in module.parameters()}
    assert configure_optimizers(module, "Momentum", 0.1).param_groups[0]["momentum"] == 0.9
    assert configure_optimizers(module, "Adagrad", 0.1).param_groups[0]["initial_accumulator_value"] == 0.1


def test_keyword_arguments_reach_a_named_or_class_optimizer():
    module = TinyRegression()
    assert configure_optimizers(module, "Momentum", 0.1, momentum=0.5).param_groups[0]["momentum"] == 0.5
    adamw = configure_optimizers(module, torch.optim.AdamW, 0.01, weight_decay=0.3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.3


def test_callables_get_the_parameters_and_the_learning_rate_when_given():
    module = TinyRegression()
    seen = []

    def with_rate(params, learning_rate):
        seen.append(learning_rate)
        return TFMomentum(params, learning_rate, momentum=0.5)

    assert isinstance(configure_optimizers(module, with_rate, 0.3), TFMomentum)
    assert seen == [0.3]
    without = configure_optimizers(module, lambda params: TFAdagrad(params, 0.5))
    assert without.param_groups[0]["lr"] == 0.5


def test_variables_restrict_the_optimized_parameters_by_name_or_object():
    module = TinyRegression()
    optimizer = configure_optimizers(module, "SGD", 0.1, variables=["w2", module.b2])
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(module.w2), id(module.b2)]


def test_frozen_parameters_are_left_out_by_default():
    module = TinyRegression()
    module.w1.requires_grad_(False)
    optimizer = configure_optimizers(module, "SGD", 0.1)
    assert id(module.w1) not in {id(p) for p in optimizer.param_groups[0]["params"]}


def test_zero_dimensional_tensor_learning_rate_is_accepted():
    assert configure_optimizers(TinyRegression(), "SGD", torch.tensor(0.25)).param_groups[0]["lr"] == 0.25


def test_decay_fn_gives_a_per_step_scheduler_entry():
    schedule = functools.partial(decay.exponential_decay, decay_steps=3, decay_rate=0.5)
    config = configure_optimizers(TinyRegression(), "Adam", 0.1, schedule)
    scheduler = config["lr_scheduler"]
    assert isinstance(scheduler["scheduler"], LearningRateDecay)
    assert (scheduler["interval"], scheduler["frequency"]) == ("step", 1)
    assert config["optimizer"].param_groups[0]["lr"] == schedule(0.1, 0)


def test_decay_without_callback_follows_lightnings_step_count(mlflow_logger):
    schedule = functools.partial(decay.exponential_decay, decay_steps=2, decay_rate=0.5, staircase=True)
    model = TinyRegression("SGD", 0.4, schedule)
    trainer = make_trainer([LearningRateMonitor("step")], logger=mlflow_logger, max_steps=5)
    trainer.fit(model, regression_data(5))
    rates = metric_history(mlflow_logger)["learning_rate"]
    assert [rates[step] for step in sorted(rates)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


def test_decay_of_an_instance_without_learning_rate_decays_each_groups_rate():
    module = TinyRegression()
    optimizer = torch.optim.SGD([{"params": [module.w1], "lr": 1.0}, {"params": [module.w2], "lr": 0.1}])
    config = configure_optimizers(module, optimizer, learning_rate_decay_fn=lambda lr, step: lr / (1 + step))
    scheduler = config["lr_scheduler"]["scheduler"]
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.5, 0.05])


def test_scheduler_state_loads_with_weights_only_and_leaves_the_function_out():
    schedule = functools.partial(decay.cosine_decay, decay_steps=10)
    scheduler = configure_optimizers(TinyRegression(), "SGD", 0.1, schedule)["lr_scheduler"]["scheduler"]
    for _ in range(3):
        scheduler.optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "decay_fn" not in state
    fresh = configure_optimizers(TinyRegression(), "SGD", 0.1, schedule)["lr_scheduler"]["scheduler"]
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 3 and fresh.decay_fn is schedule


def test_decay_partials_pickle_for_spawned_processes():
    schedule = functools.partial(decay.polynomial_decay, decay_steps=5, power=2.0)
    restored = pickle.loads(pickle.dumps(schedule))
    assert restored(0.1, 3) == schedule(0.1, 3)
