"""OptimizeLoss in a real Trainer, its summaries read back from a real sqlite MLflow store."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from mlflow import MlflowClient
from support import LossScaledAt, TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import OPTIMIZER_SUMMARIES, OptimizeLoss, adaptive_clipping_fn, add_transfer_hook
from lightning_optloss.tf import decay

ALL_PARAMS = ["w1", "b1", "w2", "b2"]


class RecordBatches(pl.Callback):
    """Records each batch's loss as Lightning saw it and the weights after each optimizer step."""

    def __init__(self):
        self.losses: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def fit(callbacks, steps=6, logger=False, model=None, **trainer_kwargs):
    model = model or TinyRegression()
    trainer = make_trainer(callbacks, logger=logger, max_steps=steps, **trainer_kwargs)
    trainer.fit(model, regression_data(steps * trainer_kwargs.get("accumulate_grad_batches", 1)))
    return model, trainer


def test_default_summaries_reach_mlflow_every_log_every_n_steps(mlflow_logger):
    callback = OptimizeLoss()
    fit([callback], steps=7, logger=mlflow_logger, log_every_n_steps=3)
    history = metric_history(mlflow_logger)
    tags = {k for k in history if k.startswith("OptimizeLoss/")}
    assert tags == {"OptimizeLoss/loss", "OptimizeLoss/learning_rate", "OptimizeLoss/global_norm/gradient_norm"}
    for tag in tags:
        assert sorted(history[tag]) == [0, 3, 6]
    assert callback.global_step == 7


def test_all_summaries_with_float_clipping_use_tf_tag_names(mlflow_logger):
    fit([OptimizeLoss(clip_gradients=1.0, summaries=OPTIMIZER_SUMMARIES)], steps=2, logger=mlflow_logger)
    history = metric_history(mlflow_logger)
    expected = {
        "OptimizeLoss/loss",
        "OptimizeLoss/learning_rate",
        "OptimizeLoss/global_norm/gradient_norm",
        "OptimizeLoss/global_norm/clipped_gradient_norm",
        "OptimizeLoss/clip/ratio",  # beyond TF: the clip activity, with any clipping
        "OptimizeLoss/clip/active",
        *(f"OptimizeLoss/gradient_norm/{p}" for p in ALL_PARAMS),
        *(f"OptimizeLoss/gradients/{p}/{s}" for p in ALL_PARAMS for s in ("mean", "std", "min", "max", "norm")),
    }
    assert {k for k in history if k.startswith("OptimizeLoss/")} == expected
    assert history["OptimizeLoss/global_norm/gradient_norm"][0] > 1.0
    assert history["OptimizeLoss/global_norm/clipped_gradient_norm"][0] == pytest.approx(1.0, rel=1e-5)


def test_summary_values_are_those_of_the_step(mlflow_logger):
    recorder = RecordBatches()
    fit([OptimizeLoss(clip_gradients=1.0, summaries=OPTIMIZER_SUMMARIES), recorder], steps=3, logger=mlflow_logger)
    history = metric_history(mlflow_logger)
    for step in range(3):
        assert history["OptimizeLoss/loss"][step] == pytest.approx(recorder.losses[step], rel=1e-6)
        clipped = recorder.grads[step]  # the recorder runs after OptimizeLoss: it sees clipped gradients
        for name in ALL_PARAMS:
            grad = clipped[name]
            assert history[f"OptimizeLoss/gradient_norm/{name}"][step] == pytest.approx(float(grad.norm()), rel=1e-5)
            assert history[f"OptimizeLoss/gradients/{name}/max"][step] == pytest.approx(float(grad.max()), rel=1e-5)
            assert history[f"OptimizeLoss/gradients/{name}/mean"][step] == pytest.approx(
                float(grad.mean()), rel=1e-4, abs=1e-7
            )
        total = math.sqrt(sum(float(g.norm()) ** 2 for g in clipped.values()))
        assert history["OptimizeLoss/global_norm/clipped_gradient_norm"][step] == pytest.approx(total, rel=1e-5)


def test_loss_with_gradient_accumulation_is_the_mean_of_the_micro_batches(mlflow_logger):
    recorder = RecordBatches()
    callback = OptimizeLoss()
    fit([callback, recorder], steps=3, logger=mlflow_logger, accumulate_grad_batches=2)
    history = metric_history(mlflow_logger)
    assert callback.global_step == 3
    assert len(recorder.grads) == 3  # the pipeline ran once per optimizer step, not per micro-batch
    for step in range(3):
        # Lightning reports each micro-batch's loss already divided by accumulate_grad_batches.
        expected = recorder.losses[2 * step] + recorder.losses[2 * step + 1]
        assert history["OptimizeLoss/loss"][step] == pytest.approx(expected, rel=1e-6)


def test_every_logger_gets_the_summaries_mlflow_first(mlflow_logger, tmp_path):
    csv_logger = CSVLogger(tmp_path)
    fit([OptimizeLoss()], steps=2, logger=[csv_logger, mlflow_logger])
    assert set(metric_history(mlflow_logger)) >= {"OptimizeLoss/loss"}
    csv_logger.finalize("success")
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "OptimizeLoss/global_norm/gradient_norm" in text


def test_learning_rate_follows_the_decay_fn_of_the_global_step(mlflow_logger):
    schedule = functools.partial(decay.exponential_decay, decay_steps=2, decay_rate=0.5)
    fit([OptimizeLoss()], steps=5, logger=mlflow_logger, model=TinyRegression("SGD", 0.1, schedule))
    rates = metric_history(mlflow_logger)["OptimizeLoss/learning_rate"]
    assert rates == pytest.approx({step: 0.1 * 0.5 ** (step / 2) for step in range(5)}, rel=1e-6)


def test_without_increment_the_global_step_and_the_decayed_rate_stay(mlflow_logger):
    schedule = functools.partial(decay.exponential_decay, decay_steps=2, decay_rate=0.5)
    callback = OptimizeLoss(increment_global_step=False)
    fit([callback], steps=4, logger=mlflow_logger, model=TinyRegression("SGD", 0.1, schedule))
    assert callback.global_step == 0
    # As TF: every update is summarised at global step 0, with the step-0 rate.
    client = MlflowClient(mlflow_logger._tracking_uri)
    rates = client.get_metric_history(mlflow_logger.run_id, "OptimizeLoss/learning_rate")
    assert [metric.step for metric in rates] == [0, 0, 0, 0]
    assert {metric.value for metric in rates} == {decay.exponential_decay(0.1, 0, decay_steps=2, decay_rate=0.5)}


def test_update_ops_run_after_every_optimizer_step():
    seen = []
    model = TinyRegression()
    callback = OptimizeLoss(update_ops=[lambda: seen.append(model.b2.detach().clone())])
    fit([callback], steps=4, model=model)
    assert len(seen) == 4
    assert torch.equal(seen[-1], model.b2.detach())  # after the update, not before


def test_multipliers_scale_the_update_linearly():
    plain = RecordBatches()
    fit([plain], steps=1)
    scaled_model, _ = fit([OptimizeLoss(gradient_multipliers={"w2": 3.0, "b1": 0.0})], steps=1)
    start = TinyRegression()
    lr = 0.1
    torch.testing.assert_close(scaled_model.w2.detach(), start.w2.detach() - lr * 3.0 * plain.grads[0]["w2"])
    torch.testing.assert_close(scaled_model.b1.detach(), start.b1.detach())
    torch.testing.assert_close(scaled_model.w1.detach(), plain.weights[0]["w1"])


def test_multipliers_accept_parameter_objects():
    model = TinyRegression()
    fit([OptimizeLoss(gradient_multipliers={model.w1: 0.0})], steps=2, model=model)
    torch.testing.assert_close(model.w1.detach(), TinyRegression().w1.detach())


def test_variables_restrict_processing_and_summaries(mlflow_logger):
    recorder = RecordBatches()
    plain = RecordBatches()
    fit([plain], steps=1)
    fit(
        [OptimizeLoss(variables=["w2"], clip_gradients=0.01, summaries=["gradient_norm"]), recorder],
        steps=1,
        logger=mlflow_logger,
    )
    grads = recorder.grads[0]
    assert float(grads["w2"].norm()) == pytest.approx(0.01, rel=1e-5)
    torch.testing.assert_close(grads["w1"], plain.grads[0]["w1"])
    tags = {k for k in metric_history(mlflow_logger) if k.startswith("OptimizeLoss/")}
    assert tags == {
        "OptimizeLoss/gradient_norm/w2",
        "OptimizeLoss/global_norm/gradient_norm",
        "OptimizeLoss/global_norm/clipped_gradient_norm",
        "OptimizeLoss/clip/ratio",
        "OptimizeLoss/clip/active",
    }


def test_noise_is_reproducible_from_the_seed_and_differs_between_seeds():
    runs = [fit([OptimizeLoss(gradient_noise_scale=0.5, seed=seed)], steps=3)[0] for seed in (1, 1, 2)]
    assert torch.equal(runs[0].w1, runs[1].w1)
    assert not torch.equal(runs[0].w1, runs[2].w1)


def test_noise_has_the_truncated_normal_scale():
    plain = RecordBatches()
    fit([plain], steps=1)
    noisy = RecordBatches()
    fit([OptimizeLoss(gradient_noise_scale=0.1, seed=0), noisy], steps=1)
    noise = torch.cat([(noisy.grads[0][n] - plain.grads[0][n]).reshape(-1) for n in ALL_PARAMS])
    assert float(noise.abs().max()) <= 0.2 + 1e-6
    assert float(noise.std()) == pytest.approx(0.088, rel=0.35)  # only 71 numbers


def test_unseeded_noise_draws_a_seed_and_saves_it():
    callback = OptimizeLoss(gradient_noise_scale=0.1)
    first, _ = fit([callback], steps=2)
    seed = callback.state_dict()["seed"]
    assert isinstance(seed, int)
    again, _ = fit([OptimizeLoss(gradient_noise_scale=0.1, seed=seed)], steps=2)
    assert torch.equal(first.w1, again.w1)


def test_clip_callable_receives_global_step_and_global_norm():
    calls = []

    def clip(grads_and_vars, global_step, global_norm):
        calls.append((global_step, float(global_norm)))
        return [(g * 0.5, v) for g, v in grads_and_vars]

    recorder = RecordBatches()
    plain = RecordBatches()
    fit([plain], steps=1)
    fit([OptimizeLoss(clip_gradients=clip), recorder], steps=3)
    assert [step for step, _ in calls] == [0, 1, 2]
    expected_norm = math.sqrt(sum(float(g.norm()) ** 2 for g in plain.grads[0].values()))
    assert calls[0][1] == pytest.approx(expected_norm, rel=1e-5)
    torch.testing.assert_close(recorder.grads[0]["w1"], plain.grads[0]["w1"] * 0.5)


def test_tf_style_clip_callable_without_keywords_works():
    # fn(grads_and_vars) with no keyword: called alone, and the new gradients it returns are the ones applied.
    plain = RecordBatches()
    fit([plain], steps=1)
    clamped, _ = fit([OptimizeLoss(clip_gradients=lambda pairs: [(g.clamp(-0.1, 0.1), v) for g, v in pairs])], steps=1)
    start = TinyRegression()
    lr = 0.1
    assert any(float(grad.abs().max()) > 0.1 for grad in plain.grads[0].values())  # the clamp does something
    for name in ALL_PARAMS:
        expected = getattr(start, name).detach() - lr * plain.grads[0][name].clamp(-0.1, 0.1)
        torch.testing.assert_close(getattr(clamped, name).detach(), expected)


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        (lambda pairs: pairs[:1], "must return a list of 4"),
        (lambda pairs: None, "must return a list of 4"),
        (lambda pairs: [(g, g) for g, _ in pairs], "same parameter"),
        (lambda pairs: [(g.reshape(-1), v) for g, v in pairs], "shape"),
        (lambda pairs: [(None, v) for _, v in pairs], "shape"),
    ],
    ids=["too-few", "none", "wrong-param", "wrong-shape", "none-grad"],
)
def test_clip_callable_returning_the_wrong_structure_is_named_at_the_first_step(clip, message):
    with pytest.raises(ValueError, match=message) as error:
        fit([OptimizeLoss(clip_gradients=clip)], steps=1)
    assert "<lambda>" in str(error.value)


def test_adaptive_clipping_with_step_and_summary(mlflow_logger):
    clip = adaptive_clipping_fn(global_step=True, report_summary=True)
    fit([OptimizeLoss(clip_gradients=clip)], steps=5, logger=mlflow_logger)
    history = metric_history(mlflow_logger)
    assert sorted(history["OptimizeLoss/global_norm/adaptive_max_gradient_norm"]) == list(range(5))
    assert float(clip.mean) != 0.0


def test_transfers_to_host_happen_once_per_logged_step_only(mlflow_logger):
    transfers = []
    handle = add_transfer_hook(transfers.append)
    try:
        callback = OptimizeLoss(clip_gradients=1.0, gradient_noise_scale=0.01, summaries=OPTIMIZER_SUMMARIES)
        fit([callback], steps=10, logger=mlflow_logger, log_every_n_steps=5)
        logged = len(transfers)
        fit([OptimizeLoss(clip_gradients=1.0, summaries=OPTIMIZER_SUMMARIES)], steps=4)  # no logger at all
    finally:
        handle.remove()
    # Steps 0 and 5, then one at the end of fit for the non-finite check of the steps since the last log.
    assert logged == 3
    assert len(transfers) == 4


def _fit_resumable(tmp_path, steps, ckpt_path=None, checkpoint=False):
    schedule = functools.partial(decay.exponential_decay, decay_steps=2, decay_rate=0.7)
    model = TinyRegression("Adam", 0.05, schedule)
    callback = OptimizeLoss(
        gradient_noise_scale=0.05,
        gradient_multipliers={"w1": 0.5},
        clip_gradients=adaptive_clipping_fn(global_step=True),
        seed=5,
    )
    callbacks = [callback]
    if checkpoint:
        # Saved at the last batch of the first epoch: the boundary Lightning resumes exactly (a mid-epoch
        # checkpoint of a plain DataLoader replays batches, Lightning issue #19815).
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4))
    trainer = make_trainer(callbacks, max_steps=steps, enable_checkpointing=checkpoint)
    trainer.fit(model, regression_data(4), ckpt_path=ckpt_path)  # 4 batches an epoch
    return model, callback


def test_resume_from_a_checkpoint_continues_bit_identically(tmp_path):
    uninterrupted, full_callback = _fit_resumable(tmp_path / "a", steps=8)
    _fit_resumable(tmp_path / "b", steps=4, checkpoint=True)  # stops after the first epoch
    checkpoint = next((tmp_path / "b").glob("*.ckpt"))
    resumed, resumed_callback = _fit_resumable(tmp_path / "c", steps=8, ckpt_path=checkpoint)
    assert resumed_callback.global_step == full_callback.global_step == 8
    for name, param in uninterrupted.named_parameters():
        assert torch.equal(param, dict(resumed.named_parameters())[name]), name
    assert torch.equal(resumed_callback.clip_gradients.mean, full_callback.clip_gradients.mean)


def test_nonfinite_gradients_warn_by_default_naming_the_step_and_parameters(mlflow_logger):
    callback = OptimizeLoss()
    # Once the weights are NaN every later gradient is too: four steps, the first at global step 2.
    with pytest.warns(UserWarning, match=r"in 4 optimizer step\(s\), the first at global step 2 in 'w1', 'b1'"):
        model, _ = fit(
            [callback], steps=6, model=LossScaledAt({2, 3}, math.inf), logger=mlflow_logger, log_every_n_steps=5
        )
    assert callback.global_step == 6  # TF's behaviour: the updates were applied
    assert not torch.isfinite(model.w1).all()


def test_nonfinite_warning_without_logger_comes_at_the_end_of_fit():
    with pytest.warns(UserWarning, match="'w1', 'b1', 'w2', 'b2'"):
        fit([OptimizeLoss()], steps=3, model=LossScaledAt({1}, math.inf))


def test_nonfinite_gradients_skip_the_step_and_keep_the_global_step():
    schedule = functools.partial(decay.exponential_decay, decay_steps=1, decay_rate=0.5)
    skipping = OptimizeLoss(on_nonfinite="skip", clip_gradients=adaptive_clipping_fn(global_step=True))
    with pytest.warns(UserWarning, match="skipped the optimizer step at global step 2"):
        skipped, trainer = fit(
            [skipping], steps=5, model=LossScaledAt({2}, math.inf, optimizer="SGD", decay_fn=schedule)
        )
    assert trainer.global_step == 5 and skipping.global_step == 4
    assert all(torch.isfinite(p).all() for p in skipped.parameters())
    assert math.isfinite(float(skipping.clip_gradients.mean))
    # The skipped batch changed nothing: same weights as a run that never saw it, at the same rates.
    clean = OptimizeLoss(clip_gradients=adaptive_clipping_fn(global_step=True))
    dataset = regression_data(5).dataset
    kept = torch.utils.data.Subset(dataset, [i for i in range(len(dataset)) if not 16 <= i < 24])  # not batch 2
    reference = TinyRegression("SGD", 0.1, schedule)
    make_trainer([clean], max_steps=4).fit(reference, torch.utils.data.DataLoader(kept, batch_size=8))
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(skipped.named_parameters())[name])


def test_nonfinite_gradients_raise_when_asked():
    with pytest.raises(FloatingPointError, match="non-finite gradients at global step 1"):
        fit([OptimizeLoss(on_nonfinite="raise")], steps=3, model=LossScaledAt({1}, math.inf))


def test_noise_scale_can_follow_the_global_step():
    scales = []

    def schedule(step):
        scales.append(step)
        return 0.0 if step % 2 else 0.3

    plain = RecordBatches()
    fit([plain], steps=2)
    noisy = RecordBatches()
    fit([OptimizeLoss(gradient_noise_scale=schedule, seed=1), noisy], steps=2)
    assert scales == [0, 1]
    assert not torch.equal(noisy.grads[0]["w1"], plain.grads[0]["w1"])
    # Step 1 has no noise, but its gradients differ because step 0's noise moved the weights.
    with pytest.raises(ValueError, match="returned -1 at global step 0"):
        fit([OptimizeLoss(gradient_noise_scale=lambda step: -1)], steps=1)


class TwoOptimizers(TinyRegression):
    """Manual optimization with one optimizer for the first layer and one for the second."""

    def __init__(self, raw: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.raw = raw
        self.callbacks: list[OptimizeLoss] = []

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers(use_pl_optimizer=not self.raw)
        x, y = batch
        loss = torch.mean((self(x) - y) ** 2)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        for optimizer in (first, second):
            if self.raw:
                for callback in self.callbacks:
                    callback.apply(optimizer)
            optimizer.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD([self.w1, self.b1], lr=0.1), torch.optim.SGD([self.w2, self.b2], lr=0.1)]


@pytest.mark.parametrize("raw", [False, True], ids=["lightning-optimizers", "raw-optimizers-with-apply"])
def test_several_optimizers_share_one_global_step_per_batch(raw, mlflow_logger):
    first = OptimizeLoss(variables=["w1", "b1"], name="First", clip_gradients=0.5, increment_global_step=False)
    second = OptimizeLoss(variables=["w2", "b2"], name="Second", clip_gradients=0.5)
    model = TwoOptimizers(raw=raw)
    model.callbacks = [first, second]
    # Lightning's max_steps counts every optimizer step, and none of a raw optimizer's: bound by epochs.
    make_trainer([first, second], logger=mlflow_logger, max_epochs=1).fit(model, regression_data(3))
    assert first.global_step == second.global_step == 3
    history = metric_history(mlflow_logger)
    assert sorted(history["First/global_norm/clipped_gradient_norm"]) == [0, 1, 2]
    assert history["Second/global_norm/clipped_gradient_norm"][0] == pytest.approx(0.5, rel=1e-5)
    assert history["First/loss"][1] == pytest.approx(history["Second/loss"][1])


def test_callback_pickles_without_its_run_state():
    import pickle

    callback = OptimizeLoss(gradient_noise_scale=0.1, clip_gradients=adaptive_clipping_fn(), seed=3)
    fit([callback], steps=2)
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.global_step == 2 and clone.seed == 3
    assert clone._fit.pipeline is None and clone._fit.hooks == []
    torch.testing.assert_close(clone.clip_gradients.mean, callback.clip_gradients.mean)
