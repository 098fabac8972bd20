"""TFCheckpoint: a TF1 run saved by ``tf.train.Saver`` continues in Lightning on TF's own trajectory.

The checkpoints and trajectories come from real TF/tf-slim (``tests/tf/reference/make_tf_checkpoint_reference.py``):
TF trained 4 steps with ``optimize_loss``, saved, and trained 4 more. A real Trainer loads the checkpoint with
TFCheckpoint and trains the same 4 batches: weights (and batch-norm statistics) after every step, the loss,
the learning rate and the global norms must match TF's at rtol 1e-4. The bad-input tests check that each
fault is a clear error before any update.

Reading needs TensorFlow (``pip install 'lightning-optloss[tf]'``; ``make test`` installs it): without it the
tests that read are skipped (they are not skipped in ``make test``).
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    PARITY_WORST,
    make_trainer,
    metric_values,
    new_mlflow_logger,
    run_process_group,
    subprocess_environment,
)
from tf_checkpoint_support import (
    CASES,
    CHECKPOINTS,
    DenseModel,
    RecordTensors,
    make_callback,
    make_loader,
    make_model,
    tf_as_torch,
)

from lightning_optloss import OptimizeLoss, TFCheckpoint, adaptive_clipping_fn
from lightning_optloss.tf.checkpoint_inspect import main as inspect_main
from lightning_optloss.tf.checkpoint_names import default_name

RTOL = 1e-4
ATOL = 1e-6
requires_tf = pytest.mark.usefixtures("tensorflow")


@pytest.fixture(scope="module")
def tensorflow():
    return pytest.importorskip("tensorflow", reason="needs the [tf] extra (make test installs it)")


def fit(case, *callbacks, model=None, logger=False, ckpt_path=None, **kwargs):
    """Train the continued steps of ``case`` with ``callbacks`` (TFCheckpoint on a fixture checkpoint)."""
    model = model or make_model(case)
    trainer = make_trainer(list(callbacks), logger=logger, **{"max_steps": len(case["steps"]), **kwargs})
    trainer.fit(model, make_loader(case), ckpt_path=ckpt_path)
    return model, trainer


# ---------------------------------------------------------------------------------------- trajectories


@pytest.fixture(scope="module")
def continued(tensorflow, tracking_uri, tmp_path_factory):
    """Every fixture case continued once from its checkpoint; shared by the checks below."""
    results = {}
    for name, case in CASES.items():
        logger = new_mlflow_logger(tracking_uri, tmp_path_factory.mktemp(name))
        recorder = RecordTensors()
        loader = TFCheckpoint(CHECKPOINTS / name)
        model, _ = fit(case, make_callback(case), loader, recorder, logger=logger)
        results[name] = (model, recorder.steps, metric_values(logger), loader)
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_weights_after_every_continued_step_match_tf(name, continued):
    model, steps, _, loader = continued[name]
    case = CASES[name]
    assert loader.loaded
    assert len(steps) == len(case["steps"])
    worst = 0.0
    for index, (ours, theirs) in enumerate(zip(steps, case["steps"], strict=True)):
        expected = tf_as_torch(case, model, theirs["variables"])
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable <= set(expected), f"{name}: TF recorded no value for {trainable - set(expected)}"
        for param, value in expected.items():
            np.testing.assert_allclose(
                ours[param], value, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {param} after continued step {index}"
            )
            scale = np.maximum(np.abs(value), ATOL / RTOL)
            worst = max(worst, float(np.max(np.abs(ours[param] - value) / scale)))
    PARITY_WORST[f"checkpoint {name} weights"] = worst


@pytest.mark.parametrize("name", list(CASES))
def test_loss_rate_and_norms_of_continued_steps_match_tf(name, continued):
    _, _, history, _ = continued[name]
    case = CASES[name]
    scope = case["name"]
    keys = {
        "loss": f"{scope}/loss",
        "learning_rate": f"{scope}/learning_rate",
        "gradient_norm": f"{scope}/global_norm/gradient_norm",
        "clipped_gradient_norm": f"{scope}/global_norm/clipped_gradient_norm",
    }
    for record in case["steps"]:
        step = record["global_step"]
        assert step >= case["saved_at"]  # the summary steps continue from TF's global step
        for field, key in keys.items():
            expected = record[field]
            if expected is None and field == "learning_rate":
                expected = case["learning_rate"]  # TF summarises the rate only with a decay function
            if expected is None:
                assert key not in history, f"{name}: {key} logged, TF has none"
                continue
            assert history[key][step] == pytest.approx([expected], rel=RTOL, abs=ATOL), f"{name} step {step}: {key}"


def test_decay_continues_from_the_saved_global_step(continued):
    _, _, history, _ = continued["decay"]
    rates = history["OptimizeLoss/learning_rate"]
    assert sorted(rates) == [4, 5, 6, 7]
    # exponential_decay(0.05, step, 3, 0.5) at step 4, not at 0: the schedule did not restart.
    assert rates[4] == pytest.approx([0.05 * 0.5 ** (4 / 3)], rel=1e-6)


def test_adaptive_clipping_continues_from_the_saved_moving_averages(continued, tensorflow):
    reader = tensorflow.train.load_checkpoint(str(CHECKPOINTS / "adaptive" / "model.ckpt-4"))
    assert reader.get_tensor("OptimizeLoss/AdaptiveMaxNorm/mean") != 0.0
    _, _, history, _ = continued["adaptive"]
    # The first continued step's clipping depends on the loaded averages; its clipped norm matches TF's.
    assert history["OptimizeLoss/global_norm/clipped_gradient_norm"][4] == pytest.approx(
        [CASES["adaptive"]["steps"][0]["clipped_gradient_norm"]], rel=RTOL
    )


# ---------------------------------------------------------------------------------------- name map


def test_default_name_map_follows_torch_conventions():
    assert default_name("dense/kernel") == "dense.weight"
    assert default_name("block1/bn/gamma") == "block1.bn.weight"
    assert default_name("bn/beta") == "bn.bias"
    assert default_name("bn/moving_mean") == "bn.running_mean"
    assert default_name("bn/moving_variance") == "bn.running_var"
    assert default_name("embed/embeddings") == "embed.weight"
    assert default_name("w1") == "w1"


class RenamedModel(DenseModel):
    """The dense model with its first layer called ``encoder`` instead of TF's ``hidden``."""

    def __init__(self, case, optimizer=None):
        super().__init__(case, optimizer)
        self.encoder = self.hidden
        del self.hidden

    def forward(self, x):
        return self.out(torch.tanh(self.encoder(x)))


@requires_tf
def test_strict_lists_unmatched_names_on_both_sides_with_closest_matches(tmp_path):
    case = CASES["opt_adam"]
    model = RenamedModel(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="do not match") as raised:
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_adam"), model=model)
    message = str(raised.value)
    assert "parameters without a TF value: 'encoder.weight' (closest: 'hidden.weight')" in message
    assert "'hidden/kernel' -> 'hidden.weight' (closest: 'encoder.weight')" in message
    assert "name_map" in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was loaded


@requires_tf
@pytest.mark.parametrize(
    "name_map",
    [
        {"hidden/kernel": "encoder.weight", "hidden/bias": "encoder.bias"},
        lambda tf_name: default_name(tf_name).replace("hidden.", "encoder."),
    ],
    ids=["dict", "callable"],
)
def test_name_map_renames_and_the_run_continues_on_tf_trajectory(tmp_path, name_map):
    case = CASES["opt_adam"]
    recorder = RecordTensors()
    model = RenamedModel(case)
    fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_adam", name_map=name_map), recorder, model=model)
    expected = case["steps"][-1]["variables"]
    np.testing.assert_allclose(
        recorder.steps[-1]["encoder.weight"], np.asarray(expected["hidden/kernel"]).T, rtol=RTOL, atol=ATOL
    )


@requires_tf
def test_non_strict_loads_what_matches_and_warns(tmp_path):
    case = CASES["opt_sgd"]
    model = RenamedModel(case)
    with pytest.warns(UserWarning, match="parameters without a TF value"):
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_sgd", strict=False), model=model, max_steps=0)
    # out/ was loaded (transposed); encoder kept its own values.
    reader = pytest.importorskip("tensorflow").train.load_checkpoint(str(CHECKPOINTS / "opt_sgd" / "model.ckpt-4"))
    np.testing.assert_array_equal(model.out.weight.detach().numpy(), reader.get_tensor("out/kernel").T)


class WideInputModel(DenseModel):
    def __init__(self, case, optimizer=None):
        super().__init__(case, optimizer)
        self.hidden = torch.nn.Linear(5, 8)


@requires_tf
def test_shape_mismatch_names_both_shapes_and_the_transpose_tried(tmp_path):
    case = CASES["opt_sgd"]
    with pytest.raises(ValueError) as raised:
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_sgd"), model=WideInputModel(case))
    message = str(raised.value)
    assert "'hidden/kernel' has shape (4, 8)" in message
    assert "'hidden.weight' has shape (8, 5)" in message
    assert "transpose tried: (in, out) -> (out, in) (1, 0), giving (8, 4)" in message


# ---------------------------------------------------------------------------------------- optimizers


@requires_tf
def test_slots_of_another_optimizer_are_refused_before_any_update(tmp_path):
    case = CASES["opt_adam"]
    model = make_model(case, optimizer="Momentum")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"slots of the Adam optimizer, but the configured optimizer is Momentum"):
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_adam"), model=model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@requires_tf
def test_missing_slots_and_missing_clipping_averages_are_errors_when_strict(tmp_path):
    case = CASES["opt_sgd"]  # saved by SGD: no slots, no adaptive clipping
    with pytest.raises(ValueError, match=r"no slot Adam, Adam_1 for 'hidden/kernel'"):
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_sgd"), model=make_model(case, "Adam"))
    adaptive = OptimizeLoss(clip_gradients=adaptive_clipping_fn())
    with pytest.raises(ValueError, match=r"clips adaptively, but the checkpoint has no 'OptimizeLoss/AdaptiveMaxNorm"):
        fit(case, adaptive, TFCheckpoint(CHECKPOINTS / "opt_sgd"))


@requires_tf
def test_an_optimizer_without_a_tf_name_is_an_error_when_strict(tmp_path):
    case = CASES["opt_adam"]
    model = make_model(case, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match=r"Adam is not one of TF1's optimizers built by name .*slots \(Adam\)"):
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_adam"), model=model)


@requires_tf
def test_an_optimizer_without_a_tf_name_gets_the_weights_only_when_not_strict(tmp_path):
    case = CASES["opt_adam"]
    model = make_model(case, optimizer=torch.optim.Adam)
    with pytest.warns(UserWarning, match="load the weights only"):
        _, trainer = fit(
            case,
            make_callback(case),
            TFCheckpoint(CHECKPOINTS / "opt_adam", strict=False),
            model=model,
            max_steps=0,
        )
    assert not trainer.optimizers[0].state  # torch's Adam starts from its own zero state
    first = CASES["opt_adam"]["steps"][0]["variables"]  # after a step; the saved value is before it
    assert not np.allclose(model.out.bias.detach().numpy(), first["out/bias"])


@requires_tf
def test_global_step_reaches_every_optimize_loss(tmp_path):
    case = CASES["opt_sgd"]
    first, second = make_callback(case), OptimizeLoss(name="Second", increment_global_step=False)
    fit(case, first, second, TFCheckpoint(CHECKPOINTS / "opt_sgd"), max_steps=0)
    assert first.global_step == second.global_step == 4


# ---------------------------------------------------------------------------------------- faults


def test_missing_path_is_an_error_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no TF checkpoint at `path` .*model.ckpt-9.index' does not exist"):
        TFCheckpoint(tmp_path / "model.ckpt-9")
    with pytest.raises(FileNotFoundError, match="folder without TF's 'checkpoint' file"):
        TFCheckpoint(tmp_path)
    with pytest.raises(ValueError, match="`path`"):
        TFCheckpoint(3)


def test_folder_resolves_to_its_latest_checkpoint():
    assert TFCheckpoint(CHECKPOINTS / "opt_sgd").prefix == str(CHECKPOINTS / "opt_sgd" / "model.ckpt-4")


@requires_tf
@pytest.mark.parametrize("damage", ["truncated data", "truncated index"])
def test_damaged_checkpoint_is_an_error_before_any_update(tmp_path, damage):
    folder = shutil.copytree(CHECKPOINTS / "opt_adam", tmp_path / "ckpt")
    victim = folder / ("model.ckpt-4.data-00000-of-00001" if damage == "truncated data" else "model.ckpt-4.index")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    case = CASES["opt_adam"]
    model = make_model(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"cannot read .*TF checkpoint"):
        fit(case, make_callback(case), TFCheckpoint(folder), model=model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_without_tensorflow_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what `import tensorflow` meets without the extra
    case = CASES["opt_sgd"]
    with pytest.raises(ImportError, match=r"pip install 'lightning-optloss\[tf\]'"):
        fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_sgd"))


@requires_tf
def test_a_resumed_lightning_checkpoint_takes_precedence(tmp_path):
    case = CASES["opt_sgd"]
    model, trainer = fit(case, make_callback(case), max_steps=1)
    saved = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(saved)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    resumed = make_model(case)
    loader = TFCheckpoint(CHECKPOINTS / "opt_sgd")
    with pytest.warns(UserWarning, match="takes precedence: nothing is loaded"):
        fit(case, make_callback(case), loader, model=resumed, ckpt_path=saved, max_steps=1)
    assert not loader.loaded
    assert all(torch.equal(p, expected[n]) for n, p in resumed.named_parameters())


@requires_tf
def test_a_second_fit_goes_on_from_the_trained_weights(tmp_path):
    case = CASES["opt_sgd"]
    model, trainer = fit(case, make_callback(case), TFCheckpoint(CHECKPOINTS / "opt_sgd"), max_steps=1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    # max_steps is reached: the second fit trains nothing, and a reload would put TF's saved values back.
    with pytest.warns(UserWarning, match="loaded by an earlier fit"):
        trainer.fit(model, make_loader(case))
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_sharded_strategies_are_refused_with_a_clear_error():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_optloss.distributed.strategies import check_whole_tensor_loading

    for strategy, text in [
        (ModelParallelStrategy(), "FSDP2"),
        (FSDPStrategy(), "FSDP1"),
        (DeepSpeedStrategy(), "DeepSpeed"),
    ]:
        with pytest.raises(ValueError, match=rf"TFCheckpoint: .*{text}.*supported on one device and with DDP"):
            check_whole_tensor_loading("TFCheckpoint", strategy)


# ---------------------------------------------------------------------------------------- inspect


@requires_tf
def test_inspect_prints_variables_mapping_and_leftovers(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.encoder = torch.nn.Linear(4, 8)\n"
        "        self.out = torch.nn.Linear(8, 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str(CHECKPOINTS / "opt_adam")
    # The documented command, run as `python -m` runs it (in this process: TF is imported once per session).
    monkeypatch.setattr(sys, "argv", ["tf_checkpoint", "inspect", path, "--module", "my_models.Net"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("lightning_optloss.tf_checkpoint", run_name="__main__")
    assert exited.value.code == 1  # something is left over
    out = capsys.readouterr().out
    assert "global_step: 4" in out
    assert "out/kernel [8, 3] -> out.weight [3, 8]  transposed (in, out) -> (out, in)  slots: Adam, Adam_1" in out
    assert "hidden/kernel [4, 8] -> (unused)" in out
    assert "OptimizeLoss/beta1_power (Adam)" in out
    assert "parameters without a TF value: 'encoder.weight' (closest: 'hidden.weight')" in out
    assert inspect_main(["inspect", path]) == 0
    assert "hidden/kernel [4, 8] -> hidden.weight (default name)" in capsys.readouterr().out
    assert inspect_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "no TF checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- DDP


@requires_tf
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_continue_on_tf_trajectory(tmp_path):
    case = CASES["opt_adam"]
    script = Path(__file__).parents[1] / "distributed" / "tf_checkpoint_ddp.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = run_process_group(
        [*command, str(script), "opt_adam", str(tmp_path)], timeout=300, env=subprocess_environment()
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"weights_rank{rank}.pt", weights_only=False) for rank in range(2)]
    model = make_model(case)
    for index, theirs in enumerate(case["steps"]):
        expected = tf_as_torch(case, model, theirs["variables"])
        for name, value in expected.items():
            np.testing.assert_array_equal(ranks[0][index][name], ranks[1][index][name])  # every rank loaded alike
            np.testing.assert_allclose(ranks[0][index][name], value, rtol=RTOL, atol=ATOL, err_msg=f"{name} {index}")
    assert (tmp_path / "global_step_rank1.json").read_text() == str(case["saved_at"] + len(case["steps"]))
