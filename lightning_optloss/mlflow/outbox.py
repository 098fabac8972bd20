"""The spill folder of :class:`~lightning_optloss.MLFlowLogger` as the logger finds it and leaves it.

- :class:`Leftovers`: the spill files an earlier process left in the folder. Those of the same run (a resumed
  run) are delivered first, in order: the oldest becomes the new delivery's spill file (it is continued), the
  records of the others are queued behind it and their files removed. Those of other runs get one warning with
  the command that delivers them.
- :func:`remove_staged`: a staged artifact copy, once uploaded.
- :func:`disk_message`, :func:`dropped_message`: what the warnings say of a disk that refused a write.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_optloss.common.redaction import redact
from lightning_optloss.mlflow.delivery import Delivery, Record
from lightning_optloss.mlflow.records import read_records, spill_files, summary

_SPILL_NAME = re.compile(r"mlflow-(?P<run_id>[^-]+)-\d{8}-\d{6}\.jsonl")


@dataclass
class Leftovers:
    """Spill files found in a folder when a logger starts: ``same_run`` (oldest first) and ``others``."""

    folder: Path
    same_run: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    skipped_lines: int = 0

    @classmethod
    def find(cls, folder: Path, run_id: str) -> Leftovers:
        """The spill files in ``folder`` (none when it cannot be listed)."""
        found = cls(folder)
        try:
            files = spill_files(folder)
        except OSError:
            return found
        for path in files:
            match = _SPILL_NAME.fullmatch(path.name)
            (found.same_run if match and match["run_id"] == run_id else found.others).append(path)
        return found

    @property
    def spill_path(self) -> Path | None:
        """The oldest spill file of the same run, which the new delivery continues (None when there is none)."""
        return self.same_run[0] if self.same_run else None

    def later_records(self) -> list[Record]:
        """The records of the other spill files of the same run, in order (unreadable lines skipped, counted)."""
        records: list[Record] = []
        for path in self.same_run[1:]:
            with contextlib.suppress(OSError):
                found = read_records(path)
                records += found.records
                self.skipped_lines += len(found.skipped)
        return records

    def remove_later_files(self) -> None:
        for path in self.same_run[1:]:
            with contextlib.suppress(OSError):
                path.unlink()

    def messages(self, tracking_uri: str) -> list[str]:
        """What to tell the user: the leftovers delivered first, and those of other runs with their command."""
        messages = []
        if self.same_run:
            messages.append(
                f"found {len(self.same_run)} spill file(s) of this run left by an earlier process in {self.folder} "
                f"({', '.join(path.name for path in self.same_run)}); their records are delivered first"
                + (f" ({self.skipped_lines} unreadable lines skipped)" if self.skipped_lines else "")
                + "."
            )
        if self.others:
            messages.append(
                f"found {len(self.others)} spill file(s) of other runs in {self.folder}, left undelivered by "
                f"earlier processes ({', '.join(path.name for path in self.others)}). Deliver them with: "
                f"{replay_command(self.others, tracking_uri)}"
            )
        return messages


def remove_staged(path: Path) -> None:
    """Remove ``path`` and its numbered folder when they are a staged copy (``<spill>.artifacts/<n>/<file>``)."""
    if path.parent.parent.suffix == ".artifacts" and path.parent.name.isdigit():
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
            path.parent.rmdir()


@dataclass
class DropTally:
    """The records a disk fault made the logger drop, in short: what they held and their step range."""

    records: int = 0
    held: list[Record] = field(default_factory=list)
    first_step: int | None = None
    last_step: int | None = None

    def add(self, record: Record) -> None:
        self.records += 1
        steps = [metric["step"] for metric in record["metrics"]] if record["type"] == "batch" else []
        if steps:
            self.first_step = min(steps + ([self.first_step] if self.first_step is not None else []))
            self.last_step = max(steps + ([self.last_step] if self.last_step is not None else []))
        # what summary() needs, without the values: memory stays small however much is dropped
        self.held.append({**record, "metrics": [{"step": m["step"]} for m in record.get("metrics", ())]})
        if len(self.held) > 64:
            batches = [held for held in self.held if held["type"] == "batch"]
            self.held = [held for held in self.held if held["type"] != "batch"] + [_merge_counts(batches)]

    def describe(self) -> str:
        span = f", steps {self.first_step} to {self.last_step}" if self.first_step is not None else ""
        return f"{self.records} records ({summary(self.held)}{span})"


def _merge_counts(records: list[Record]) -> Record:
    """One batch-shaped record whose counts are those of ``records`` (statuses and artifacts kept apart)."""
    kept = {"type": "batch", "run_id": "", "metrics": [], "params": [], "tags": []}
    for record in records:
        for part in ("metrics", "params", "tags"):
            kept[part] += record.get(part, [])
    return kept


def disk_message(delivery: Delivery) -> str:
    """The warning for the first write the disk refused: the cause is the disk, not MLflow."""
    error = delivery.disk.error
    return (
        f"cannot write to the spill folder {delivery.spill_path.parent} ({type(error).__name__}: {error}); this is "
        "a disk problem, not an MLflow one. Training goes on: records wait in memory (up to twice max_queue and "
        "max_queue_bytes; beyond that the newest are dropped and counted), artifacts that cannot be staged are "
        "uploaded directly, and the spill file is tried again at each overflow."
    )


def dropped_message(delivery: Delivery, tally: DropTally) -> str:
    """The warning for what the disk made the logger drop: how many, which steps, and why."""
    disk = delivery.disk
    return (
        f"dropped {tally.describe()} that neither memory nor the spill folder {delivery.spill_path.parent} could "
        f"hold ({type(disk.error).__name__}: {disk.error}; {disk.failed_writes} failed writes). They are not in "
        "the MLflow run."
    )


def replay_command(spill_path: Path | Sequence[Path], tracking_uri: str) -> str:
    """The shell command that delivers the records of ``spill_path`` (one or several) to ``tracking_uri``.

    A password in the URI is shown as ``***`` (put it back, or give it in ``MLFLOW_TRACKING_PASSWORD``).
    """
    paths = [str(spill_path)] if isinstance(spill_path, Path) else [str(path) for path in spill_path]
    command = [sys.executable, "-m", "lightning_optloss.mlflow_replay", *paths, "--tracking-uri", redact(tracking_uri)]
    return shlex.join(command)
