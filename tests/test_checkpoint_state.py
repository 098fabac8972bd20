"""Restoring OptimizeLoss from a checkpoint says what it restored; callables that do not pickle are named.

Real fits and real checkpoints (ModelCheckpoint, ``Trainer.fit(ckpt_path=...)``); real pickling, as spawn-based
strategies do it (``multiprocessing``'s spawn context, and ``Trainer(strategy="ddp_spawn")``).
"""

from __future__ import annotations

import copy
import functools
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import TinyRegression, make_trainer, regression_data

from lightning_optloss import OptimizeLoss, adaptive_clipping_fn, autoclip_fn
from lightning_optloss.tf import decay
from lightning_optloss.tf.configure import LearningRateDecay


def saved_checkpoint(tmp_path: Path, callback: OptimizeLoss, steps: int = 4) -> Path:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=steps)
    trainer = make_trainer([callback, checkpoints], max_steps=steps, enable_checkpointing=True)
    trainer.fit(TinyRegression(), regression_data(steps))
    return next(tmp_path.glob("*.ckpt"))


def resume(checkpoint: Path, callback: OptimizeLoss, steps: int = 6) -> None:
    trainer = make_trainer([callback], max_steps=steps)
    trainer.fit(TinyRegression(), regression_data(steps), ckpt_path=checkpoint)


def test_a_checkpoint_without_this_callbacks_state_warns_naming_the_states_it_holds(tmp_path):
    checkpoint = saved_checkpoint(tmp_path, OptimizeLoss(name="first", seed=3))
    renamed = OptimizeLoss(name="second", seed=3)
    with pytest.warns(RuntimeWarning, match="has no state for this callback") as caught:
        resume(checkpoint, renamed)
    (message,) = [str(w.message) for w in caught if "has no state" in str(w.message)]
    assert "OptimizeLoss{'name': 'first'}" in message and "OptimizeLoss{'name': 'second'}" in message
    assert "the global step (and with it the learning-rate decay), the noise seed and the clipping" in message
    assert renamed.global_step == 2  # started fresh: the 2 steps after the checkpoint's 4, counted from 0


def test_a_resume_with_this_callbacks_state_does_not_warn(tmp_path, recwarn):
    checkpoint = saved_checkpoint(tmp_path, OptimizeLoss(name="same"))
    callback = OptimizeLoss(name="same")
    resume(checkpoint, callback)
    assert callback.global_step == 6
    assert not [w for w in recwarn.list if "has no state" in str(w.message)]


def test_changing_adaptive_clipping_to_autoclip_is_a_value_error_naming_both_kinds(tmp_path):
    checkpoint = saved_checkpoint(tmp_path, OptimizeLoss(clip_gradients=adaptive_clipping_fn()))
    with pytest.raises(ValueError, match="statistics of AdaptiveClipping, but clip_gradients is now AutoClipping"):
        resume(checkpoint, OptimizeLoss(clip_gradients=autoclip_fn()))


def test_changing_adaptive_clipping_to_a_float_does_not_drop_the_statistics_silently(tmp_path):
    checkpoint = saved_checkpoint(tmp_path, OptimizeLoss(clip_gradients=adaptive_clipping_fn()))
    with pytest.raises(
        ValueError, match=r"AdaptiveClipping, but clip_gradients is now a float .*pop\('clip_gradients'\)"
    ):
        resume(checkpoint, OptimizeLoss(clip_gradients=1.0))


def test_a_checkpoint_saved_before_clip_kind_was_recorded_is_recognised_by_its_keys(tmp_path):
    checkpoint = saved_checkpoint(tmp_path, OptimizeLoss(clip_gradients=autoclip_fn(history=50)))
    content = torch.load(checkpoint, weights_only=False)
    (state,) = [value for key, value in content["callbacks"].items() if key.startswith("OptimizeLoss")]
    del state["clip_kind"]
    torch.save(content, checkpoint)
    with pytest.raises(ValueError, match="statistics of AutoClipping, but clip_gradients is now AdaptiveClipping"):
        resume(checkpoint, OptimizeLoss(clip_gradients=adaptive_clipping_fn()))
    resumed = OptimizeLoss(clip_gradients=autoclip_fn(history=50))
    resume(checkpoint, resumed)
    assert int(resumed.clip_gradients.count) == 6


def test_a_lambda_clip_function_fails_to_pickle_naming_the_argument_and_the_fix():
    callback = OptimizeLoss(clip_gradients=lambda pairs: None)
    with pytest.raises(TypeError, match=r"OptimizeLoss: `clip_gradients` does not pickle .*functools.partial"):
        pickle.dumps(callback)
    assert copy.deepcopy(callback).clip_gradients is not None  # copies are not pickles: unaffected
    picklable = OptimizeLoss(clip_gradients=autoclip_fn())
    assert type(pickle.loads(pickle.dumps(picklable)).clip_gradients).__name__ == "AutoClipping"


def _receive(value: Any) -> None:
    pass


def test_a_spawned_process_gets_the_clear_error_for_a_local_decay_function():
    def local_decay(rate: float, step: int) -> float:
        return rate

    scheduler = LearningRateDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), local_decay)
    process = multiprocessing.get_context("spawn").Process(target=_receive, args=(scheduler,))
    with pytest.raises(TypeError, match="LearningRateDecay: `decay_fn` does not pickle"):
        process.start()
    schedule = functools.partial(decay.exponential_decay, decay_steps=2, decay_rate=0.5)
    restored = pickle.loads(pickle.dumps(LearningRateDecay(scheduler.optimizer, schedule)))
    assert restored.decay_fn(1.0, 2) == pytest.approx(0.5)


def test_ddp_spawn_with_a_lambda_clip_names_the_argument_before_any_worker_starts(tmp_path):
    trainer = make_trainer(
        [OptimizeLoss(update_ops=[lambda: None])], max_steps=1, strategy="ddp_spawn", default_root_dir=tmp_path
    )
    with pytest.raises(TypeError, match="OptimizeLoss: `update_ops` does not pickle"):
        trainer.fit(TinyRegression(), regression_data(1))
