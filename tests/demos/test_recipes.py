"""recipes/ start and train as documented: DDP, FSDP2 and DeepSpeed ZeRO 2/3 on 2 CPU processes, through
recipes/torchrun.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import run_process_group

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


# The DeepSpeed recipes need CUDA as written; on CPU processes the tests swap in the test-only strategy that
# lifts Lightning's CUDA check (tests/distributed/cpu_deepspeed.py), keeping the recipe's ZeRO stage.
ON_CPU = {
    "deepspeed": ["--trainer.strategy.class_path=cpu_deepspeed.CPUDeepSpeedStrategy", "--trainer.precision=32-true"]
}


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "run_name"),
    [
        ("ddp.yaml", "ddp"),
        ("fsdp.yaml", "fsdp2"),
        pytest.param("deepspeed_zero2.yaml", "deepspeed-zero2", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3.yaml", "deepspeed-zero3", marks=pytest.mark.slow),
    ],
)
def test_recipe_trains_on_two_cpu_processes_and_logs_to_mlflow(config, run_name, tmp_path):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment = {
        **os.environ,
        "NPROC": "2",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "tests" / "distributed"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    command = [
        "bash",
        str(RECIPES / "torchrun.sh"),
        f"recipes/{config}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        *ON_CPU.get(config.split("_")[0], []),
    ]
    done = run_process_group(command, timeout=300, cwd=REPO, env=environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert run.info.run_name == run_name and run.info.status == "FINISHED"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "OptimizeLoss/loss")]
    assert steps == [0, 1, 2, 3]
    assert "OptimizeLoss/global_norm/clipped_gradient_norm" in run.data.metrics
    assert any(key.startswith("OptimizeLoss/gradients/features.0.weight/") for key in run.data.metrics)
    assert "config.yaml" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]


@pytest.mark.parametrize("script", ["torchrun.sh", "torchrun_multinode.sh", "slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(RECIPES / script)], check=True)


def test_multinode_launcher_says_which_variable_is_missing():
    done = subprocess.run(
        ["bash", str(RECIPES / "torchrun_multinode.sh"), "recipes/ddp.yaml"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "NNODES" in done.stderr
