"""MLflow records: what :class:`~lightning_optloss.MLFlowLogger` queues, spills and replays, and their delivery.

A record is one MLflow call, as a JSON object (one per line in the ``*.jsonl`` spill files):

.. code-block:: text

    {"type": "batch", "run_id": "<run id>",
     "metrics": [{"key": "OptimizeLoss/loss", "value": 0.25, "timestamp": 1764063000123, "step": 7}, ...],
     "params": [{"key": "lr", "value": "0.1"}, ...],
     "tags": [{"key": "team", "value": "vision"}, ...]}
    {"type": "artifact", "run_id": "<run id>", "local_path": "/abs/path/epoch=0-step=7.ckpt",
     "artifact_path": "epoch=0-step=7"}
    {"type": "status", "run_id": "<run id>", "status": "FINISHED", "end_time": 1764063009000}
    {"type": "image", "run_id": "<run id>", "local_path": "/abs/path/image.png", "key": "OptimizeLoss/gradient_norms",
     "step": 500, "timestamp": 1764063000123, "uuid": "<uuid4>"}

- ``batch``: one ``log_batch`` (one per logged step; ``metrics``, ``params`` and ``tags`` may each be empty).
  ``timestamp`` (milliseconds since the epoch) and ``step`` are those of the original call, so a replay shows
  the same curves. ``value`` may be ``NaN``/``Infinity`` (Python's JSON). Params are strings.
- ``artifact``: upload the file at ``local_path`` (absolute) into ``artifact_path`` (``null``: the run's
  artifact root). The file must still exist when the record is delivered.
- ``status``: ``set_terminated`` with the run status and the end time (milliseconds) of the original call.
- ``image``: ``MlflowClient.log_image(run_id, image, key=key, step=step, timestamp=timestamp)`` for the PNG at
  ``local_path``: the PNG and its 256-pixel WebP thumbnail go to ``images/<key, / as ~>+step+<step>+timestamp+
  <timestamp>+<uuid>[+compressed].{png,webp}`` (MLflow's names, which its image grid reads) and the run gets
  the tag ``mlflow.loggedImages``. The ``uuid`` is chosen when the record is made, so a record sent twice
  overwrites its own files instead of showing twice in the grid.

A record refused by the server (see :func:`is_permanent`) is written with an extra ``"error"`` key.

Delivery (:class:`Sender`) is MLflow's client with one change for ``http(s)://`` tracking URIs: each request is
tried once, with a timeout, instead of MLflow's own retry policy (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7
retries with backoff factor 2 by default, which keeps one call busy for minutes and cannot be interrupted);
the caller (the delivery worker, or the replay) decides when to try again. Artifact uploads through a server's
artifact proxy (``mlflow-artifacts:``) still use MLflow's settings. Sending a record twice is harmless: MLflow
stores a metric with the same key, value, step and timestamp once, a param with the same value is accepted
again, tags and artifacts are overwritten, and the status is set again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lightning_optloss.common.redaction import redact
from lightning_optloss.mlflow._private import SingleTryRestStore, SingleTryTrackingClient, TrackingServiceClient
from lightning_optloss.mlflow.delivery import Record

try:  # MLflow's per-call limits of log_batch, so a future MLflow that raises them is followed
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - the values of MLflow 3.17
    MAX_METRICS_PER_BATCH = 1000
    MAX_PARAMS_TAGS_PER_BATCH = 100

RECORD_TYPES = ("batch", "artifact", "status", "image")
STAGED_TYPES = ("artifact", "image")
"""The record types whose ``local_path`` is a staged file (in the spill file's own ``.artifacts/`` folder)."""


def batch_record(
    run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()
) -> Record:
    """A ``log_batch`` call as a record (metric values as floats, params and tags as strings)."""
    return {
        "type": "batch",
        "run_id": run_id,
        "metrics": [
            {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp), "step": int(m.step)} for m in metrics
        ],
        "params": [{"key": p.key, "value": redact(str(p.value))} for p in params],
        "tags": [{"key": t.key, "value": redact(str(t.value))} for t in tags],
    }


def artifact_record(run_id: str, local_path: str, artifact_path: str | None) -> Record:
    return {"type": "artifact", "run_id": run_id, "local_path": local_path, "artifact_path": artifact_path}


def status_record(run_id: str, status: str, end_time: int) -> Record:
    """``set_terminated`` with ``end_time`` in milliseconds since the epoch."""
    return {"type": "status", "run_id": run_id, "status": status, "end_time": end_time}


def image_record(run_id: str, local_path: str, key: str, step: int, timestamp: int) -> Record:
    """``log_image`` of the PNG at ``local_path`` under ``key`` at ``step`` (``timestamp`` in milliseconds)."""
    return {
        "type": "image",
        "run_id": run_id,
        "local_path": local_path,
        "key": key,
        "step": int(step),
        "timestamp": int(timestamp),
        "uuid": str(uuid.uuid4()),
    }


@dataclass
class RecordFile:
    """What :func:`read_records` found in a jsonl file: the records, and each line it skipped (number, why)."""

    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def read_records(path: Path) -> RecordFile:
    """The records of a jsonl file, skipping (and listing by line number) each line that is not a record.

    A line is skipped when it is not UTF-8 JSON (a crash leaves a half-written last line) or not a well-formed
    record (:func:`malformation`). ``OSError`` when the file cannot be read at all.
    """
    found = RecordFile()
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                found.skipped.append((number, f"not a JSON object ({error})"))
                continue
            problem = malformation(record)
            if problem is not None:
                found.skipped.append((number, problem))
                continue
            found.records.append(record)
    return found


def spill_files(folder: Path) -> list[Path]:
    """The spill files in ``folder`` (``mlflow-*.jsonl``, without the rejected ones), oldest first."""
    found = [path for path in folder.glob("mlflow-*.jsonl") if not path.name.endswith(".rejected.jsonl")]
    return sorted(found, key=lambda path: (path.stat().st_mtime, path.name))


def malformation(record: object) -> str | None:
    """Why ``record`` is not a record that :class:`Sender` can send (None when it is one)."""
    if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES:
        return f"not a record (a JSON object with a type in {RECORD_TYPES})"
    if not isinstance(record.get("run_id"), str) or not record["run_id"]:
        return f"a {record['type']} record without a run_id"
    if record["type"] == "batch":
        for part, fields in (("metrics", ("key", "value", "timestamp", "step")), ("params", ("key", "value"))):
            entries = record.get(part)
            if not isinstance(entries, list) or not all(isinstance(e, dict) and set(fields) <= set(e) for e in entries):
                return f"a batch record whose {part} are not a list of objects with {', '.join(fields)}"
        if not isinstance(record.get("tags"), list):
            return "a batch record whose tags are not a list"
    elif record["type"] == "artifact" and not isinstance(record.get("local_path"), str):
        return "an artifact record without a local_path"
    elif record["type"] == "image" and not (
        isinstance(record.get("local_path"), str)
        and isinstance(record.get("key"), str)
        and all(isinstance(record.get(name), int) for name in ("step", "timestamp"))
        and isinstance(record.get("uuid"), str)
    ):
        return "an image record without a local_path, key, step, timestamp and uuid"
    elif record["type"] == "status" and not (
        isinstance(record.get("status"), str) and isinstance(record.get("end_time"), int)
    ):
        return "a status record without a status and an end_time"
    return None


def outside_staging(record: Record, spill_path: Path) -> str | None:
    """For an artifact or image record read from ``spill_path``: its file when that is not under the spill file's
    own ``<name>.artifacts/`` folder (replay refuses to upload it), else None."""
    if record["type"] not in STAGED_TYPES:
        return None
    staging = spill_path.resolve().with_suffix(".artifacts")
    local = Path(record["local_path"])
    if local.is_absolute() and staging in Path(os.path.normpath(local)).parents and not local.is_symlink():
        return None
    return record["local_path"]


def merged(first: Record, second: Record) -> Record | None:
    """One ``log_batch`` record doing what ``first`` then ``second`` do, or None when one call cannot.

    Only batch records of the same run merge, within MLflow's per-call limits (:data:`MAX_METRICS_PER_BATCH`
    metrics, :data:`MAX_PARAMS_TAGS_PER_BATCH` params plus tags). A param or tag key set by both stays two
    calls (MLflow refuses a batch that sets a param twice; the second value of a tag must win). Metrics keep
    their own step and timestamp, so the order of the points is kept.
    """
    if first["type"] != "batch" or second["type"] != "batch" or first["run_id"] != second["run_id"]:
        return None
    if len(first["metrics"]) + len(second["metrics"]) > MAX_METRICS_PER_BATCH:
        return None
    settings = len(first["params"]) + len(first["tags"]) + len(second["params"]) + len(second["tags"])
    if settings > MAX_PARAMS_TAGS_PER_BATCH:
        return None
    if second["params"] or second["tags"]:
        keys = {("p", p["key"]) for p in first["params"]} | {("t", t["key"]) for t in first["tags"]}
        if keys & ({("p", p["key"]) for p in second["params"]} | {("t", t["key"]) for t in second["tags"]}):
            return None
    return {
        "type": "batch",
        "run_id": first["run_id"],
        "metrics": first["metrics"] + second["metrics"],
        "params": first["params"] + second["params"],
        "tags": first["tags"] + second["tags"],
    }


class MalformedRecordError(ValueError):
    """A record that is not one :class:`Sender` can send (see :func:`malformation`): refused, never retried."""


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot help: MLflow refused the record (a 4xx other than 408/429), the record is
    malformed, or its file is gone."""
    if isinstance(error, (FileNotFoundError, MalformedRecordError)):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


def failure_kind(error: BaseException) -> str:
    """What a failed send says of the server, in words: ``"too slow"`` (no answer within the request timeout),
    ``"answered 503"`` (a 5xx or 429 answer), or ``"unreachable"`` (no connection, or anything else)."""
    chain: BaseException | None = error
    while chain is not None:
        if isinstance(chain, (requests.exceptions.Timeout, TimeoutError)):
            return "too slow"
        chain = chain.__cause__ or chain.__context__
    if isinstance(error, MlflowException) and "failed with exception" not in error.message:
        return f"answered {error.get_http_status_code()}"  # MLflow wraps connection errors in "failed with exception"
    return "unreachable"


def summary(records: Iterable[Record]) -> str:
    """What records hold, in words: ``"3 metric values at 2 steps, 1 param, 1 artifact, status FINISHED"``."""
    counts = {"metric value": 0, "param": 0, "tag": 0, "artifact": 0, "image": 0}
    steps: set[int] = set()
    statuses: list[str] = []
    for record in records:
        if record["type"] == "batch":
            counts["metric value"] += len(record["metrics"])
            counts["param"] += len(record["params"])
            counts["tag"] += len(record["tags"])
            steps.update(metric["step"] for metric in record["metrics"])
        elif record["type"] in ("artifact", "image"):
            counts[record["type"]] += 1
        else:
            statuses.append(record["status"])
    parts = [f"{count} {name}{'s' if count != 1 else ''}" for name, count in counts.items() if count]
    if counts["metric value"]:
        parts[0] += f" at {len(steps)} step{'s' if len(steps) != 1 else ''}"
    parts += [f"status {status}" for status in statuses]
    return ", ".join(parts) or "nothing"


def _redact_error(error: BaseException) -> None:
    """Remove credentials from the messages of ``error`` and its causes (MLflow quotes the URL it called)."""
    seen: BaseException | None = error
    while seen is not None:
        seen.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in seen.args)
        if isinstance(getattr(seen, "message", None), str):
            seen.message = redact(seen.message)  # type: ignore[attr-defined]
        seen = seen.__cause__ or seen.__context__


class Sender:
    """Delivers records to the tracking server (or store) at ``tracking_uri``, one MLflow call per record.

    A request that times out makes the next ones wait longer: the timeout doubles after each timeout, up to
    ``TIMEOUT_GROWTH`` times ``request_timeout``, and is back to ``request_timeout`` after a success, so a
    server slower than ``request_timeout`` is not sent the same record at the same timeout forever.

    Args:
        tracking_uri: Where the run lives, e.g. ``http://127.0.0.1:5000`` or ``sqlite:///mlflow.db``.
        request_timeout: Seconds one HTTP request may take (``http(s)://`` URIs only). Default 10.
    """

    TIMEOUT_GROWTH = 8

    def __init__(self, tracking_uri: str, request_timeout: float = 10.0) -> None:
        self.tracking_uri = tracking_uri
        self.request_timeout = request_timeout
        self.calls = 0
        self._store: SingleTryRestStore | None = None
        if tracking_uri.startswith(("http://", "https://")):
            client = SingleTryTrackingClient(tracking_uri, request_timeout)
            self._store = client.store
            self._client: TrackingServiceClient = client
        else:
            self._client = TrackingServiceClient(tracking_uri)

    @property
    def timeout(self) -> float:
        """The request timeout now (seconds): ``request_timeout``, grown after timeouts."""
        return self._store.timeout if self._store is not None else self.request_timeout

    def __call__(self, record: Record) -> None:
        self.calls += 1
        try:
            self._call(record)
        except Exception as error:
            _redact_error(error)
            if self._store is not None and failure_kind(error) == "too slow":
                self._store.timeout = min(self._store.timeout * 2, self.request_timeout * self.TIMEOUT_GROWTH)
            raise
        if self._store is not None:
            self._store.timeout = self.request_timeout

    def _call(self, record: Record) -> None:
        problem = malformation(record)
        if problem is not None:
            raise MalformedRecordError(problem)
        run_id = record["run_id"]
        kind = record["type"]
        if kind == "batch":
            self._client.log_batch(
                run_id,
                metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in record["metrics"]],
                params=[Param(p["key"], p["value"]) for p in record["params"]],
                tags=[RunTag(t["key"], t["value"]) for t in record["tags"]],
                synchronous=True,  # MLflow's async logging would drop the record on failure instead of raising
            )
        elif kind == "artifact":
            self._client.log_artifact(run_id, record["local_path"], record.get("artifact_path"))
        elif kind == "status":
            self._client.set_terminated(run_id, record["status"], record["end_time"])
        elif kind == "image":
            self._log_image(record)

    def _log_image(self, record: Record) -> None:
        """What ``MlflowClient.log_image`` uploads for a key and step, with the record's uuid in the names."""
        from mlflow.tracking.multimedia import compress_image_size
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES
        from PIL import Image

        run_id, source = record["run_id"], Path(record["local_path"])
        key = record["key"].replace("/", "~")
        name = f"{key}+step+{record['step']}+timestamp+{record['timestamp']}+{record['uuid']}"
        with tempfile.TemporaryDirectory() as folder, Image.open(source) as image:
            picture, thumbnail = Path(folder) / f"{name}.png", Path(folder) / f"{name}+compressed.webp"
            shutil.copyfile(source, picture)
            compress_image_size(image).save(thumbnail)
            self._client.log_artifact(run_id, str(picture), "images")
            self._client.log_artifact(run_id, str(thumbnail), "images")
        self._client.set_tag(run_id, MLFLOW_LOGGED_IMAGES, "True")
