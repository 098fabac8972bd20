"""GradientPipeline on plain tensors, with a stand-in for the strategy: no Trainer, no Lightning.

``WholeGradients`` implements the pipeline's :class:`~lightning_optloss.pipeline.GradientStore` protocol the way
one device holds gradients (``p.grad``, nothing sharded); it is a real implementation of the protocol, not a mock.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optloss import adaptive_clipping_fn, callback_arguments
from lightning_optloss.common import tags
from lightning_optloss.common.parameters import NamedParameter
from lightning_optloss.gradients.contract import CallableClipping
from lightning_optloss.pipeline import GradientPipeline

NAMES = ["encoder.weight", "encoder.bias", "head.weight"]


class WholeGradients:
    """Gradients held whole in ``p.grad`` by this process, as on one device."""

    def local_grads(self, params):
        return [param.grad for param in params]

    def local_params(self, params):
        return list(params)

    def layouts(self, params):
        return [None] * len(params)

    def write_back(self, params, grads):
        pass  # the gradients were modified in place

    def sum_over_shards(self, values, layouts):
        return values

    def uniform_sum(self, layouts):
        return None

    def combine_over_shards(self, values, layouts, combine):
        return values


def _entries(grads):
    entries = []
    for index, (name, grad) in enumerate(zip(NAMES, grads, strict=True)):
        param = torch.nn.Parameter(torch.ones_like(grad))
        param.grad = grad.clone()
        entries.append(NamedParameter(index, name, param))
    return entries


def _pipeline(
    clip=None,
    summaries=("learning_rate", "global_gradient_norm", "gradient_norm"),
    multipliers=None,
    on_nonfinite="warn",
):
    summaries = list(summaries)
    return GradientPipeline(
        name="OptimizeLoss",
        noise=None,
        noise_scale=None,
        multipliers=multipliers or {},
        clip=callback_arguments.clip_transform(clip, summaries),
        summaries=summaries,
        access=WholeGradients(),
        metric_keys={index: tags.metric_key(name) for index, name in enumerate(NAMES)},
        on_nonfinite=on_nonfinite,
    )


def _run(pipeline, grads, step=0):
    entries = _entries(grads)
    optimizer = torch.optim.SGD([entry.param for entry in entries], lr=0.5)
    outcome = pipeline.run(optimizer, pipeline.gather(entries), step, logging=True, monitor=None)
    return [entry.param.grad for entry in entries], outcome


GRADS = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([0.0, 12.0]), torch.tensor([[0.0, 0.0]])]


def test_global_norm_clipping_scales_every_gradient_and_logs_both_norms():
    # Global norm sqrt(9 + 16 + 144) = 13; clipped at 6.5 every gradient halves.
    grads, outcome = _run(_pipeline(clip=6.5), GRADS)
    for grad, original in zip(grads, GRADS, strict=True):
        torch.testing.assert_close(grad, original * 0.5)
    summaries = outcome.record.resolve()
    assert summaries.scalars[tags.GLOBAL_NORM] == pytest.approx(13.0)
    assert summaries.scalars[tags.CLIPPED_GLOBAL_NORM] == pytest.approx(6.5)
    assert summaries.scalars[tags.LEARNING_RATE] == 0.5
    assert summaries.parameter_norms == pytest.approx({"encoder.weight": 2.5, "encoder.bias": 6.0, "head.weight": 0})
    assert summaries.metrics["OptimizeLoss/gradient_norm/encoder.bias"] == pytest.approx(6.0)


def test_multipliers_go_into_the_global_clipping_pass_as_tf_applies_them_first():
    # TF: multiply (encoder.bias x 0.25: norm 3), then clip at the global norm sqrt(25 + 9) of the result.
    grads, outcome = _run(_pipeline(clip=1.0, multipliers={1: 0.25}), GRADS)
    factor = 1.0 / math.sqrt(34.0)
    torch.testing.assert_close(grads[0], GRADS[0] * factor)
    torch.testing.assert_close(grads[1], GRADS[1] * 0.25 * factor)
    assert outcome.record.resolve().scalars[tags.GLOBAL_NORM] == pytest.approx(math.sqrt(34.0))


def test_per_group_clipping_clips_each_group_by_its_own_norm_and_reports_it():
    grads, outcome = _run(_pipeline(clip={"encoder.*": 6.5, "head.*": 1.0}), GRADS)
    for grad, original in zip(grads[:2], GRADS[:2], strict=True):
        torch.testing.assert_close(grad, original * 0.5)
    torch.testing.assert_close(grads[2], GRADS[2])  # norm 0: untouched
    scalars = outcome.record.resolve().scalars
    assert scalars[tags.group_norm("encoder._")] == pytest.approx(13.0)
    assert scalars[tags.group_norm("encoder._", clipped=True)] == pytest.approx(6.5)
    assert scalars[tags.group_norm("head._")] == 0.0
    assert scalars[tags.CLIPPED_GLOBAL_NORM] == pytest.approx(6.5)


def test_a_tf_style_callable_is_called_with_only_the_keywords_it_accepts():
    calls = []

    def clip(grads_and_vars, global_norm):
        calls.append(float(global_norm))
        return [(grad * 0.0, var) for grad, var in grads_and_vars]

    pipeline = _pipeline(clip=clip)
    assert isinstance(pipeline.clip, CallableClipping) and pipeline.clip.keywords == {"global_norm"}
    grads, outcome = _run(pipeline, GRADS)
    assert calls == [pytest.approx(13.0)]
    assert all(float(grad.abs().sum()) == 0.0 for grad in grads)  # the returned gradients were written back
    assert outcome.record.resolve().scalars[tags.CLIPPED_GLOBAL_NORM] == 0.0


def test_adaptive_clipping_summaries_and_state_go_through_the_contract():
    clip = adaptive_clipping_fn(report_summary=True)
    pipeline = _pipeline(clip=clip)
    assert pipeline.clip is clip  # the package's clip objects are transforms already
    _, outcome = _run(pipeline, GRADS, step=3)
    assert tags.ADAPTIVE_MAX_NORM in outcome.record.resolve().scalars
    assert set(clip.state_dict()) == {"mean", "sq_mean"}


def test_nonfinite_gradients_are_named_and_skip_before_any_clipping():
    bad = [GRADS[0], torch.tensor([float("nan"), 1.0]), GRADS[2]]
    grads, outcome = _run(_pipeline(clip=1.0, on_nonfinite="skip"), bad)
    assert outcome.skip and outcome.nonfinite_names == ["encoder.bias"]
    torch.testing.assert_close(grads[0], GRADS[0])  # nothing clipped


def test_no_gradient_at_all_is_an_error_naming_the_tf_message():
    entries = _entries(GRADS)
    for entry in entries:
        entry.param.grad = None
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        _pipeline().gather(entries)


def test_labels_are_made_once_per_set_of_parameters_and_a_few_sets_are_kept():
    pipeline = _pipeline(summaries=["gradients"])
    entries = _entries([torch.ones(2), torch.ones(3), torch.ones(1)])
    labels = pipeline.labels(entries)
    assert pipeline.labels(list(entries)) is labels  # the same parameters: the same labels, not made again
    assert labels.indices == (0, 1, 2) and labels.names == NAMES
    assert labels.statistic_tags[:5] == [f"gradients/encoder.weight/{s}" for s in tags.GRADIENT_STATISTICS]
    assert len(labels.statistic_tags) == 5 * len(NAMES)
    many = [NamedParameter(index, f"layer{index}.weight", torch.nn.Parameter(torch.ones(1))) for index in range(3, 8)]
    pipeline.metric_keys.update({entry.index: entry.name for entry in many})
    for mask in range(1, 32):  # parameters whose gradients come and go: 31 subsets
        subset = [entry for position, entry in enumerate(many) if mask >> position & 1]
        assert pipeline.labels(subset).names == [entry.name for entry in subset]
        assert len(pipeline._labels) <= 8
