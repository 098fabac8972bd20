"""The five beyond-TF tools in a real Trainer, their summaries read back from a real sqlite MLflow store.

The formulas are tested on plain tensors in test_agc.py, test_autoclip.py, test_noise_schedules.py,
test_warmup.py and test_clip_groups.py; DDP on 2 processes in test_distributed.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import TinyRegression, make_trainer, metric_history, regression_data
from test_callback import RecordBatches

from lightning_optloss import OptimizeLoss, agc_clipping_fn, annealed_noise_scale, autoclip_fn
from lightning_optloss.tf import decay


def fit(callback, steps=6, logger=False, model=None, **kwargs):
    model = model or TinyRegression()
    recorder = RecordBatches()
    make_trainer([callback, recorder], logger=logger, max_steps=steps, **kwargs).fit(model, regression_data(steps))
    return model, recorder


def test_agc_bounds_every_unit_and_logs_the_clipped_fraction(mlflow_logger):
    clip = agc_clipping_fn(clip_factor=0.05, exclude="b2")
    plain = RecordBatches()
    make_trainer([plain], max_steps=1).fit(TinyRegression(), regression_data(1))
    _, recorder = fit(OptimizeLoss(clip_gradients=clip), steps=1, logger=mlflow_logger)
    start = TinyRegression()
    grads = recorder.grads[0]
    for name in ("w1", "w2"):  # rows along dim 0 are the units
        limit = 0.05 * start.get_parameter(name).detach().norm(dim=1).clamp_min(1e-3)
        assert (grads[name].norm(dim=1) <= limit * (1 + 1e-5)).all()
    assert float(grads["b1"].norm()) <= 0.05 * max(float(start.b1.norm()), 1e-3) * (1 + 1e-5)
    torch.testing.assert_close(grads["b2"], plain.grads[0]["b2"])  # excluded
    fraction = metric_history(mlflow_logger)["OptimizeLoss/clip/agc_clipped_fraction"][0]
    assert 0.0 < fraction <= 1.0


def test_autoclip_clips_at_the_percentile_of_the_norm_history_and_checkpoints_it(mlflow_logger, tmp_path):
    clip = autoclip_fn(percentile=25, history=100)
    callback = OptimizeLoss(clip_gradients=clip)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer([callback, checkpoint], logger=mlflow_logger, max_steps=6, enable_checkpointing=True)
    trainer.fit(TinyRegression(), regression_data(6))
    history = metric_history(mlflow_logger)
    norms = [history["OptimizeLoss/global_norm/gradient_norm"][step] for step in range(6)]
    for step in range(6):
        threshold = history["OptimizeLoss/global_norm/autoclip_threshold"][step]
        assert threshold == pytest.approx(np.percentile(norms[: step + 1], 25), rel=1e-5)
        clipped = history["OptimizeLoss/global_norm/clipped_gradient_norm"][step]
        assert clipped == pytest.approx(min(norms[step], threshold), rel=1e-5)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    assert int(state["clip_gradients"]["count"]) == 6


def test_annealed_noise_follows_its_schedule(mlflow_logger):
    schedule = annealed_noise_scale(eta=0.3)
    fit(OptimizeLoss(gradient_noise_scale=schedule, seed=2), steps=4, logger=mlflow_logger)
    logged = metric_history(mlflow_logger)["OptimizeLoss/gradient_noise_scale"]
    assert logged == pytest.approx({t: math.sqrt(0.3 / (1 + t) ** 0.55) for t in range(4)}, rel=1e-6)


def test_warmup_cosine_rate_reaches_the_optimizer(mlflow_logger):
    schedule = functools.partial(decay.warmup_cosine_decay, warmup_steps=3, decay_steps=4)
    fit(OptimizeLoss(), steps=8, logger=mlflow_logger, model=TinyRegression("SGD", 0.3, schedule))
    rates = metric_history(mlflow_logger)["OptimizeLoss/learning_rate"]
    assert rates == pytest.approx({step: schedule(0.3, step) for step in range(8)}, rel=1e-6)
    assert rates[0] == 0.0 and rates[3] == pytest.approx(0.3, rel=1e-6)


def test_per_group_clipping_clips_each_group_by_its_own_norm(mlflow_logger):
    _, recorder = fit(OptimizeLoss(clip_gradients={"w*": 0.5, "b1": 0.01}), steps=2, logger=mlflow_logger)
    for grads in recorder.grads:
        weights = math.sqrt(float(grads["w1"].norm()) ** 2 + float(grads["w2"].norm()) ** 2)
        assert weights <= 0.5 * (1 + 1e-5)
        assert float(grads["b1"].norm()) <= 0.01 * (1 + 1e-5)
    history = metric_history(mlflow_logger)
    assert history["OptimizeLoss/global_norm/w_/clipped_gradient_norm"][0] == pytest.approx(0.5, rel=1e-5)
    assert history["OptimizeLoss/global_norm/b1/clipped_gradient_norm"][0] == pytest.approx(0.01, rel=1e-5)
    assert history["OptimizeLoss/global_norm/w_/gradient_norm"][0] > 0.5
