"""spike_skipping_fn on plain tensors: statistics against their closed form, the decision, the count in a row,
the state through a weights-only checkpoint, and bad arguments."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lightning_optloss import add_transfer_hook, spike_skipping_fn
from lightning_optloss.gradients.spikes import SKIPPED_STEPS_KEPT


def feed(skipping, values, first_step=0):
    """Decide every value in turn (1-d tensors of the watched values); return the decisions."""
    return [
        skipping.decide(torch.tensor(value, dtype=torch.float32).reshape(-1), first_step + i)
        for i, value in enumerate(values)
    ]


def test_threshold_is_the_closed_form_of_the_log_statistics():
    norms = [1.0, 1.3, 0.8, 1.1, 0.95, 1.2, 0.9, 1.05]
    skipping = spike_skipping_fn(std_factor=2.5, decay=0.99, warmup_steps=3)
    feed(skipping, norms)
    # Step-aware decay min(0.99, n / (n + 1)) gives plain means over the first 99 values.
    logs = np.log(np.array(norms, dtype=np.float64) + 1e-8)
    mean, sq_mean = logs.mean(), (logs**2).mean()
    expected = math.exp(mean + 2.5 * math.sqrt(sq_mean - mean**2))
    assert float(skipping.thresholds()) == pytest.approx(expected, rel=1e-5)
    assert skipping.count == len(norms) and skipping.skipped == 0


def test_a_spike_is_skipped_and_never_enters_the_statistics():
    calm = [1.0, 1.2, 0.9, 1.1, 1.0]
    skipping = spike_skipping_fn(std_factor=4.0, warmup_steps=5)
    reference = spike_skipping_fn(std_factor=4.0, warmup_steps=5)
    feed(skipping, calm)
    feed(reference, calm)
    (decision,) = feed(skipping, [1000.0], first_step=5)
    assert decision.skip and not decision.released
    assert decision.values == [1000.0] and decision.thresholds[0] < 2.0
    for key, value in reference.state_dict().items():  # the statistics are those of the calm steps alone
        if key in ("mean", "sq_mean"):
            assert torch.equal(skipping.state_dict()[key], value)
    assert skipping.count == 5 and skipping.consecutive == 1 and skipping.skipped_steps == [5]
    (after,) = feed(skipping, [1.05], first_step=6)
    assert not after.skip and skipping.consecutive == 0 and skipping.count == 6


def test_no_step_is_skipped_during_the_warmup():
    skipping = spike_skipping_fn(warmup_steps=4)
    decisions = feed(skipping, [1.0, 1.0, 1e6, 1.0])
    assert not any(d.skip for d in decisions)
    assert all(d.thresholds is None for d in decisions)
    assert skipping.count == 4 and skipping.summaries() == {"spike/skipped": 0.0}


def test_warmup_zero_still_takes_the_first_value_in_before_judging():
    skipping = spike_skipping_fn(warmup_steps=0, std_factor=1.0)
    first, second = feed(skipping, [1e6, 1e7])
    assert not first.skip and second.skip


def test_max_consecutive_releases_a_lasting_change_of_scale():
    skipping = spike_skipping_fn(std_factor=6.0, warmup_steps=10, max_consecutive=2)
    feed(skipping, [1.0 + 0.01 * (i % 3) for i in range(10)])
    shifted = feed(skipping, [100.0] * 30, first_step=10)
    pattern = [(d.skip, d.released) for d in shifted]
    assert pattern[:3] == [(True, False), (True, False), (False, True)]  # two skipped, the third released
    message = shifted[2].describe("OptimizeLoss", skipping.watch, 12, 2)
    assert "applied the optimizer step at global step 12 despite a spike" in message
    # Each released value enters the statistics: the threshold climbs until the new scale is normal.
    last_skip = max(i for i, d in enumerate(shifted) if d.skip)
    assert last_skip < 15 and not any(d.skip for d in shifted[last_skip + 1 :])
    assert skipping.thresholds().item() > 100.0


def test_non_finite_values_are_no_decision_and_leave_the_state():
    skipping = spike_skipping_fn(warmup_steps=2)
    feed(skipping, [1.0, 1.1])
    before = skipping.state_dict()
    decisions = feed(skipping, [math.inf, math.nan, -3.0], first_step=2)  # -3: a loss <= 0 has no log
    assert not any(d.skip or d.released for d in decisions)
    for key, value in before.items():
        assert torch.equal(torch.as_tensor(skipping.state_dict()[key]), torch.as_tensor(value)), key


def test_watching_both_skips_on_a_spike_in_either():
    skipping = spike_skipping_fn(std_factor=4.0, warmup_steps=4, watch=("global_norm", "loss"))
    feed(skipping, [[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.0]])
    norm_spike, loss_spike, calm = feed(skipping, [[50.0, 2.0], [1.0, 80.0], [1.0, 2.0]], first_step=4)
    assert norm_spike.skip and loss_spike.skip and not calm.skip
    assert "loss 80 > threshold" in loss_spike.describe("OptimizeLoss", skipping.watch, 5, 5)
    assert set(skipping.summaries()) == {"spike/skipped", "spike/global_norm/threshold", "spike/loss/threshold"}


def test_state_survives_a_weights_only_checkpoint_and_decides_identically():
    values = [1.0, 1.2, 0.8, 1.1, 30.0, 1.0, 0.9, 40.0, 1.1, 1.0]
    uninterrupted = spike_skipping_fn(std_factor=3.0, warmup_steps=3)
    expected = feed(uninterrupted, values)
    first = spike_skipping_fn(std_factor=3.0, warmup_steps=3)
    feed(first, values[:5])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = spike_skipping_fn(std_factor=3.0, warmup_steps=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert feed(resumed, values[5:], first_step=5) == expected[5:]
    assert resumed.skipped_steps == uninterrupted.skipped_steps == [4, 7]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(torch.as_tensor(resumed.state_dict()[key]), torch.as_tensor(value)), key


def test_skipped_steps_keep_only_the_last_ones():
    skipping = spike_skipping_fn(std_factor=1.0, warmup_steps=1, max_consecutive=1000)
    feed(skipping, [1.0] + [1e6] * (SKIPPED_STEPS_KEPT + 5))
    assert skipping.skipped == SKIPPED_STEPS_KEPT + 5
    assert skipping.skipped_steps == list(range(6, SKIPPED_STEPS_KEPT + 6))


def test_each_decision_reads_the_device_once():
    skipping = spike_skipping_fn(watch=["global_norm", "loss"])
    seen = []
    handle = add_transfer_hook(lambda tensor: seen.append(tensor.numel()))
    try:
        feed(skipping, [[1.0, 2.0], [1.0, 2.0]])
    finally:
        handle.remove()
    assert seen == [2, 2]


def test_loading_statistics_of_another_watch_is_refused():
    both = spike_skipping_fn(watch=("global_norm", "loss"))
    with pytest.raises(ValueError, match=r"statistics of 2 watched value\(s\); this skip_spikes watches \['loss'\]"):
        spike_skipping_fn(watch="loss").load_state_dict(both.state_dict())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"std_factor": 0.0}, r"`std_factor` must be a finite number > 0.0; got 0.0"),
        ({"std_factor": -1}, r"`std_factor` must be a finite number > 0.0; got -1"),
        ({"decay": 0.0}, r"`decay` must be a finite number > 0.0 and <= 1.0; got 0.0"),
        ({"decay": 1.0}, r"`decay` must be a finite number in \(0, 1\); got 1.0"),
        ({"decay": math.nan}, r"`decay` must be .*; got nan"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0; got -1"),
        ({"warmup_steps": 2.5}, r"`warmup_steps` must be an integer >= 0; got 2.5"),
        ({"max_consecutive": 0}, r"`max_consecutive` must be an integer >= 1; got 0"),
        ({"max_consecutive": True}, r"`max_consecutive` must be an integer >= 1; got True"),
        ({"watch": "norm"}, r"`watch` must be one of 'global_norm', 'loss'; got 'norm'"),
        ({"watch": ("loss", "loss")}, r"`watch` must be 'global_norm', 'loss' or \('global_norm', 'loss'\)"),
        ({"watch": []}, r"`watch` must be 'global_norm', 'loss' or"),
        ({"watch": ("global_norm", "lr")}, r"`watch` must be one of 'global_norm', 'loss'; got 'lr'"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(arguments, message):
    with pytest.raises(ValueError, match=r"spike_skipping_fn: " + message):
        spike_skipping_fn(**arguments)
