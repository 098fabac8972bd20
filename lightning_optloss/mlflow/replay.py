"""Deliver the MLflow records that :class:`~lightning_optloss.MLFlowLogger` left in a spill file.

.. code-block:: bash

    python -m lightning_optloss.mlflow_replay FILE [FILE ...] --tracking-uri URI [--request-timeout SECONDS]

Each file's records (format: :mod:`lightning_optloss.mlflow.records`) are sent in order to the run they name,
with their original steps, timestamps and end time. A record the server refuses is reported and skipped; when
the server cannot be reached the file is left at that record (later ones would be out of order). Running it
again is safe (MLflow keeps one copy of a metric logged twice with the same step, timestamp and value; params
with the same value, tags, artifacts and the status are set again). The files are not modified: delete them
once delivered. Exit status 0 when every record of every file was delivered, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_optloss.mlflow.delivery import Record
from lightning_optloss.mlflow.records import Sender, is_permanent, read_records, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_optloss.mlflow_replay",
        description="Deliver MLflow records left by lightning_optloss.MLFlowLogger (*.jsonl) to a tracking server.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="spill files (*.jsonl), in order")
    parser.add_argument("--tracking-uri", required=True, help="the tracking server or store of the run")
    parser.add_argument(
        "--request-timeout", type=float, default=10.0, help="seconds one HTTP request may take (default 10)"
    )
    args = parser.parse_args(argv)
    sender: Sender | None = None  # made once a file is read: opening a store can create it
    complete = True
    for path in args.files:
        try:
            records = read_records(path)
        except (OSError, ValueError) as error:
            print(f"{path}: cannot read it: {error}", file=sys.stderr)
            complete = False
            continue
        sender = sender or Sender(args.tracking_uri, args.request_timeout)
        complete = replay(sender, path, records) and complete
    return 0 if complete else 1


def replay(sender: Sender, path: Path, records: list[Record]) -> bool:
    """Send ``records`` in order and print what was delivered; True when all of them were."""
    delivered: list[Record] = []
    refused = 0
    for position, record in enumerate(records, start=1):
        try:
            sender(record)
        except Exception as error:
            if not is_permanent(error):
                print(
                    f"{path}: stopped at record {position} of {len(records)} ({record['type']}): {error}. Nothing "
                    "after it was sent; run the same command again once the server answers.",
                    file=sys.stderr,
                )
                break
            print(f"{path}: record {position} ({record['type']}) refused: {error}", file=sys.stderr)
            refused += 1
            continue
        delivered.append(record)
    runs = ", ".join(sorted({record["run_id"] for record in records})) or "-"
    print(
        f"{path}: delivered {len(delivered)} of {len(records)} records to run {runs} at {sender.tracking_uri} "
        f"({summary(delivered)})" + (f"; {refused} refused" if refused else "") + "."
    )
    return len(delivered) == len(records)


if __name__ == "__main__":
    sys.exit(main())
