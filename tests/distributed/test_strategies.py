"""What each strategy refuses or warns about at ``setup``, on real Trainers (built, not fitted)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import FSDPStrategy

from lightning_optloss import agc_clipping_fn, callback_arguments
from lightning_optloss.distributed import strategies

sys.path.insert(0, str(Path(__file__).parent))


def _trainer(strategy, **kwargs) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False, **kwargs}
    return pl.Trainer(strategy=strategy, **options)


def _check(trainer: pl.Trainer, clip_gradients=None, on_nonfinite: str = "warn") -> None:
    access = strategies.gradient_access("OptimizeLoss", trainer.strategy)
    clip = callback_arguments.clip_transform(callback_arguments.check_clip(clip_gradients), [])
    access.check("OptimizeLoss", trainer, clip, on_nonfinite)


class CPUFSDPStrategy(FSDPStrategy):
    """Only its type matters here: Lightning refuses the plain FSDPStrategy without a GPU."""


def test_agc_is_refused_where_rows_are_split_across_processes():
    with pytest.raises(ValueError, match="clips rows of parameters, which CPUFSDPStrategy splits across processes"):
        _check(_trainer(CPUFSDPStrategy()), agc_clipping_fn())


@pytest.fixture
def deepspeed_strategy():
    pytest.importorskip("deepspeed")
    from cpu_deepspeed import CPUDeepSpeedStrategy

    return CPUDeepSpeedStrategy


def test_deepspeed_zero3_refuses_agc_and_zero2_takes_it(deepspeed_strategy):
    with pytest.raises(ValueError, match="clips rows of parameters, which CPUDeepSpeedStrategy splits"):
        _check(_trainer(deepspeed_strategy(stage=3)), agc_clipping_fn())
    _check(_trainer(deepspeed_strategy(stage=2)), agc_clipping_fn())


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_deepspeed_refuses_its_own_fp16_loss_scaling(deepspeed_strategy, precision):
    with pytest.raises(ValueError, match=f"DeepSpeed with precision='{precision}' keeps the gradients multiplied"):
        _check(_trainer(deepspeed_strategy(stage=2), precision=precision), 1.0)
    _check(_trainer(deepspeed_strategy(stage=2), precision="bf16-mixed"), 1.0)


def test_deepspeed_refuses_skipping_steps(deepspeed_strategy):
    with pytest.raises(ValueError, match="on_nonfinite='skip' cannot skip DeepSpeed's step"):
        _check(_trainer(deepspeed_strategy(stage=1)), on_nonfinite="skip")
    _check(_trainer(deepspeed_strategy(stage=1)), on_nonfinite="raise")


def test_deepspeed_refuses_clipping_twice(deepspeed_strategy):
    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ValueError, match=r"DeepSpeed's gradient_clipping=0\.5 would clip twice"):
        _check(_trainer(deepspeed_strategy(config=config)), 1.0)
    _check(_trainer(deepspeed_strategy(config=config)), None)


def test_deepspeed_with_accumulation_warns_of_the_double_division(deepspeed_strategy):
    with pytest.warns(UserWarning, match="DeepSpeed's backward divides it again"):
        _check(_trainer(deepspeed_strategy(stage=2), accumulate_grad_batches=4))
