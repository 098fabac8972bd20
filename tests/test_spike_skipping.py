"""OptimizeLoss(skip_spikes=...) on real Trainers: corrupt batches are skipped (and only they), the global step
does not count them, the metrics and the tag in a real MLflow store say so, a resume is bit-identical, and a
lasting change of scale is let through after max_consecutive skips."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow import MlflowClient
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OptimizeLoss, spike_skipping_fn
from lightning_optloss.distributed import strategies

sys.path.insert(0, str(Path(__file__).parent / "distributed"))


class CorruptAt(TinyRegression):
    """TinyRegression whose batch at Lightning's optimizer steps ``steps`` is corrupt: the inputs times
    ``input_factor`` (a batch times 1e3) or the labels times ``label_factor`` (a flipped label scale).

    ``from_step``: every step from it on is scaled instead (a lasting change of scale)."""

    def __init__(self, steps=(), input_factor=1.0, label_factor=1.0, loss_factor=1.0, from_step=None, **kwargs):
        super().__init__(**kwargs)
        self.corrupt_steps = set(steps)
        self.input_factor, self.label_factor, self.loss_factor = input_factor, label_factor, loss_factor
        self.from_step = from_step
        self.losses: list[float] = []  # every micro-batch's loss, as training_step returned it

    def corrupt(self) -> bool:
        step = self.trainer.global_step
        return step in self.corrupt_steps or (self.from_step is not None and step >= self.from_step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.corrupt():
            x, y = x * self.input_factor, y * self.label_factor
        loss = torch.mean((self(x) - y) ** 2)
        loss = loss * self.loss_factor if self.corrupt() else loss
        self.losses.append(loss.item())
        return loss


class WeightsPerStep(Callback):
    """The module's weights after every batch (``moved[i]``: batch ``i`` changed some weight)."""

    def __init__(self) -> None:
        self.moved: list[bool] = []
        self.before: list[torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = list(pl_module.parameters())
        self.moved.append(any(not torch.equal(a, b) for a, b in zip(after, self.before, strict=True)))


def fit(model, callback, steps, logger=False, batches=None, **kwargs):
    weights = WeightsPerStep()
    trainer = make_trainer([callback, weights], logger=logger, max_steps=steps, **kwargs)
    trainer.fit(model, regression_data(batches or steps))
    return trainer, weights.moved


def tags_of(logger):
    return MlflowClient(logger._tracking_uri).get_run(logger.run_id).data.tags


def test_a_batch_with_labels_times_1e3_is_skipped_and_every_other_step_applied(mlflow_logger):
    callback = OptimizeLoss(skip_spikes=spike_skipping_fn(warmup_steps=10))
    model = CorruptAt(steps={15, 22}, label_factor=1e3, optimizer="Adam", learning_rate=0.01)
    with pytest.warns(UserWarning, match=r"skipped the optimizer step at global step 15 on a spike: global_norm \S+ >"):
        trainer, moved = fit(model, callback, 30, logger=mlflow_logger)
    assert [i for i, step_moved in enumerate(moved) if not step_moved] == [15, 22]
    assert trainer.global_step == 30 and callback.global_step == 28  # TF's global step skips them
    history = metric_history(mlflow_logger)
    assert sorted(history["OptimizeLoss/loss"]) == list(range(28))  # one record per applied update
    skipped = history["OptimizeLoss/spike/skipped"]
    assert [skipped[step] for step in (14, 15, 20, 21, 27)] == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert sorted(history["OptimizeLoss/spike/threshold"]) == list(range(10, 28))  # after the warm-up
    norms, thresholds = history["OptimizeLoss/global_norm/gradient_norm"], history["OptimizeLoss/spike/threshold"]
    assert all(norms[step] <= thresholds[step] for step in thresholds)
    assert tags_of(mlflow_logger)["OptimizeLoss/spike/skipped_steps"] == "15, 21"
    assert (
        "spike_skipping_fn(std_factor=6.0"
        in (
            MlflowClient(mlflow_logger._tracking_uri)
            .get_run(mlflow_logger.run_id)
            .data.params["optimize_loss.skip_spikes"]
        )
    )


def test_a_flipped_label_scale_is_skipped_on_the_loss():
    callback = OptimizeLoss(
        clip_gradients=1.0, skip_spikes=spike_skipping_fn(std_factor=4.0, warmup_steps=8, watch="loss")
    )
    model = CorruptAt(steps={12}, label_factor=-30.0)
    with pytest.warns(UserWarning, match=r"global step 12 on a spike: loss \S+ > threshold"):
        _, moved = fit(model, callback, 20)
    assert [i for i, step_moved in enumerate(moved) if not step_moved] == [12]
    assert callback.global_step == 19 and callback.skip_spikes.skipped_steps == [12]


def test_the_watched_loss_sums_the_micro_batches_of_an_accumulated_step():
    callback = OptimizeLoss(skip_spikes=spike_skipping_fn(warmup_steps=6, watch=("global_norm", "loss")))
    model = CorruptAt(steps={8}, loss_factor=1e3)  # Lightning's counter: the 9th update, batches 16 and 17
    with pytest.warns(UserWarning, match="global step 8 on a spike"):
        _, moved = fit(model, callback, 12, accumulate_grad_batches=2, batches=24)
    # Weights move at the second micro-batch of each update, except the corrupt update's (batches 16, 17).
    assert [i for i, step_moved in enumerate(moved) if step_moved] == [i for i in range(1, 24, 2) if i != 17]
    assert callback.global_step == 11 and callback.skip_spikes.skipped_steps == [8]
    # The judged loss is the update's: the mean of its two micro-batches (Lightning divides each by 2).
    assert callback.skip_spikes.last.values[1] == pytest.approx(sum(model.losses[-2:]) / 2, rel=1e-6)


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    def run(steps, resume=None, checkpoint=False):
        callback = OptimizeLoss(skip_spikes=spike_skipping_fn(std_factor=4.0, warmup_steps=4))
        model = CorruptAt(steps={6, 14}, label_factor=1e3, optimizer="Adam", learning_rate=0.01)
        extra = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)] if checkpoint else []
        trainer = make_trainer([callback, *extra], max_steps=steps, enable_checkpointing=checkpoint)
        trainer.fit(model, regression_data(10), ckpt_path=resume)
        return model, callback

    with pytest.warns(UserWarning, match="on a spike"):
        full_model, full = run(20)
        run(10, checkpoint=True)
        resumed_model, resumed = run(20, resume=str(next(tmp_path.glob("*.ckpt"))))
    for (name, value), theirs in zip(full_model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(theirs, value), name
    assert resumed.global_step == full.global_step == 18
    ours, theirs = resumed.state_dict()["skip_spikes"], full.state_dict()["skip_spikes"]
    assert theirs["skipped_steps"] == [6, 13] and ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(value)), key
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=True)  # plain state: weights-only loads it
    assert any("skip_spikes" in state for state in saved["callbacks"].values())


def test_max_consecutive_releases_a_lasting_change_of_scale(mlflow_logger):
    callback = OptimizeLoss(skip_spikes=spike_skipping_fn(warmup_steps=20, max_consecutive=3))
    model = CorruptAt(from_step=30, loss_factor=300.0, optimizer="SGD", learning_rate=1e-4)
    with pytest.warns(UserWarning) as caught:
        _, moved = fit(model, callback, 90, logger=mlflow_logger)
    skipped = [i for i, step_moved in enumerate(moved) if not step_moved]
    released = [str(w.message) for w in caught if "despite a spike" in str(w.message)]
    assert skipped[:3] == [30, 31, 32] and moved[33]  # three skipped, the fourth let through
    assert released and "the 3 steps before it were skipped (max_consecutive)" in released[0]
    runs = [len(list(group)) for step_moved, group in itertools.groupby(moved[30:]) if not step_moved]
    assert max(runs) == 3
    assert skipped[-1] < 60 and all(moved[skipped[-1] + 1 :])  # the statistics caught up with the new scale
    assert callback.global_step == 90 - len(skipped)
    steps = callback.skip_spikes.skipped_steps
    assert tags_of(mlflow_logger)["OptimizeLoss/spike/skipped_steps"] == ", ".join(map(str, steps))
    print(f"scale shift x300 at step 30: {len(skipped)} steps skipped, the last at step {skipped[-1]}")


def test_skip_spikes_must_come_from_spike_skipping_fn():
    with pytest.raises(
        ValueError, match=r"OptimizeLoss: `skip_spikes` must be None or spike_skipping_fn\(...\); got 6.0"
    ):
        OptimizeLoss(skip_spikes=6.0)


class ManualRegression(TinyRegression):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_watching_the_loss_is_refused_at_setup_in_manual_optimization():
    callback = OptimizeLoss(skip_spikes=spike_skipping_fn(watch="loss"))
    with pytest.raises(ValueError, match="watches the loss, which OptimizeLoss cannot tie to an optimizer step"):
        make_trainer([callback], max_steps=2).fit(ManualRegression(), regression_data(2))


def test_manual_optimization_skips_on_the_global_norm():
    callback = OptimizeLoss(skip_spikes=spike_skipping_fn(std_factor=4.0, warmup_steps=5))

    class CorruptManual(ManualRegression):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return super().training_step((x, y * 1e3) if batch_idx == 7 else (x, y), batch_idx)

    with pytest.warns(UserWarning, match="global step 7 on a spike"):
        _, moved = fit(CorruptManual(), callback, 10)
    assert [i for i, step_moved in enumerate(moved) if not step_moved] == [7]


def test_deepspeed_refuses_skip_spikes():
    pytest.importorskip("deepspeed")
    from cpu_deepspeed import CPUDeepSpeedStrategy

    trainer = make_trainer([], strategy=CPUDeepSpeedStrategy(stage=2))
    access = strategies.gradient_access("OptimizeLoss", trainer.strategy)
    with pytest.raises(ValueError, match="skip_spikes cannot skip DeepSpeed's step"):
        access.check("OptimizeLoss", trainer, None, "warn", skip_spikes=True)
    access.check("OptimizeLoss", trainer, None, "warn", skip_spikes=False)


def test_float16_amp_judges_the_unscaled_loss_and_skips_through_the_scaler():
    from test_precision import fp16_with_scaler  # a CPU GradScaler with the scale 2**8

    callback = OptimizeLoss(
        skip_spikes=spike_skipping_fn(std_factor=4.0, warmup_steps=5, watch=("global_norm", "loss"))
    )
    model = CorruptAt(steps={8}, label_factor=30.0)  # finite in float16: the scaler skips nothing itself
    with pytest.warns(UserWarning, match="global step 8 on a spike"):
        trainer, moved = fit(model, callback, 12, plugins=[fp16_with_scaler()])
    assert [i for i, step_moved in enumerate(moved) if not step_moved] == [8]
    assert trainer.global_step == 12 and callback.global_step == 11
    # The judged loss is the model's, not the model's times the scale 2**8 that on_before_backward receives.
    assert callback.skip_spikes.last.values[1] == pytest.approx(model.losses[-1], rel=1e-3)


def test_non_finite_steps_are_on_nonfinites_and_leave_the_spike_statistics_alone():
    callback = OptimizeLoss(on_nonfinite="skip", skip_spikes=spike_skipping_fn(warmup_steps=3))
    model = CorruptAt(steps={5}, loss_factor=float("inf"))
    with pytest.warns(UserWarning, match="global step 5: non-finite gradients in"):
        _, moved = fit(model, callback, 10)
    assert [i for i, step_moved in enumerate(moved) if not step_moved] == [5]
    assert callback.skip_spikes.count == 9 and callback.skip_spikes.skipped == 0  # judged 9 finite steps only
