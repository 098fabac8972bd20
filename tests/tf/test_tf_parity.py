"""Replay the real TF/tf-slim reference runs through a real Trainer; read the summaries back from MLflow.

The fixtures come from ``tests/tf/reference/make_tf_reference.py`` (run by hand with tensorflow-cpu and tf-slim;
CI does not install TF). Every case trains the same tiny model on the same batches with the same initial
weights; weights after every step and every summary TF emitted must agree within rtol 1e-4.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from support import PARITY_WORST, make_trainer, metric_values, new_mlflow_logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optloss import OptimizeLoss, adaptive_clipping_fn, configure_optimizers
from lightning_optloss.common import tags
from lightning_optloss.tf import decay

FIXTURES = Path(__file__).parent / "reference" / "fixtures"
REFERENCE = json.loads((FIXTURES / "optimize_loss.json").read_text())
CASES = REFERENCE["cases"]
RTOL = 1e-4
ATOL = 1e-6  # for values that pass through zero (means of gradients, tiny weights)


class ReferenceModel(pl.LightningModule):
    """The fixture's model: ``mean((tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2)``, float32."""

    def __init__(self, case: dict[str, Any]) -> None:
        super().__init__()
        for name, value in case["initial_params"].items():
            setattr(self, name, nn.Parameter(torch.tensor(value, dtype=torch.float32)))
        self.case = case

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.mean(torch.square(torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2 - y))

    def configure_optimizers(self) -> Any:
        schedule = self.case["learning_rate_decay"]
        decay_fn = schedule and functools.partial(getattr(decay, schedule["fn"]), **schedule["kwargs"])
        return configure_optimizers(
            self, self.case["optimizer"], self.case["learning_rate"], decay_fn, variables=self.case["variables"]
        )


class RecordWeights(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({n: p.detach().numpy().copy() for n, p in pl_module.named_parameters()})


def _callback(case: dict[str, Any]) -> OptimizeLoss:
    clip = case["clip_gradients"]
    if isinstance(clip, dict):
        options = dict(clip["adaptive"])
        options["global_step"] = True if options["global_step"] else None
        clip = adaptive_clipping_fn(**options)
    return OptimizeLoss(
        gradient_multipliers=case["gradient_multipliers"],
        clip_gradients=clip,
        variables=case["variables"],
        summaries=case["summaries"],
        increment_global_step=case["increment_global_step"],
    )


def _loader(case: dict[str, Any]) -> DataLoader:
    x = torch.tensor([batch["x"] for batch in case["batches"]], dtype=torch.float32).flatten(0, 1)
    y = torch.tensor([batch["y"] for batch in case["batches"]], dtype=torch.float32).flatten(0, 1)
    return DataLoader(TensorDataset(x, y), batch_size=len(case["batches"][0]["x"]), shuffle=False)


def _our_tag(tf_tag: str) -> str:
    """TF names variables ``w1:0`` and tags them ``w1_0``; ours are the parameter names.

    TF's learning-rate tag is ``OptimizeLoss/learning_rate_1`` (its scope already holds a variable named
    ``learning_rate``); the contract's tag is ``OptimizeLoss/learning_rate``.
    """
    if tf_tag.endswith("/learning_rate_1"):
        return tf_tag[: -len("_1")]
    for tf_name, name in REFERENCE["variable_names"].items():
        suffix = "/" + tf_name.replace(":", "_")
        if tf_tag.endswith(suffix):
            return tf_tag[: -len(suffix)] + "/" + name
    return tf_tag


def _expected_statistics(tag: str, histogram: dict[str, float]) -> dict[str, float]:
    """TF's histogram proto keeps min, max, num, sum, sum_squares: our statistics follow from them."""
    mean = histogram["sum"] / histogram["num"]
    variance = max(histogram["sum_squares"] / histogram["num"] - mean * mean, 0.0)
    return {
        f"{tag}/mean": mean,
        f"{tag}/std": math.sqrt(variance),
        f"{tag}/min": histogram["min"],
        f"{tag}/max": histogram["max"],
        f"{tag}/norm": math.sqrt(histogram["sum_squares"]),
    }


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    return float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), ATOL / RTOL)))


@pytest.fixture(scope="module")
def replayed(tracking_uri, tmp_path_factory):
    """Every case trained once; shared by the weight and summary checks."""
    results = {}
    for name, case in CASES.items():
        logger = new_mlflow_logger(tracking_uri, tmp_path_factory.mktemp(name))
        recorder = RecordWeights()
        callback = _callback(case)
        trainer = make_trainer([callback, recorder], logger=logger, max_steps=len(case["steps"]))
        trainer.fit(ReferenceModel(case), _loader(case))
        results[name] = (recorder.steps, metric_values(logger), callback)
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_weights_after_every_step_match_tf(name, replayed):
    weights, _, _ = replayed[name]
    case = CASES[name]
    assert len(weights) == len(case["steps"])
    worst = 0.0
    for step, (ours, theirs) in enumerate(zip(weights, case["steps"], strict=True)):
        for param, expected in theirs["params"].items():
            np.testing.assert_allclose(
                ours[param], expected, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {param} after step {step}"
            )
            worst = max(worst, _relative_error(ours[param], expected))
    PARITY_WORST[f"{name} weights"] = worst


def _expected_summaries(case: dict[str, Any], callback: OptimizeLoss) -> dict[str, dict[int, list[float]]]:
    """TF's summaries of every step under our tags: ``{tag: {global step: [values]}}``."""
    expected: dict[str, dict[int, list[float]]] = {}
    for reference in case["steps"]:
        values = {_our_tag(tag): value for tag, value in reference["summaries"].items()}
        for tag, histogram in reference["histograms"].items():
            values.update(_expected_statistics(_our_tag(tag), histogram))
        if "OptimizeLoss/learning_rate" not in values and "learning_rate" in callback.summaries:
            values["OptimizeLoss/learning_rate"] = case["learning_rate"]  # TF logs it only with a decay fn
        for tag, value in values.items():
            expected.setdefault(tag, {}).setdefault(reference["global_step"], []).append(value)
    return expected


@pytest.mark.parametrize("name", list(CASES))
def test_summaries_of_every_step_match_tf(name, replayed):
    _, history, callback = replayed[name]
    expected = _expected_summaries(CASES[name], callback)
    # Beyond TF: the clip activity metrics, logged with any clipping; TF's summaries otherwise exactly.
    activity = {tags.metric(callback.name, tag) for tag in tags.CLIP_ACTIVITY}
    assert set(history) - activity == set(expected), name
    assert activity <= set(history) if callback.clip_gradients is not None else not activity & set(history), name
    worst = 0.0
    for tag, steps in expected.items():
        assert set(history[tag]) == set(steps), f"{name}: {tag}"
        for step, values in steps.items():
            # Without increment_global_step every update logs at step 0, as in TF: compare as multisets.
            ours, theirs = sorted(history[tag][step]), sorted(values)
            # std from TF's sum of squares loses digits to cancellation; compare it relative to the norm.
            norms = expected.get(tag.rsplit("/", 1)[0] + "/norm", {}).get(step, [0.0])
            atol = ATOL + (1e-5 * max(norms) if tag.endswith("/std") else 0.0)
            assert ours == pytest.approx(theirs, rel=RTOL, abs=atol), f"{name} step {step}: {tag}"
            if not tag.endswith("/std"):
                worst = max(worst, _relative_error(ours, theirs))
    PARITY_WORST[f"{name} summaries"] = worst


def test_decay_no_increment_keeps_the_global_step_at_zero(replayed):
    _, history, callback = replayed["decay_no_increment"]
    assert callback.global_step == 0
    rates = history["OptimizeLoss/learning_rate"]
    assert list(rates) == [0]
    assert len(rates[0]) == len(CASES["decay_no_increment"]["steps"])
    assert len(set(rates[0])) == 1
