"""skip_spikes on two CPU processes (gloo): DDP and FSDP2 skip exactly the corrupt batches, as one process does,
with bit-identical replicas and the same spike statistics on every rank."""

from __future__ import annotations

import pytest
import torch
from test_distributed import assert_same_run, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Batches 6 and 9 have their loss times 1e3; the global norm and the loss (averaged over replicas) are watched.
SPIKES = {
    "skip_spikes": {"std_factor": 6.0, "warmup_steps": 4, "watch": ["global_norm", "loss"]},
    "spike_batches": [6, 9],
    "clip": 1.0,
    "steps": 12,
}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    return run("single", SPIKES, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_skip_the_same_corrupt_steps_as_one(strategy, single, tmp_path):
    result = run(strategy, SPIKES, tmp_path)
    assert_same_run(single, result)  # replicas bit-identical, weights and every metric as one process
    # Batch 6 is global step 6; batch 9 comes after one skip, at global step 8.
    for state in [*single["states"], *result["states"]]:
        assert state["global_step"] == 10 and state["skip_spikes"]["skipped_steps"] == [6, 8]
    first, second = result["states"]
    for key in ("mean", "sq_mean"):
        assert torch.equal(first["skip_spikes"][key], second["skip_spikes"][key])
    assert result["metrics"]["OptimizeLoss/spike/skipped"]["9"] == [2.0]
    assert "skipped the optimizer step at global step 8 on a spike" in " ".join(result["output"].split())
