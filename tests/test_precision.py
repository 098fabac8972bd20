"""Mixed precision on the CPU: OptimizeLoss sees unscaled gradients, and AMP's skipped steps count for nothing.

Lightning turns ``precision="16-mixed"`` into bf16 on a CPU; the float16 path with a GradScaler (the GPU's)
is built here with Lightning's own ``MixedPrecision`` plugin and torch's CPU ``GradScaler``.
"""

from __future__ import annotations

import functools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from support import LossScaledAt, TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OPTIMIZER_SUMMARIES, OptimizeLoss, adaptive_clipping_fn
from lightning_optloss.tf import decay


class Observe(pl.Callback):
    """Runs after OptimizeLoss: the gradient norm it left, the rate, and the steps the scaler skipped."""

    def __init__(self):
        self.norms, self.rates = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(
            float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()])))
        )
        self.rates.append(optimizer.param_groups[0]["lr"])


def fp16_with_scaler():
    # init_scale 2**8: no overflow from the scale itself, so only the forced batches are skipped.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


def test_amp_overflow_skips_leave_global_step_rate_and_adaptive_statistics_alone():
    schedule = functools.partial(decay.exponential_decay, decay_steps=1, decay_rate=0.5)
    clip = adaptive_clipping_fn(global_step=True)
    callback = OptimizeLoss(clip_gradients=clip)
    observe = Observe()
    model = LossScaledAt({2}, 1e30, optimizer="SGD", learning_rate=0.1, decay_fn=schedule)  # float16 overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no non-finite warning: skipping is the scaler's business
        warnings.filterwarnings("ignore", ".*(LeafSpec|does not have many workers|litlogger).*")
        trainer = make_trainer([callback, observe], max_steps=5, plugins=[fp16_with_scaler()])
        trainer.fit(model, regression_data(5))
    assert trainer.global_step == 5
    assert callback.global_step == 4  # the overflowed step is not counted
    assert not math.isfinite(observe.norms[2])
    # The rate of the step after the skipped one is the skipped step's: the decay follows the global step.
    assert observe.rates == pytest.approx([0.1, 0.05, 0.025, 0.025, 0.0125])
    assert math.isfinite(float(clip.mean)) and math.isfinite(float(clip.sq_mean))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_amp_gradients_reach_the_pipeline_unscaled():
    plain, scaled = Observe(), Observe()
    fit_kwargs = {"max_steps": 3}
    make_trainer([OptimizeLoss(), plain], **fit_kwargs).fit(TinyRegression(), regression_data(3))
    make_trainer([OptimizeLoss(), scaled], plugins=[fp16_with_scaler()], **fit_kwargs).fit(
        TinyRegression(), regression_data(3)
    )
    # float16 autocast changes the numbers a little; a scale of 2**8 left in them would change them 256-fold.
    assert scaled.norms == pytest.approx(plain.norms, rel=2e-2)


def test_bf16_mixed_runs_every_summary(mlflow_logger):
    callback = OptimizeLoss(clip_gradients=1.0, gradient_noise_scale=0.01, summaries=OPTIMIZER_SUMMARIES)
    trainer = make_trainer([callback], logger=mlflow_logger, max_steps=3, precision="bf16-mixed")
    trainer.fit(TinyRegression(), regression_data(3))
    assert callback.global_step == 3
    history = metric_history(mlflow_logger)
    assert all(
        value == pytest.approx(1.0, rel=1e-5)
        for value in history["OptimizeLoss/global_norm/clipped_gradient_norm"].values()
    )
    assert all(math.isfinite(value) for value in history["OptimizeLoss/loss"].values())
    assert set(history["OptimizeLoss/gradients/w1/std"]) == {0, 1, 2}
