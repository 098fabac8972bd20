"""Two CPU processes (gloo) against one: DDP, ddp_spawn, FSDP1, FSDP2 and DeepSpeed ZeRO 1/2/3 give the same
weights and summaries.

Each run is ``tests/distributed/train.py`` in a fresh process, under ``torchrun`` but for ``ddp_spawn``: the
same model, data and OptimizeLoss configuration; the two-process runs split every global batch of 8 into
two halves (an explicit ``DistributedSampler(shuffle=False)``). Replicas must be bit-identical, and weights
and every summary must match the one-process run to rtol 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from support import run_process_group

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "train.py"
REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5

TF_FEATURES = {  # TF's pipeline: noise, multipliers, then float or adaptive clipping
    "float": {"noise": 0.05, "multipliers": {"w1": 0.5, "b2": 2.0}, "clip": 1.0, "decay": "exponential"},
    "adaptive": {"noise": 0.05, "multipliers": {"w1": 0.5}, "clip": "adaptive"},
}
ACCUMULATED = {"accumulated": {**TF_FEATURES["adaptive"], "accumulate": 2, "batches_per_epoch": 8}}
BEYOND_TF = {  # what came after TF
    "agc+annealed+warmup": {"noise": "annealed", "clip": "agc", "decay": "warmup_cosine"},
    "autoclip": {"clip": "autoclip", "optimizer": "SGD"},
    "groups": {"clip": {"w*": 0.5, "b*": 0.2}, "multipliers": {"b1": 3.0}},
}


def run(strategy: str, features: dict[str, Any], out: Path, steps: int = 6, **extra: Any) -> dict[str, Any]:
    """Train in new processes; return every rank's weights and callback state and rank 0's metrics."""
    out.mkdir(parents=True, exist_ok=True)
    # Lightning's MLFlowLogger opens the store on every rank: create the sqlite schema once, beforehand.
    MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_experiments()
    config = {"strategy": strategy, "steps": steps, "global_batch": 8, **features, **extra}
    launcher = [sys.executable]
    if strategy in ("ddp", "fsdp1", "fsdp2") or strategy.startswith("deepspeed"):
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = run_process_group([*launcher, str(SCRIPT), json.dumps(config), str(out)], timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = 1 if strategy == "single" else 2
    return {
        "weights": [torch.load(out / f"weights_rank{rank}.pt") for rank in range(ranks)],
        "states": [torch.load(out / f"state_rank{rank}.pt") for rank in range(ranks)],
        "metrics": json.loads((out / "metrics.json").read_text()),
        "histograms": [json.loads(line) for line in (out / "histograms" / "gradients.jsonl").read_text().splitlines()],
        "output": done.stdout + done.stderr,
    }


def assert_same_run(reference: dict[str, Any], result: dict[str, Any]) -> None:
    for rank_weights in result["weights"][1:]:  # replicas are bit-identical
        for name, value in rank_weights.items():
            assert torch.equal(value, result["weights"][0][name]), f"rank weights differ: {name}"
    for name, value in reference["weights"][0].items():
        torch.testing.assert_close(result["weights"][0][name], value, rtol=RTOL, atol=1e-7)
    assert {state["global_step"] for state in result["states"]} == {reference["states"][0]["global_step"]}
    for ours, theirs in zip(result["histograms"], reference["histograms"], strict=True):
        assert (ours["step"], ours["param"]) == (theirs["step"], theirs["param"])
        assert sum(ours["counts"]) == sum(theirs["counts"])  # every element of the full gradient is counted
        torch.testing.assert_close(torch.tensor(ours["edges"]), torch.tensor(theirs["edges"]), rtol=1e-4, atol=1e-6)
        # An element within rounding of an edge may fall in the neighbouring bin.
        assert sum(abs(a - b) for a, b in zip(ours["counts"], theirs["counts"], strict=True)) <= 2
    expected, actual = reference["metrics"], result["metrics"]
    assert set(actual) == set(expected)
    for key, steps in expected.items():
        assert set(actual[key]) == set(steps), key
        for step, values in steps.items():
            for ours, theirs in zip(actual[key][step], values, strict=True):
                # A gradient's mean, min and max can be sums that nearly cancel: float32 rounding of the
                # larger terms then dominates them, so they are compared relative to the gradient's norm.
                scale = abs(theirs)
                if key.rsplit("/", 1)[-1] in ("mean", "min", "max", "std") and "/gradients/" in key:
                    scale = max(scale, expected[key.rsplit("/", 1)[0] + "/norm"][step][0] * 0.1)
                assert math.isclose(ours, theirs, rel_tol=RTOL, abs_tol=RTOL * scale + 1e-9), (key, step, ours, theirs)


class SingleRuns(dict):
    """The one-process reference run of each feature set, made the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> dict[str, Any]:
        features = {**TF_FEATURES, **BEYOND_TF, **ACCUMULATED}[name]
        self[name] = run("single", features, self.root / name, steps=4 if name in ACCUMULATED else 6)
        return self[name]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory: pytest.TempPathFactory) -> SingleRuns:
    return SingleRuns(tmp_path_factory.mktemp("single"))


# The default suite runs each strategy with the TF features; `make test-slow` (CI runs it too) adds the rest.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("features", list(TF_FEATURES))
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp1", marks=SLOW), "fsdp2"])
def test_two_processes_match_one_with_tf_features(strategy, features, single_runs, tmp_path):
    assert_same_run(single_runs[features], run(strategy, TF_FEATURES[features], tmp_path))


@SLOW
@pytest.mark.parametrize("features", list(BEYOND_TF))
def test_ddp_matches_one_process_with_beyond_tf_features(features, single_runs, tmp_path):
    result = run("ddp", BEYOND_TF[features], tmp_path)
    assert_same_run(single_runs[features], result)
    metrics = result["metrics"]
    if features == "agc+annealed+warmup":
        assert "OptimizeLoss/clip/agc_clipped_fraction" in metrics
        assert "OptimizeLoss/gradient_noise_scale" in metrics
    if features == "autoclip":
        assert "OptimizeLoss/global_norm/autoclip_threshold" in metrics
        assert result["states"][0]["clip_gradients"]["count"] == 6
    if features == "groups":
        assert "OptimizeLoss/global_norm/w_/clipped_gradient_norm" in metrics


@SLOW
@pytest.mark.parametrize("features", ["autoclip", "groups"])
@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2", "deepspeed2", "deepspeed3"])
def test_sharded_strategies_match_one_process_with_beyond_tf_features(strategy, features, single_runs, tmp_path):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    assert_same_run(single_runs[features], run(strategy, BEYOND_TF[features], tmp_path))


@SLOW
def test_deepspeed_zero2_agc_and_annealed_noise_match_one_process(single_runs, tmp_path):
    pytest.importorskip("deepspeed")
    features = "agc+annealed+warmup"
    assert_same_run(single_runs[features], run("deepspeed2", BEYOND_TF[features], tmp_path))


@SLOW
@pytest.mark.parametrize("strategy", ["ddp", "fsdp1", "fsdp2"])
def test_gradient_accumulation_on_two_processes_matches_one(strategy, single_runs, tmp_path):
    result = run(strategy, ACCUMULATED["accumulated"], tmp_path, steps=4)
    assert_same_run(single_runs["accumulated"], result)
    assert sorted(map(int, result["metrics"]["OptimizeLoss/loss"])) == [0, 1, 2, 3]  # one record per update


@SLOW
def test_fsdp2_agc_clips_sharded_rows_like_one_process(single_runs, tmp_path):
    assert_same_run(single_runs["agc+annealed+warmup"], run("fsdp2", BEYOND_TF["agc+annealed+warmup"], tmp_path))


@pytest.mark.parametrize("stage", [pytest.param(1, marks=SLOW), 2, 3])
def test_deepspeed_zero_stages_match_one_process(stage, single_runs, tmp_path):
    pytest.importorskip("deepspeed")
    assert_same_run(single_runs["float"], run(f"deepspeed{stage}", TF_FEATURES["float"], tmp_path))


@SLOW
def test_deepspeed_processes_the_accumulated_gradient_once_per_optimizer_step(tmp_path):
    pytest.importorskip("deepspeed")
    features = {**TF_FEATURES["adaptive"], "accumulate": 2, "batches_per_epoch": 8}
    result = run("deepspeed2", features, tmp_path / "deepspeed", steps=4)
    assert "DeepSpeed's backward divides it again" in " ".join(result["output"].split())
    # Lightning and DeepSpeed each divide the loss by accumulate_grad_batches (the warning): the reference
    # divides it once more itself, so gradients, noise, clipping and updates match one for one.
    reference = run("single", {**features, "loss_factor": 0.5}, tmp_path / "single", steps=4)
    for name, value in reference["weights"][0].items():
        for rank_weights in result["weights"]:
            torch.testing.assert_close(rank_weights[name], value, rtol=RTOL, atol=1e-7)
    assert result["states"][0]["global_step"] == reference["states"][0]["global_step"] == 4
    norms = "OptimizeLoss/global_norm/gradient_norm"
    assert sorted(map(int, result["metrics"][norms])) == [0, 1, 2, 3]  # one record per optimizer step
    for step, values in reference["metrics"][norms].items():
        assert math.isclose(result["metrics"][norms][step][0], values[0], rel_tol=RTOL)
    for step, values in reference["metrics"]["OptimizeLoss/loss"].items():  # the mean of the micro-batches
        assert math.isclose(result["metrics"]["OptimizeLoss/loss"][step][0], 2 * values[0], rel_tol=RTOL)


def test_ddp_spawn_pickles_the_callback_and_matches_one_process(single_runs, tmp_path):
    assert_same_run(single_runs["float"], run("ddp_spawn", TF_FEATURES["float"], tmp_path))


def test_ddp_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    features = {**TF_FEATURES["adaptive"], "decay": "exponential", "batches_per_epoch": 4}
    uninterrupted = run("ddp", features, tmp_path / "full", steps=8)
    run("ddp", {**features, "checkpoint_every": 4}, tmp_path / "first", steps=4)
    checkpoint = next((tmp_path / "first").glob("*.ckpt"))
    resumed = run("ddp", {**features, "resume_from": str(checkpoint)}, tmp_path / "resumed", steps=8)
    for rank in range(2):
        for name, value in uninterrupted["weights"][rank].items():
            assert torch.equal(resumed["weights"][rank][name], value), (rank, name)
        assert resumed["states"][rank]["global_step"] == 8
        for key in ("mean", "sq_mean"):
            assert torch.equal(
                resumed["states"][rank]["clip_gradients"][key], uninterrupted["states"][rank]["clip_gradients"][key]
            )
    assert "resuming a checkpoint written by" not in resumed["output"]
    # The same checkpoint on one process: what carries over is said, and the global step goes on from 4.
    alone = run("single", {**features, "resume_from": str(checkpoint)}, tmp_path / "alone", steps=8)
    assert "resuming a checkpoint written by 2 process(es) on 1" in " ".join(alone["output"].split())
    assert alone["states"][0]["global_step"] == 8
