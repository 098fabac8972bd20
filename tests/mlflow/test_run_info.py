"""The run configuration as MLflow params, tags and optimize_loss/config.json, from a real Trainer and store."""

from __future__ import annotations

import functools
import json

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient
from support import TinyRegression, make_trainer, regression_data

from lightning_optloss import OPTIMIZER_SUMMARIES, OptimizeLoss, __version__, adaptive_clipping_fn, configure_optimizers
from lightning_optloss.mlflow import run_info
from lightning_optloss.mlflow.io import MAX_PARAM_VAL_LENGTH
from lightning_optloss.tf import decay


def fit(callback, logger, model=None, steps=2):
    model = model or TinyRegression()
    make_trainer([callback], logger=logger, max_steps=steps).fit(model, regression_data(steps))
    return model


def run_of(logger):
    return MlflowClient(logger._tracking_uri).get_run(logger.run_id)


def config_json(logger, tmp_path, path="optimize_loss/config.json"):
    client = MlflowClient(logger._tracking_uri)
    return json.loads((tmp_path / client.download_artifacts(logger.run_id, path, str(tmp_path))).read_text())


def test_callback_optimizer_and_schedule_are_params_with_the_documented_keys(mlflow_logger, tmp_path):
    schedule = functools.partial(decay.exponential_decay, decay_steps=10, decay_rate=0.5, staircase=True)
    callback = OptimizeLoss(
        gradient_noise_scale=0.01,
        gradient_multipliers={"w1": 0.5},
        clip_gradients=adaptive_clipping_fn(global_step=True, report_summary=True),
        variables=["w1", "w2"],
        summaries=OPTIMIZER_SUMMARIES,
        seed=3,
    )
    fit(callback, mlflow_logger, TinyRegression("Adam", 0.01, schedule))
    params = run_of(mlflow_logger).data.params
    assert params == {
        "optimize_loss.name": "OptimizeLoss",
        "optimize_loss.gradient_noise_scale": "0.01",
        "optimize_loss.gradient_multipliers": '{"w1": 0.5}',
        "optimize_loss.clip_mode": "adaptive",
        "optimize_loss.clip_gradients": (
            "adaptive_clipping_fn(std_factor=2.0, decay=0.95, static_max_norm=None, global_step=True, "
            "report_summary=True, epsilon=1e-08)"
        ),
        "optimize_loss.variables": '["w1", "w2"]',
        "optimize_loss.summaries": json.dumps(OPTIMIZER_SUMMARIES),
        "optimize_loss.increment_global_step": "True",
        "optimize_loss.seed": "3",
        "optimize_loss.update_ops": "None",
        "optimize_loss.colocate_gradients_with_ops": "False",
        "optimize_loss.histogram_bins": "30",
        "optimize_loss.optimizer": "lightning_optloss.tf.optimizers.TFAdam",
        "optimize_loss.optimizer.lr": "0.01",
        "optimize_loss.optimizer.beta1": "0.9",
        "optimize_loss.optimizer.beta2": "0.999",
        "optimize_loss.optimizer.epsilon": "1e-08",
        "optimize_loss.learning_rate_decay_fn": "lightning_optloss.tf.decay.exponential_decay",
        "optimize_loss.learning_rate_decay_fn.decay_steps": "10",
        "optimize_loss.learning_rate_decay_fn.decay_rate": "0.5",
        "optimize_loss.learning_rate_decay_fn.staircase": "True",
    }
    tags = run_of(mlflow_logger).data.tags
    assert {key: value for key, value in tags.items() if key.startswith("optimize_loss.")} == {
        "optimize_loss.strategy": "SingleDeviceStrategy",
        "optimize_loss.world_size": "1",
        "optimize_loss.precision": "32-true",
        "optimize_loss.accelerator": "CPUAccelerator",
        "optimize_loss.version": __version__,
        "optimize_loss.torch_version": torch.__version__,
        "optimize_loss.lightning_version": pl.__version__,
        "optimize_loss.mlflow_version": tags["optimize_loss.mlflow_version"],
        "optimize_loss.python_version": tags["optimize_loss.python_version"],
    }
    document = config_json(mlflow_logger, tmp_path)
    assert {key: run_info.format_value(value) for key, value in document["params"].items()} == params
    assert document["params"]["optimize_loss.gradient_multipliers"] == {"w1": 0.5}  # JSON values, not strings
    assert document["tags"]["optimize_loss.strategy"] == "SingleDeviceStrategy"


class UserHyperparameters(TinyRegression):
    def __init__(self, name: str = "mine", seed: int = 7, learning_rate: float = 0.1) -> None:
        super().__init__(learning_rate=learning_rate, seed=seed)
        self.save_hyperparameters()


def test_params_do_not_collide_with_the_modules_hyperparameters(mlflow_logger):
    fit(OptimizeLoss(clip_gradients=2.0, seed=11), mlflow_logger, UserHyperparameters())
    params = run_of(mlflow_logger).data.params
    assert (params["name"], params["seed"], params["learning_rate"]) == ("mine", "7", "0.1")
    assert (params["optimize_loss.name"], params["optimize_loss.seed"]) == ("OptimizeLoss", "11")
    assert (params["optimize_loss.clip_mode"], params["optimize_loss.clip_gradients"]) == ("global_norm", "2.0")


class ManyParameters(pl.LightningModule):
    """300 scalar parameters with long names: their multipliers make a param value beyond MLflow's cap."""

    def __init__(self) -> None:
        super().__init__()
        self.a_rather_long_parameter_list_name = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.tensor(float(i))) for i in range(300)]
        )

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return sum(p * x.mean() for p in self.a_rather_long_parameter_list_name) ** 2

    def configure_optimizers(self):
        return configure_optimizers(self, "SGD", 0.01)


def test_a_value_beyond_mlflows_cap_says_it_is_truncated_and_the_json_has_it_whole(mlflow_logger, tmp_path):
    multipliers = {f"a_rather_long_parameter_list_name.{i}": 0.5 for i in range(300)}
    fit(OptimizeLoss(gradient_multipliers=multipliers, summaries=["loss"]), mlflow_logger, ManyParameters(), steps=1)
    run = run_of(mlflow_logger)
    logged = run.data.params["optimize_loss.gradient_multipliers"]
    full = json.dumps(multipliers)
    assert len(full) > MAX_PARAM_VAL_LENGTH
    assert len(logged) == MAX_PARAM_VAL_LENGTH
    assert logged.endswith(f"... [truncated: {len(full)} characters; full value in optimize_loss/config.json]")
    assert full.startswith(logged[: logged.index(" ... [truncated")])
    assert run.data.tags["optimize_loss.truncated_params"] == "optimize_loss.gradient_multipliers"
    assert config_json(mlflow_logger, tmp_path)["params"]["optimize_loss.gradient_multipliers"] == multipliers


def test_a_second_fit_with_another_configuration_keeps_the_first_params_and_warns(mlflow_logger):
    fit(OptimizeLoss(clip_gradients=1.0, seed=1), mlflow_logger)
    with pytest.warns(UserWarning, match="already has params.*optimize_loss.clip_gradients"):
        fit(OptimizeLoss(clip_gradients=3.0, seed=1), mlflow_logger)
    assert run_of(mlflow_logger).data.params["optimize_loss.clip_gradients"] == "1.0"


def test_a_callback_with_another_name_has_its_own_param_prefix_and_artifact_folder(mlflow_logger, tmp_path):
    fit(OptimizeLoss(name="Head", seed=2), mlflow_logger)
    params = run_of(mlflow_logger).data.params
    assert params["optimize_loss.Head.name"] == "Head"
    assert "optimize_loss.name" not in params
    assert (
        config_json(mlflow_logger, tmp_path, "optimize_loss/Head/config.json")["params"]["optimize_loss.Head.seed"] == 2
    )


def test_several_optimizers_and_param_groups_are_numbered():
    first = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.ones(1))]}, {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.5}],
        lr=0.1,
        momentum=0.9,
    )
    second = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=0.01, betas=(0.8, 0.9))
    described = run_info.optimizer_configuration([(0, first), (1, second)], [], numbered=True)
    assert described["optimizer.0"] == "torch.optim.sgd.SGD"
    assert described["optimizer.0.param_groups.0.lr"] == 0.1
    assert described["optimizer.0.param_groups.1.lr"] == 0.5
    assert described["optimizer.0.param_groups.1.momentum"] == 0.9
    assert described["optimizer.1"] == "torch.optim.adam.Adam"
    assert described["optimizer.1.betas"] == [0.8, 0.9]
    assert described["optimizer.1.learning_rate_decay_fn"] is None
    assert not any(key.endswith(".params") for key in described)


def _module_level_clip(grads_and_vars):
    return grads_and_vars


class _NoRepr:
    def __call__(self, grads_and_vars):
        return grads_and_vars


def test_callables_are_described_without_memory_addresses():
    assert run_info.describe_callable(_module_level_clip) == "test_run_info._module_level_clip"
    assert run_info.describe_callable(_NoRepr()) == "test_run_info._NoRepr"
    partial = functools.partial(decay.polynomial_decay, 100, end_learning_rate=0.1)
    assert (
        run_info.describe_callable(partial) == "lightning_optloss.tf.decay.polynomial_decay(100, end_learning_rate=0.1)"
    )
    assert " at 0x" not in run_info.describe_callable(lambda pairs: pairs)
