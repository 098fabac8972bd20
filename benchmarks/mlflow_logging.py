"""Time the training thread spends in ``log_metrics`` per logged step: Lightning's MLFlowLogger vs ours.

Run from the repository root (it starts a loopback ``mlflow server`` of its own, on 127.0.0.1)::

    python -m benchmarks.mlflow_logging [--steps 300] [--metrics 25]

For each store (an embedded sqlite file, and an ``mlflow server`` on 127.0.0.1 backed by sqlite) and each logger,
a new run gets ``--steps`` calls of ``log_metrics`` with ``--metrics`` values each (OptimizeLoss's summaries of a
small model are about that many), one call per logged step as a Trainer makes them. The time of each call on the
calling thread (``time.perf_counter``) gives the median and the 99th percentile; ``finalize`` is the end of fit
(for ours: waiting until the queue is delivered). A last row times ours with the server killed after the run
was created. Every run is checked to hold all its steps afterwards (except the outage's, spilled to a file).

Two more tables: ``durable=True`` against the default on the server (the cost of appending every record to the
spill file, fsync at most every 100 ms), and the time to drain a backlog of ``--backlog`` logged steps (what an
outage leaves queued) to the server, one ``log_batch`` per record against records merged into as few
``log_batch`` calls as MLflow's limits allow (1000 metrics per call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger as StockMLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Metric

from lightning_optloss import MLFlowLogger
from lightning_optloss.mlflow.delivery import Delivery
from lightning_optloss.mlflow.records import Sender, batch_record, merged

Logger = StockMLFlowLogger  # ours is a subclass


def time_logging(logger: Logger, steps: int, metrics: int) -> tuple[list[float], float]:
    """Seconds of each ``log_metrics`` call, and of ``finalize``."""
    logger.log_hyperparams({"steps": steps, "metrics": metrics})  # creates the run before the timing
    keys = [f"OptimizeLoss/gradients/layer{i}.weight/norm" for i in range(metrics)]
    durations = []
    for step in range(steps):
        values = {key: 1.0 / (step + 1 + i) for i, key in enumerate(keys)}
        started = time.perf_counter()
        logger.log_metrics(values, step=step)
        durations.append(time.perf_counter() - started)
    started = time.perf_counter()
    logger.finalize("success")
    return durations, time.perf_counter() - started


def row(store: str, name: str, durations: list[float], finalize: float, stored: str) -> str:
    p99 = statistics.quantiles(durations, n=100)[98]
    cells = [store, name, f"{statistics.median(durations) * 1e3:.3f}", f"{p99 * 1e3:.3f}"]
    cells += [f"{max(durations) * 1e3:.1f}", f"{finalize:.2f}", stored]
    return "| " + " | ".join(cells) + " |"


def stored_steps(uri: str, run_id: str) -> str:
    return str(len(MlflowClient(uri).get_metric_history(run_id, "OptimizeLoss/gradients/layer0.weight/norm")))


def drain(uri: str, run_id: str, steps: int, metrics: int, spill: Path, merge: bool) -> tuple[float, int]:
    """Seconds to deliver ``steps`` queued records of ``metrics`` values each, and the ``log_batch`` calls made."""
    sender = Sender(uri)
    delivery = Delivery(sender, spill, max_queue=steps + 1, merge=merged if merge else None)
    timestamp = int(time.time() * 1000)
    keys = [f"backlog/{'merged' if merge else 'single'}/m{i}" for i in range(metrics)]
    records = [
        batch_record(run_id, [Metric(key, 1.0 / (step + 1 + i), timestamp, step) for i, key in enumerate(keys)])
        for step in range(steps)
    ]
    started = time.perf_counter()
    for record in records:
        delivery.put(record)
    report = delivery.close(timeout=3600.0)
    assert report.undelivered == 0 and report.delivered == steps, report
    return time.perf_counter() - started, sender.calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--metrics", type=int, default=25)
    parser.add_argument("--backlog", type=int, default=1000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mlflow_server import MlflowServer  # the tests' loopback server

    root = Path(tempfile.mkdtemp(prefix="mlflow-logging-benchmark-"))
    sqlite_uri = f"sqlite:///{root / 'embedded.db'}"
    MlflowClient(sqlite_uri).search_experiments()  # creates the schema (seconds) before any timing
    loggers: dict[str, Callable[..., Logger]] = {"stock": StockMLFlowLogger, "ours": MLFlowLogger}
    print(f"{args.steps} logged steps of {args.metrics} metrics; milliseconds on the training thread per step\n")
    print("| store | logger | median ms | p99 ms | max ms | finalize s | steps stored |")
    print("|---|---|---|---|---|---|---|")
    (root / "server").mkdir()
    server = MlflowServer(root / "server")
    server.start(timeout=600.0)  # seconds on an idle machine, minutes on a loaded one
    try:
        for store, uri in (("sqlite", sqlite_uri), ("http", server.uri)):
            for name, make in loggers.items():
                logger = make(experiment_name=f"bench-{uuid.uuid4().hex[:8]}", tracking_uri=uri)
                durations, finalize = time_logging(logger, args.steps, args.metrics)
                print(row(store, name, durations, finalize, stored_steps(uri, logger.run_id)), flush=True)
        logger = MLFlowLogger(
            experiment_name=f"bench-{uuid.uuid4().hex[:8]}", tracking_uri=server.uri, flush_timeout=1.0,
            spill_dir=root / "spill",
        )  # fmt: skip
        logger.run_id  # noqa: B018 (creates the run while the server is up)
        server.kill()
        with warnings.catch_warnings():  # the outage and spill warnings: expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            durations, finalize = time_logging(logger, args.steps, args.metrics)
        print(row("http, server killed", "ours", durations, finalize, "0 (spilled to a file)"))
        server.start(timeout=600.0)

        print("\n| store | logger | median ms | p99 ms | max ms | finalize s | steps stored |")
        print("|---|---|---|---|---|---|---|")
        for durable in (False, True):
            logger = MLFlowLogger(
                experiment_name=f"bench-{uuid.uuid4().hex[:8]}", tracking_uri=server.uri, durable=durable,
                spill_dir=root / f"durable-{durable}",
            )  # fmt: skip
            durations, finalize = time_logging(logger, args.steps, args.metrics)
            name = f"ours, durable={durable}"
            print(row("http", name, durations, finalize, stored_steps(server.uri, logger.run_id)), flush=True)

        run_id = MlflowClient(server.uri).create_run(MlflowClient(server.uri).create_experiment("backlog")).info.run_id
        print(f"\nbacklog of {args.backlog} logged steps x {args.metrics} metrics, drained to the server\n")
        print("| delivery | log_batch calls | seconds | steps per second |")
        print("|---|---|---|---|")
        timed = {}
        for merge in (False, True):
            seconds, calls = drain(server.uri, run_id, args.backlog, args.metrics, root / f"drain-{merge}.jsonl", merge)
            timed[merge] = seconds
            name = "merged (as few calls as the limits allow)" if merge else "one call per record"
            print(f"| {name} | {calls} | {seconds:.2f} | {args.backlog / seconds:.0f} |", flush=True)
        print(f"\nmerged drains {timed[False] / timed[True]:.1f}x faster")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
