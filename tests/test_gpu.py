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
