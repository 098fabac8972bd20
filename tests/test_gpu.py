"""On a CUDA device (``pytest -m gpu`` on a GPU machine; skipped elsewhere): no host synchronisation on steps
that do not log, with every transform on, in a real Trainer (also the GPU's inverse-CDF noise).

``torch.cuda.set_sync_debug_mode("error")`` makes any device-to-host synchronisation raise; it is switched on
around OptimizeLoss's hook on the steps that do not log (Lightning's own loop may synchronise elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OPTIMIZER_SUMMARIES, OptimizeLoss, adaptive_clipping_fn, agc_clipping_fn, autoclip_fn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
EVERY = 5


class SyncCheckedOptimizeLoss(OptimizeLoss):
    """OptimizeLoss whose hook raises on any host synchronisation on the steps that do not log."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.global_step % EVERY == 0:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            return
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            torch.cuda.set_sync_debug_mode("default")


CLIPS = {
    "float": lambda: 1.0,
    "adaptive": lambda: adaptive_clipping_fn(global_step=True, report_summary=True),
    "agc": lambda: agc_clipping_fn(0.05),
    "autoclip": lambda: autoclip_fn(percentile=50),
    "groups": lambda: {"w*": 0.5, "b*": 0.1},
}


@pytest.mark.parametrize("clip", list(CLIPS))
def test_steps_that_do_not_log_never_synchronise_with_the_host(clip, mlflow_logger):
    callback = SyncCheckedOptimizeLoss(
        gradient_noise_scale=0.01,
        gradient_multipliers={"w1": 0.5},
        clip_gradients=CLIPS[clip](),
        summaries=OPTIMIZER_SUMMARIES,
    )
    trainer = make_trainer([callback], logger=mlflow_logger, accelerator="cuda", max_steps=12, log_every_n_steps=EVERY)
    trainer.fit(TinyRegression(), regression_data(12))
    assert callback.global_step == 12
    assert sorted(metric_history(mlflow_logger)["OptimizeLoss/loss"]) == [0, 5, 10]


def test_fp16_mixed_overflow_on_cuda_leaves_the_global_step_and_statistics_alone():
    from support import LossScaledAt

    clip = adaptive_clipping_fn(global_step=True)
    callback = OptimizeLoss(clip_gradients=clip)
    model = LossScaledAt({2}, 1e30, optimizer="SGD", learning_rate=0.1)  # float16 gradients overflow at batch 2
    trainer = make_trainer([callback], accelerator="cuda", precision="16-mixed", max_steps=5)
    trainer.fit(model, regression_data(5))
    assert trainer.global_step == 5
    assert callback.global_step == 4
    assert torch.isfinite(clip.mean) and torch.isfinite(clip.sq_mean)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _one_gpu_strategy(name: str):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if name == "fsdp1":
        return FSDPStrategy()
    return DeepSpeedStrategy(stage=int(name[-1]))


@pytest.mark.parametrize("strategy", ["fsdp1", "deepspeed2", "deepspeed3"])
def test_sharded_strategies_on_one_gpu_match_one_device(strategy, mlflow_logger):
    """On one GPU a sharded strategy holds everything, but gradients still come through its own accessors."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")

    def fit(trainer_strategy, logger=False):
        callback = OptimizeLoss(gradient_noise_scale=0.01, gradient_multipliers={"w1": 0.5}, clip_gradients=1.0, seed=3)
        model = TinyRegression("SGD", 0.1)
        trainer = make_trainer(
            [callback], logger=logger, accelerator="cuda", max_steps=6, strategy=trainer_strategy, precision="32-true"
        )
        trainer.fit(model, regression_data(6))
        return {name: param.detach().float().cpu() for name, param in model.named_parameters()}, callback

    reference, _ = fit("auto")
    weights, callback = fit(_one_gpu_strategy(strategy), mlflow_logger)
    assert callback.global_step == 6
    if strategy != "deepspeed3":  # ZeRO-3 leaves partitioned (empty) parameters in the module
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
    assert sorted(metric_history(mlflow_logger)["OptimizeLoss/global_norm/gradient_norm"]) == list(range(6))
