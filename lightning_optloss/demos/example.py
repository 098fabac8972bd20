"""Regenerate the example MLflow store ``mlruns_example/``: ``make example``.

``python -m lightning_optloss.example --output mlruns_example`` trains the digits CNN of
:mod:`lightning_optloss.demos.demo` four times, briefly, with every OptimizeLoss summary:

=====================  ==========================================================================================
run name               OptimizeLoss
=====================  ==========================================================================================
``no-clipping``        no clipping, no noise
``clip-1.0``           global-norm clipping at 1.0
``adaptive-clipping``  ``adaptive_clipping_fn(std_factor=0.5, decay=0.9, global_step=True, report_summary=True)``
``noise-0.01``         gradient noise scale 0.01, no clipping
=====================  ==========================================================================================

with gradient pictures in the image grid every sixth logged step (five frames a run, to keep the store small),
into experiment ``lightning_optloss-example`` (tagged for MLflow's model-training view) of an sqlite store,
``<output>/mlflow.db``, with the artifacts in ``<output>/artifacts/``, and writes ``<output>/README.md`` with the
``mlflow ui`` command.

The store must work wherever the folder is cloned. An sqlite store records each run's artifact location, and
MLflow makes a local one absolute; so the runs are logged through a temporary ``mlflow server`` (127.0.0.1, a
free port) that serves the artifacts: their recorded location is then ``mlflow-artifacts:/<experiment id>/...``,
which any ``mlflow ui --artifacts-destination <folder>/artifacts`` resolves, from any path.
Training is seeded and deterministic; run ids and timestamps differ from one regeneration to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_optloss.demos.example_store import ARTIFACTS, DATABASE, EXPERIMENT, RUN_NAMES, ui_command
from lightning_optloss.mlflow.server import free_port, wait_until_healthy

SERVER_START_SECONDS = 180


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None, log: Path | None = None) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the store in ``folder``; yield its URL; stop it on exit.

    The server serves ``folder/mlflow.db`` and the artifacts in ``folder/artifacts`` (``mlflow-artifacts:/``
    locations).
    """
    port = port or free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{(folder / DATABASE).resolve()}",
        "--artifacts-destination", str((folder / ARTIFACTS).resolve()),
    ]  # fmt: skip
    with serve(command, port, log=log) as url:
        yield url


@contextlib.contextmanager
def serve(command: list[str], port: int, cwd: Path | None = None, log: Path | None = None) -> Iterator[str]:
    """Start an MLflow server ``command`` listening on 127.0.0.1:``port``; yield its URL once it answers
    ``/health`` (at most ``SERVER_START_SECONDS``); terminate it on exit."""
    url = f"http://127.0.0.1:{port}"
    output = log.open("wb") if log is not None else subprocess.DEVNULL
    server = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(url, server, SERVER_START_SECONDS, " ".join(command))
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        if log is not None:
            output.close()


def callback_arguments(run_name: str) -> dict[str, Any]:
    """OptimizeLoss's arguments for one of the example runs (every summary, seed 0)."""
    from lightning_optloss import OPTIMIZER_SUMMARIES, adaptive_clipping_fn

    differences: dict[str, dict[str, Any]] = {
        "no-clipping": {},
        "clip-1.0": {"clip_gradients": 1.0},
        # TF's default (std_factor=2) never clips this short, steadily improving run; at half a standard deviation
        # above the moving mean of the log-norm it acts on about a third of the steps.
        "adaptive-clipping": {
            "clip_gradients": adaptive_clipping_fn(std_factor=0.5, decay=0.9, global_step=True, report_summary=True)
        },
        "noise-0.01": {"gradient_noise_scale": 0.01},
    }
    return {"summaries": OPTIMIZER_SUMMARIES, "seed": 0, **differences[run_name]}


def train(
    tracking_uri: str, run_name: str, epochs: int, train_batches: int, log_every_n_steps: int, spill_dir: Path
) -> dict[str, Any]:
    """One example run: the demo's digits CNN, TF's Adam with exponential decay, logged to ``tracking_uri``."""
    import lightning.pytorch as pl

    from lightning_optloss import MLFlowLogger, OptimizeLoss
    from lightning_optloss.demos.demo import DigitsClassifier, digits_loaders

    pl.seed_everything(0, verbose=False)
    # MLflow would record this machine's path of the script and its user; the store is committed.
    tags = {"mlflow.source.name": "python -m lightning_optloss.example", "mlflow.user": "lightning_optloss"}
    logger = MLFlowLogger(
        experiment_name=EXPERIMENT, run_name=run_name, tracking_uri=tracking_uri, tags=tags, spill_dir=spill_dir
    )
    callback = OptimizeLoss(**callback_arguments(run_name), images_every_n_steps=6 * log_every_n_steps)
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=train_batches if train_batches > 0 else 1.0,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=log_every_n_steps,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    train_loader, val_loader = digits_loaders(seed=0)
    trainer.fit(DigitsClassifier(learning_rate=0.003, decay_steps=100, decay_rate=0.5), train_loader, val_loader)
    return {
        "run_name": run_name,
        "run_id": logger.run_id,
        "steps": callback.global_step,
        "val_accuracy": float(trainer.callback_metrics["val_accuracy"]),
    }


@contextlib.contextmanager
def _plots_on() -> Iterator[None]:
    """The example exists to show the plots: draw them whatever LIGHTNING_OPTLOSS_PLOTS says."""
    from lightning_optloss.mlflow.artifacts import PLOTS_ENVIRONMENT_VARIABLE

    before = os.environ.get(PLOTS_ENVIRONMENT_VARIABLE)
    os.environ[PLOTS_ENVIRONMENT_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PLOTS_ENVIRONMENT_VARIABLE]
        else:
            os.environ[PLOTS_ENVIRONMENT_VARIABLE] = before


def generate(
    output: Path, epochs: int = 3, train_batches: int = -1, log_every_n_steps: int = 5, quiet: bool = True
) -> list[dict[str, Any]]:
    """Replace the store in ``output`` with the four example runs; return what each run reached."""
    output.mkdir(parents=True, exist_ok=True)
    (output / DATABASE).unlink(missing_ok=True)
    shutil.rmtree(output / ARTIFACTS, ignore_errors=True)
    if quiet:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results = []
    with mlflow_server(output, log=output.parent / f".{output.name}-server.log") as url, _plots_on():
        for run_name in RUN_NAMES:
            with tempfile.TemporaryDirectory() as spill_dir:  # the logger's spill folder; the local server takes all
                results.append(train(url, run_name, epochs, train_batches, log_every_n_steps, Path(spill_dir)))
    (output.parent / f".{output.name}-server.log").unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(output / DATABASE)) as database:
        database.execute("VACUUM")  # the schema's migrations leave free pages; the store is committed
    (output / "README.md").write_text(readme(output.name, results, epochs, train_batches, log_every_n_steps))
    return results


def readme(
    folder: str, results: list[Mapping[str, Any]], epochs: int, train_batches: int, log_every_n_steps: int
) -> str:
    """The folder's README: what the runs are, the ``mlflow ui`` command, the compare command."""
    rows = "\n".join(
        f"| `{r['run_name']}` | {_DESCRIPTIONS[r['run_name']]} | {r['steps']} | {r['val_accuracy']:.3f} "
        f"| `{r['run_id']}` |"
        for r in results
    )
    limit = f" of {train_batches} batches" if train_batches > 0 else ""
    return f"""# {folder}: an MLflow store of four OptimizeLoss runs

Generated by `make example` (`python -m lightning_optloss.example --output {folder}`); do not edit by hand,
regenerate. Four short trainings ({epochs} epochs{limit}, summaries every {log_every_n_steps} steps) of the
digits CNN of `lightning_optloss.demos.demo` (TF's Adam, learning rate 0.003 halved every 100 steps, every
OptimizeLoss summary, seed 0), in experiment `{EXPERIMENT}`:

| run | OptimizeLoss | steps | validation accuracy | run id |
|---|---|---|---|---|
{rows}

## Open it

From the folder that contains `{folder}/` (the repository root), wherever it was cloned:

```bash
{ui_command(folder)}
```

then browse <http://127.0.0.1:5000>, experiment `{EXPERIMENT}` (MLflow's **Model training** switch at the
top left, or directly <http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning>). Each run
has the `OptimizeLoss/...` metrics
(Model metrics tab; `OptimizeLoss/clip/ratio` and `OptimizeLoss/clip/active` show how hard and how often
clipping acted), the gradient pictures with a step slider (Chart view of the experiment, or the run's Model
metrics tab: `OptimizeLoss/gradient_norms`, `OptimizeLoss/gradient_histograms`; MLflow 3.17.2 lists each run's
params above its picture, which pushes the picture out of the card: switch **Show run parameters** off in the
card's ⋮ menu, **Configure**, and open the card full screen with ⛶), the `optimize_loss.*` params
and tags (Overview), and the artifacts
`optimize_loss/config.json`, `optimize_loss/histograms/gradients.jsonl` and `optimize_loss/plots/*.png`
(Artifacts tab). Both options matter: `mlflow.db` holds runs, params and metrics; the artifacts are recorded as
`mlflow-artifacts:/...` locations, which the server resolves inside `--artifacts-destination`.

## Compare the runs in one picture

```bash
python -m lightning_optloss.compare {" ".join(RUN_NAMES)} --experiment {EXPERIMENT} \\
    --tracking-uri sqlite:///{folder}/{DATABASE} --output compare.png
```
"""


_DESCRIPTIONS = {
    "no-clipping": "no clipping, no noise",
    "clip-1.0": "`clip_gradients=1.0` (global norm)",
    "adaptive-clipping": "`adaptive_clipping_fn(std_factor=0.5, decay=0.9, global_step=True, report_summary=True)`",
    "noise-0.01": "`gradient_noise_scale=0.01`",
}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m lightning_optloss.example", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("mlruns_example"), help="the store's folder")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (45 steps each)")
    parser.add_argument("--train-batches", type=int, default=-1, help="batches per epoch (-1: all 45)")
    parser.add_argument("--log-every-n-steps", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = generate(args.output, args.epochs, args.train_batches, args.log_every_n_steps)
    for result in results:
        print(f"{result['run_name']:18s} {result['steps']:4d} steps  val_accuracy {result['val_accuracy']:.3f}")
    seconds = time.perf_counter() - started
    print(f"\nWrote {args.output}/ in {seconds:.0f} s. Open it with:\n\n    {ui_command(str(args.output))}\n")
    return results


if __name__ == "__main__":
    main()
