"""Deliver the MLflow records that :class:`~lightning_optloss.MLFlowLogger` left in spill files.

.. code-block:: bash

    python -m lightning_optloss.mlflow_replay PATH [PATH ...] --tracking-uri URI [--request-timeout SECONDS]
        [--dry-run]

Each ``PATH`` is a spill file, or a folder: every spill file in it (``mlflow-*.jsonl``, not the
``*.rejected.jsonl`` ones), oldest first. Each file's records (format: :mod:`lightning_optloss.mlflow.records`)
are sent in order to the run they name, with their original steps, timestamps and end time.

- A line that is not a record (a crash leaves a half-written last line; a damaged or edited file) is reported
  by its number and skipped; every readable record is still delivered.
- A record the server refuses, or that is malformed, is reported as refused and skipped (sending it again
  cannot help).
- An ``artifact`` record is uploaded only when its file lies in the spill file's own ``<name>.artifacts/``
  folder (where the logger stages them); any other path is refused, naming it: a spill file cannot make the
  replay upload ``/etc/passwd``.
- When the server cannot be reached, or answers 5xx, or is too slow, the file is left at that record (later ones
  would be out of order) and the message says to run the same command again.

Running it again is safe (MLflow keeps one copy of a metric logged twice with the same step, timestamp and
value; params with the same value, tags, artifacts and the status are set again). The files are not modified:
delete them once delivered. Credentials in the tracking URI are never printed. ``--dry-run`` reads the files
and prints what would be sent, without contacting the server.

Exit status 0 when every record of every file was delivered, 1 when anything was skipped, refused or left, 2
for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_optloss.common.redaction import redact
from lightning_optloss.mlflow.delivery import Record
from lightning_optloss.mlflow.records import (
    RecordFile,
    Sender,
    failure_kind,
    is_permanent,
    outside_staging,
    read_records,
    spill_files,
    summary,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_optloss.mlflow_replay",
        description="Deliver MLflow records left by lightning_optloss.MLFlowLogger (*.jsonl) to a tracking server.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="spill files (*.jsonl), in order, or folders of them"
    )
    parser.add_argument("--tracking-uri", required=True, help="the tracking server or store of the run")
    parser.add_argument(
        "--request-timeout", type=float, default=10.0, help="seconds one HTTP request may take (default 10)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    args = parser.parse_args(argv)
    sender: Sender | None = None  # made once a file is read: opening a store can create it
    complete = True
    for path in files(args.paths):
        try:
            found = read_records(path)
        except OSError as error:
            print(f"{path}: cannot read it: {redact(str(error))}", file=sys.stderr)
            complete = False
            continue
        for number, why in found.skipped:
            print(f"{path}:{number}: skipped: {why}", file=sys.stderr)
        if args.dry_run:
            complete = dry_run(path, found, args.tracking_uri) and complete
            continue
        sender = sender or Sender(args.tracking_uri, args.request_timeout)
        complete = replay(sender, path, found.records) and not found.skipped and complete
    return 0 if complete else 1


def files(paths: Sequence[Path]) -> list[Path]:
    """The spill files named by ``paths``: files as given, folders expanded to their spill files, oldest first."""
    found: list[Path] = []
    for path in paths:
        found += spill_files(path) if path.is_dir() else [path]
    return found


def dry_run(path: Path, found: RecordFile, tracking_uri: str) -> bool:
    """Print what :func:`replay` would send from ``path``; True when it would send every record."""
    refused = [
        (position, local)
        for position, record in enumerate(found.records, start=1)
        if (local := outside_staging(record, path))
    ]
    for position, local in refused:
        print(
            f"{path}: record {position} ({found.records[position - 1]['type']}) would be refused: {local} is "
            f"outside {_staging(path)}"
        )
    sent = [record for position, record in enumerate(found.records, start=1) if position not in dict(refused)]
    print(
        f"{path}: would send {len(sent)} of {len(found.records)} records to run {_runs(found.records)} at "
        f"{redact(tracking_uri)} ({summary(sent)})."
    )
    return not refused and not found.skipped


def replay(sender: Sender, path: Path, records: list[Record]) -> bool:
    """Send ``records`` (read from ``path``) in order and print what was delivered; True when all of them were."""
    delivered: list[Record] = []
    refused = 0
    for position, record in enumerate(records, start=1):
        local = outside_staging(record, path)
        if local is not None:
            print(
                f"{path}: record {position} ({record['type']}) refused: {local} is outside {_staging(path)}, where the "
                "logger stages the files it uploads; copy it there to upload it",
                file=sys.stderr,
            )
            refused += 1
            continue
        try:
            sender(record)
        except Exception as error:
            message = redact(str(error))
            if not is_permanent(error):
                print(
                    f"{path}: stopped at record {position} of {len(records)} ({record['type']}): the server is "
                    f"{failure_kind(error)} ({message}). Nothing after it was sent; run the same command again "
                    "once the server answers.",
                    file=sys.stderr,
                )
                break
            print(f"{path}: record {position} ({record['type']}) refused: {message}", file=sys.stderr)
            refused += 1
            continue
        delivered.append(record)
    print(
        f"{path}: delivered {len(delivered)} of {len(records)} records to run {_runs(records)} at "
        f"{redact(sender.tracking_uri)} ({summary(delivered)})" + (f"; {refused} refused" if refused else "") + "."
    )
    return len(delivered) == len(records)


def _runs(records: list[Record]) -> str:
    return ", ".join(sorted({record["run_id"] for record in records})) or "-"


def _staging(path: Path) -> Path:
    return path.resolve().with_suffix(".artifacts")


if __name__ == "__main__":
    sys.exit(main())
