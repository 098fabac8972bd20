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

import functools
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import http_request, verify_rest_response

from lightning_optloss.mlflow.delivery import Record

RECORD_TYPES = ("batch", "artifact", "status", "image")


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
        "params": [{"key": p.key, "value": str(p.value)} for p in params],
        "tags": [{"key": t.key, "value": str(t.value)} for t in tags],
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


def read_records(path: Path) -> list[Record]:
    """The records of a jsonl file; a ``ValueError`` naming the line when one is not a record."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
            if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES or "run_id" not in record:
                raise ValueError(
                    f"{path}:{number}: not a record (a JSON object with a run_id and a type in {RECORD_TYPES})"
                )
            records.append(record)
    return records


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot help: MLflow refused the record (a 4xx other than 408/429) or its file is gone."""
    if isinstance(error, FileNotFoundError):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


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


class Sender:
    """Delivers records to the tracking server (or store) at ``tracking_uri``, one MLflow call per record.

    Args:
        tracking_uri: Where the run lives, e.g. ``http://127.0.0.1:5000`` or ``sqlite:///mlflow.db``.
        request_timeout: Seconds one HTTP request may take (``http(s)://`` URIs only). Default 10.
    """

    def __init__(self, tracking_uri: str, request_timeout: float = 10.0) -> None:
        self.tracking_uri = tracking_uri
        if tracking_uri.startswith(("http://", "https://")):
            self._client: TrackingServiceClient = _SingleTryTrackingClient(tracking_uri, request_timeout)
        else:
            self._client = TrackingServiceClient(tracking_uri)

    def __call__(self, record: Record) -> None:
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
            self._client.log_artifact(run_id, record["local_path"], record["artifact_path"])
        elif kind == "status":
            self._client.set_terminated(run_id, record["status"], record["end_time"])
        elif kind == "image":
            self._log_image(record)
        else:
            raise ValueError(f"unknown record type {kind!r}; expected one of {RECORD_TYPES}")

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


class _SingleTryRestStore(RestStore):
    """MLflow's REST store with each request tried once, ``timeout`` seconds at most (MLflow's own
    ``RestStore._get_server_version`` does the same, noting that the default retry policy takes minutes)."""

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        super().__init__(functools.partial(get_default_host_creds, tracking_uri))
        self._timeout = timeout

    def _call_endpoint(
        self,
        api: Any,
        json_body: str | None = None,
        endpoint: str | None = None,
        retry_timeout_seconds: float | None = None,
        response_proto: Any = None,
    ) -> Any:
        if api in self._V3_APIS:  # not used to deliver records
            return super()._call_endpoint(api, json_body, endpoint, retry_timeout_seconds, response_proto)
        default_endpoint, method = self._METHOD_TO_INFO[api]
        endpoint = endpoint or default_endpoint
        body = json.loads(json_body) if json_body is not None else None
        response = http_request(
            self.get_host_creds(),
            endpoint,
            method,
            max_retries=0,
            timeout=self._timeout,
            **{"params" if method == "GET" else "json": body},
        )
        response = verify_rest_response(response, endpoint)
        response_proto = response_proto or api.Response()
        if response.status_code != 204:
            parse_dict(js_dict=json.loads(response.text), message=response_proto)
        return response_proto


class _SingleTryTrackingClient(TrackingServiceClient):
    """MLflow's tracking client on a :class:`_SingleTryRestStore`."""

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        self._single_try_store = _SingleTryRestStore(tracking_uri, timeout)
        super().__init__(tracking_uri)

    @property
    def store(self) -> RestStore:
        return self._single_try_store
