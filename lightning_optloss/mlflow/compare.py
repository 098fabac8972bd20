"""Compare OptimizeLoss runs from an MLflow store in one PNG: ``python -m lightning_optloss.compare``.

::

    python -m lightning_optloss.compare RUN_ID [RUN_ID ...] --tracking-uri sqlite:///mlruns.db \\
        --output compare.png
    python -m lightning_optloss.compare no-clipping clip-1.0 --experiment lightning_optloss-example \\
        --tracking-uri sqlite:///mlruns_example/mlflow.db --output compare.png

Draws, against the global step, the loss, the global gradient norm (before clipping solid, after dashed), the
clip ratio (norm after / before clipping; 1 for a run that does not clip) and the learning rate: one colour
per run, the legend naming each run by its MLflow run name. With ``--experiment NAME`` the runs must belong to
that experiment and may be given by run name as well as by id. An unknown experiment, run id or run name, or
runs without any OptimizeLoss metric, end the command with a message and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from lightning_optloss.mlflow import plots
from lightning_optloss.mlflow.artifacts import CURVE_TAGS

EXIT_USAGE = 2


class CompareError(Exception):
    """A run or experiment that cannot be compared; the message says which and why."""


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of an existing store (MLflow would create an empty sqlite store at a mistyped path)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(f"no sqlite store at {path} (from --tracking-uri {tracking_uri}).")
    return MlflowClient(tracking_uri)


def find_runs(client: MlflowClient, identifiers: Sequence[str], experiment: str | None = None) -> list[Run]:
    """The runs named by ``identifiers`` (run ids, or run names within ``experiment``), in the given order."""
    experiment_id = None
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            known = ", ".join(repr(e.name) for e in client.search_experiments()) or "none"
            raise CompareError(f"no experiment named {experiment!r} in this store (experiments: {known}).")
        experiment_id = found.experiment_id
    runs = []
    for identifier in identifiers:
        run = _run_by_id(client, identifier)
        if run is None and experiment_id is not None:
            run = _run_by_name(client, experiment_id, experiment, identifier)
        if run is None:
            where = f"experiment {experiment!r}" if experiment else "this store"
            hint = "" if experiment else " (to give run names, add --experiment NAME)"
            raise CompareError(f"no run with id {identifier!r} in {where}{hint}.")
        if experiment_id is not None and run.info.experiment_id != experiment_id:
            raise CompareError(f"run {identifier!r} belongs to another experiment than {experiment!r}.")
        runs.append(run)
    return runs


def _run_by_id(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _run_by_name(client: MlflowClient, experiment_id: str, experiment: str, name: str) -> Run | None:
    quoted = name.replace("'", "\\'")
    matches = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{quoted}'", max_results=10)
    if len(matches) > 1:
        ids = ", ".join(run.info.run_id for run in matches)
        raise CompareError(f"{len(matches)} runs are named {name!r} in experiment {experiment!r} ({ids}); give an id.")
    return matches[0] if matches else None


def load_series(client: MlflowClient, run_id: str, name: str = "OptimizeLoss") -> dict[str, plots.Series]:
    """The run's OptimizeLoss curves from the store: ``{"loss": (steps, values), ...}`` (keys of CURVE_TAGS)."""
    series: dict[str, plots.Series] = {}
    for series_name, tag in CURVE_TAGS.items():
        history = sorted(client.get_metric_history(run_id, f"{name}/{tag}"), key=lambda m: (m.step, m.timestamp))
        if history:
            series[series_name] = ([m.step for m in history], [m.value for m in history])
    return series


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Run names, with the start of the id added where two runs share a name."""
    names = [run.info.run_name or run.info.run_id[:8] for run in runs]
    return [
        f"{name} ({run.info.run_id[:8]})" if names.count(name) > 1 else name
        for name, run in zip(names, runs, strict=True)
    ]


def compare_runs(
    client: MlflowClient, runs: Sequence[Run], output: Path, name: str = "OptimizeLoss", title: str | None = None
) -> Path:
    """Draw the comparison of ``runs`` into the PNG ``output``; return it.

    Raises:
        CompareError: when no run has any of the metrics.
    """
    labelled = [
        (label, load_series(client, run.info.run_id, name)) for label, run in zip(run_labels(runs), runs, strict=True)
    ]
    if not any(series for _, series in labelled):
        tags = ", ".join(f"{name}/{tag}" for tag in CURVE_TAGS.values())
        raise CompareError(f"none of the runs has OptimizeLoss metrics ({tags}); is --name right?")
    figure = plots.run_comparison(labelled, title or f"{name}: {len(runs)} runs compared")
    return plots.save_png(figure, output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_optloss.compare",
        description="Draw loss, global gradient norm, clip ratio and learning rate of several MLflow runs in one PNG.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_ID", help="run ids (or run names, with --experiment)")
    parser.add_argument("--experiment", help="experiment name: the runs must belong to it; allows run names")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        required="MLFLOW_TRACKING_URI" not in os.environ,
        help="the MLflow store, e.g. sqlite:///mlruns_example/mlflow.db (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--output", type=Path, default=Path("compare.png"), help="PNG to write (default compare.png)")
    parser.add_argument("--name", default="OptimizeLoss", help="the OptimizeLoss callback's name (metric prefix)")
    args = parser.parse_args(argv)
    try:
        client = open_store(args.tracking_uri)
        runs = find_runs(client, args.runs, args.experiment)
        title = f"{args.name}: {len(runs)} runs" + (f" of experiment {args.experiment!r}" if args.experiment else "")
        output = compare_runs(client, runs, args.output, args.name, title)
    except CompareError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"Wrote {output} comparing {', '.join(run_labels(runs))}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
