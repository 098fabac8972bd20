"""``lightning_optloss.MLFlowLogger``: Lightning's MLFlowLogger that keeps training going and keeps every record
when the MLflow server is slow or away.

Lightning's stock logger calls the server on the training thread, once per logged step; when the server is
unreachable that call blocks for MLflow's whole retry policy (minutes) and then raises, which stops the run.
This subclass has the same constructor and the same behaviour otherwise, but queues every call that reaches the
server once the run exists (metrics, hyperparameters, tags, checkpoint artifacts, the final status) and sends
them from a worker thread (:mod:`lightning_optloss.mlflow.delivery`), in order, merging consecutive records into
as few ``log_batch`` calls as MLflow's per-call limits allow. The record
format of the spill files is described in :mod:`lightning_optloss.mlflow.records`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from argparse import Namespace
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as StockMLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from typing_extensions import override

from lightning_optloss.common import validation
from lightning_optloss.common.redaction import redact
from lightning_optloss.mlflow import outbox
from lightning_optloss.mlflow import records as mlflow_records
from lightning_optloss.mlflow.delivery import Delivery, Record, make_private_folder

_OWNER = "MLFlowLogger"
_IMAGE_KEY = re.compile(r"[a-zA-Z0-9_\-./ ]+")  # what MlflowClient.log_image accepts
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
_STOCK_WARNING = (
    "Lightning's MLFlowLogger sends every logged step to the MLflow server on the training thread: it blocks "
    "training, and loses records or stops the run, when the server is unreachable. Use "
    "lightning_optloss.MLFlowLogger (same arguments), which sends them from a background thread and keeps them "
    "on disk while the server is away."
)


def create_sqlite_store_once(tracking_uri: str | None) -> None:
    """Create the tables of a new ``sqlite:///`` store under a lock file, so concurrent processes do not race.

    MLflow creates a new sqlite store's schema on first open, and two processes doing so at once collide. Other
    URIs, and platforms without ``fcntl``, are left alone.
    """
    if not tracking_uri or not tracking_uri.startswith("sqlite:///") or sys.platform == "win32":
        return
    import fcntl

    database = Path(tracking_uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def tag_experiment_kind(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment ``mlflow.experimentKind=custom_model_development`` unless it has that tag already.

    MLflow 3's UI opens an experiment without the tag in its GenAI view ("Evaluation runs"); with it, in the
    model-training view (runs, charts, the image grid). A value the user set is left as it is.
    """
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, CUSTOM_MODEL_DEVELOPMENT)


class MLFlowLogger(StockMLFlowLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger`, with the server calls off the training thread.

    The positional arguments are the stock logger's (``experiment_name``, ``run_name``, ``tracking_uri``,
    ``tags``, ``save_dir``, ``log_model``, ``prefix``, ``artifact_location``, ``run_id``, ``synchronous``), with
    the same meaning and defaults; metric keys, param truncation, checkpoint logging and statuses are the stock
    logger's (its own methods run, with their client calls turned into queued records).

    **What is queued.** ``log_metrics`` (OptimizeLoss summaries and ``self.log`` alike: one record per call),
    ``log_hyperparams``, :meth:`log_tags`, :meth:`log_image`, checkpoints logged with ``log_model``
    (``after_save_checkpoint`` and ``finalize``) and the final status. A call returns after appending to a queue
    in memory; the training thread never waits for the network. Creating the run (the first access to
    :attr:`experiment`, before training) stays synchronous, with MLflow's own retry settings: a server that is
    down before training starts is an error at the start, not an outage. Calls made directly on
    :attr:`experiment` are MLflow's, synchronous.

    **Experiment kind.** An experiment this logger creates is tagged ``mlflow.experimentKind=
    custom_model_development`` (:func:`tag_experiment_kind`), MLflow's mark of a model-training experiment; an
    experiment that exists already is left as it is. (MLflow 3.17's UI lets its own GenAI / Model training
    switch win over the tag: see ``docs/mlflow-live-views.md``.)

    **Outages.** A failed send is retried with exponential backoff (0.5 s doubling to 15 s); the records behind
    it wait, in order; one warning per kind of failure says so, telling "cannot reach" from "answered 5xx/429"
    from "too slow" (a request that times out makes the next ones wait up to 8 times ``request_timeout``). A
    backlog drains in merged calls (1000 metrics, 100 params and tags per ``log_batch``). When more than
    ``max_queue`` records or ``max_queue_bytes`` bytes wait, the oldest go to the spill file
    (``<spill_dir>/mlflow-<run id>-<time>.jsonl``), from which they are delivered first once the server answers
    again. ``finalize`` (end of fit, and on exceptions: Lightning calls ``finalize("failed")``) flushes for at
    most ``flush_timeout`` seconds, then leaves what is undelivered in the spill file, the status last, and
    warns with the command that delivers it later (never raising)::

        python -m lightning_optloss.mlflow_replay FILE --tracking-uri URI

    Records the server refuses (an invalid or changed param, a deleted run) are not retried: they go to
    ``mlflow-<run id>-<time>.rejected.jsonl`` with the error, with a warning. Artifact files are hard-linked (or
    copied) into ``mlflow-<run id>-<time>.artifacts/`` when queued, so that ModelCheckpoint may delete or
    overwrite a checkpoint before its upload; replay uploads from that folder only. Only rank 0 logs, so the
    worker thread only exists there.

    **Disk faults.** A write to the spill folder that fails (full, read-only, not writable, I/O error) never
    reaches training: records stay in memory up to twice the bounds, then the newest are dropped; an artifact
    that cannot be staged is uploaded directly (three tries); one warning names the disk as the cause, and one
    at the end counts what was dropped and its steps. **Leftovers**: at the first record, spill files of the
    same run in ``spill_dir`` (a resumed run) are delivered first; those of other runs get one warning with
    the replay command. **Security**: spill files are created 0600 and folders 0700; credentials in the
    tracking URI (``user:password@``, token query parameters) are replaced by ``***`` in every warning, log,
    replay command, spill file, param and tag. See ``docs/mlflow-outages.md``.

    Args:
        max_queue: Records kept in memory before the oldest are moved to the spill file. Default 1000.
        max_queue_bytes: Bytes (of the records' JSON) kept in memory before the oldest are moved to the spill
            file. Default 256 MiB; None: no bound by size. Queued records are held as their JSON lines.
        flush_timeout: Seconds ``finalize`` waits for the queue to be delivered. Default 30.
        spill_dir: Folder of the spill file and the staged artifacts. Default None: the working directory at the
            first logged record.
        request_timeout: Seconds one HTTP request to the tracking server may take. Default 10.
        durable: Append every record to the spill file before ``log_metrics`` returns (fsync at most every
            100 ms), so that a killed process (SIGKILL, OOM) loses nothing it logged, and a machine crash at most
            the last 100 ms. Default False: records wait in memory, lost if the process is killed.
        delivery_niceness: How many ``nice`` levels below the training thread's the worker thread runs
            (Linux; 0-19, at most down to 19; ignored elsewhere). Default 19: on a machine whose cores the
            training keeps busy (a CPU run, several processes per machine), storing metrics takes CPU time
            from idle moments, not from training; at ``finalize`` a thread at the training thread's priority
            delivers what is left. 0: the same priority as training, for runs whose metrics must reach the
            server as they are logged.

    ``synchronous`` is accepted and has no effect: records are always sent off the training thread, and
    synchronously by the worker (MLflow's asynchronous logging drops a batch that fails, instead of retrying it).

    Every process constructs the logger (the stock constructor opens the store); with an ``sqlite:///`` store,
    creating its tables is serialised with a lock file beside the database, so a multi-process launch on a new
    sqlite store does not fail with "table ... already exists".
    """

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = os.getenv("MLFLOW_TRACKING_URI"),
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        *,
        max_queue: int = 1000,
        max_queue_bytes: int | None = 256 * 2**20,
        flush_timeout: float = 30.0,
        spill_dir: str | os.PathLike[str] | None = None,
        request_timeout: float = 10.0,
        durable: bool = False,
        delivery_niceness: int = 19,
    ) -> None:
        if synchronous is not None and not isinstance(synchronous, bool):
            raise validation.invalid(_OWNER, "synchronous", "None, True or False", synchronous)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise validation.invalid(_OWNER, "max_queue", "an integer >= 1", max_queue)
        if max_queue_bytes is not None and (
            isinstance(max_queue_bytes, bool) or not isinstance(max_queue_bytes, int) or max_queue_bytes < 1
        ):
            raise validation.invalid(_OWNER, "max_queue_bytes", "None or an integer >= 1 (bytes)", max_queue_bytes)
        if spill_dir is not None and not isinstance(spill_dir, (str, os.PathLike)):
            raise validation.invalid(_OWNER, "spill_dir", "None or a folder path", spill_dir)
        if not isinstance(durable, bool):
            raise validation.invalid(_OWNER, "durable", "True or False", durable)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.durable = durable
        self.delivery_niceness = validation.integer(_OWNER, "delivery_niceness", delivery_niceness, minimum=0, below=20)
        self.flush_timeout = validation.real(_OWNER, "flush_timeout", flush_timeout, minimum=0.0)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.request_timeout = validation.real(_OWNER, "request_timeout", request_timeout, minimum=0.0, strictly=True)
        create_sqlite_store_once(tracking_uri)
        super().__init__(
            experiment_name, run_name, tracking_uri, tags, save_dir, log_model, prefix, artifact_location, run_id
        )
        self._reset_delivery()

    def _reset_delivery(self) -> None:
        """The runtime state: rebuilt after unpickling (``ddp_spawn``), created on rank 0 by the first record."""
        self._delivery: Delivery | None = None
        self._sender: mlflow_records.Sender | None = None
        self._staging: Path | None = None
        self._staged = itertools.count()
        self._warned: set[str] = set()
        self._local = threading.local()
        self._queueing_client = _QueueingClient(self)
        self._dropped = outbox.DropTally()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_delivery", "_sender", "_staging", "_staged", "_warned", "_local", "_queueing_client", "_dropped"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_delivery()

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        """The MLflow client, after creating the run (synchronously) on first access, as the stock logger does.

        While this logger's own methods run, a stand-in answers that queues each client call as a record.
        """
        creating = not self._initialized and self._run_id is None and self._experiment_id is None
        if creating:  # the stock logger creates the experiment unless one of this name is active
            existing = self._mlflow_client.get_experiment_by_name(self._experiment_name)
            creating = existing is None or existing.lifecycle_stage == "deleted"
        client = super().experiment
        if creating:
            tag_experiment_kind(client, self._experiment_id)
        return self._queueing_client if getattr(self._local, "queueing", False) else client

    def queued(self) -> contextlib.AbstractContextManager[None]:
        """Inside ``with logger.queued():``, :attr:`experiment` queues what it is asked to write.

        The stand-in client takes ``log_batch``, ``log_artifact``, ``log_artifacts`` and ``set_terminated`` and
        turns each into a record of this logger's queue (delivered in order, retried, spilled, replayable), like
        the logger's own methods; lightning_optloss logs its run configuration and artifacts this way.
        """
        return self._queueing()

    @contextlib.contextmanager
    def _queueing(self) -> Iterator[None]:
        previous = getattr(self._local, "queueing", False)
        self._local.queueing = True
        try:
            yield
        finally:
            self._local.queueing = previous

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        with self._queueing():
            super().log_hyperparams(params)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        with self._queueing():
            super().log_metrics(metrics, step)

    @rank_zero_only
    def log_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags of the run (values as strings), queued like the metrics."""
        if tags:
            self._put(mlflow_records.batch_record(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    @rank_zero_only
    def log_image(self, key: str, image: Any, step: int) -> None:
        """Queue ``image`` (a ``PIL.Image`` or an ``(H, W[, 3|4])`` uint8 array) as MLflow's ``log_image(key=key,
        step=step)``: one frame of the run's image grid under ``key``, at ``step`` in its slider.

        The PNG is written now into the staging folder beside the spill file (``compress_level=1``: a few
        milliseconds), then delivered by the worker thread with its 256-pixel thumbnail, retried, spilled and
        replayed like every record (:mod:`lightning_optloss.mlflow.records`, type ``image``). When the disk
        refuses the PNG (full or read-only), it is uploaded directly from a temporary folder, as an artifact that
        cannot be staged is, and counted as dropped, with a warning, if that fails too.

        Args:
            key: MLflow's image key: letters, digits and ``_ - . / space``.
            image: The picture.
            step: The step it belongs to (>= 0).
        """
        from PIL import Image

        if not isinstance(key, str) or not key or not _IMAGE_KEY.fullmatch(key):
            raise validation.invalid(_OWNER, "key", "a non-empty string of letters, digits and _ - . / space", key)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise validation.invalid(_OWNER, "step", "an integer >= 0", step)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        timestamp = int(time.time() * 1000)
        run_id = self.run_id
        if self._delivery is None:
            self._delivery = self._new_delivery(run_id)
        assert self._staging is not None
        folder = self._staging / str(next(self._staged))
        path = folder / "image.png"
        try:
            make_private_folder(folder)
            image.save(path, format="PNG", compress_level=1)
        except OSError as error:
            self._delivery.disk.failed_writes += 1
            self._delivery.disk.error = error
            shutil.rmtree(folder, ignore_errors=True)
            self._log_image_now(image, run_id, key, step, timestamp)
            return
        self._put(mlflow_records.image_record(run_id, str(path), key, step, timestamp))

    def _log_image_now(self, image: Any, run_id: str, key: str, step: int, timestamp: int) -> None:
        """Upload a picture the spill folder would not take, on this thread, from a temporary folder."""
        assert self._delivery is not None
        try:
            with tempfile.TemporaryDirectory() as temporary:
                path = Path(temporary) / "image.png"
                image.save(path, format="PNG", compress_level=1)
                self._upload_now(mlflow_records.image_record(run_id, str(path), key, step, timestamp))
        except OSError as error:
            self._delivery.disk.drop(mlflow_records.image_record(run_id, "", key, step, timestamp))
            warnings.warn(
                f"{_OWNER}: could not write the picture {key!r} of step {step} anywhere ({_brief(error)}); it is "
                "not in the run.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._warn_about_delivery()

    @override
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        with self._queueing():
            super().after_save_checkpoint(checkpoint_callback)

    @override
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Queue the checkpoints still to log and the status, then flush for at most ``flush_timeout`` seconds."""
        with self._queueing():
            super().finalize(status)
        self._close()

    @property
    def stats(self) -> dict[str, int]:
        """Counts since the first record: ``delivered`` records, ``calls`` to MLflow that succeeded (merged records
        make fewer calls than records), ``spilled`` to disk, ``dropped`` (a disk fault), ``rejected`` by the server,
        and ``queued_bytes`` waiting in memory (their JSON size)."""
        delivery = self._delivery
        if delivery is None:
            return dict.fromkeys(("delivered", "calls", "spilled", "dropped", "rejected", "queued_bytes"), 0)
        return {
            "delivered": delivery.delivered,
            "calls": delivery.sends,
            "spilled": delivery.spilled,
            "dropped": delivery.disk.dropped,
            "rejected": delivery.rejected,
            "queued_bytes": delivery.memory_bytes,
        }

    @property
    def pending(self) -> int:
        """Records queued and not delivered yet (in memory or in the spill file)."""
        return 0 if self._delivery is None else self._delivery.pending

    # ------------------------------------------------------------------ delivery

    def _put(self, record: Record) -> None:
        if self._delivery is None:
            self._delivery = self._new_delivery(record["run_id"])
        self._delivery.put(record)
        self._warn_about_delivery()

    def _new_delivery(self, run_id: str) -> Delivery:
        folder = (self.spill_dir or Path.cwd()).resolve()
        leftovers = outbox.Leftovers.find(folder, run_id)
        spill_path = leftovers.spill_path or folder / f"mlflow-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self._staging = spill_path.with_suffix(".artifacts")
        self._sender = mlflow_records.Sender(self._tracking_uri, self.request_timeout)
        atexit.register(self._close)
        delivery = Delivery(
            self._send,
            spill_path,
            max_queue=self.max_queue,
            max_queue_bytes=self.max_queue_bytes,
            is_permanent=mlflow_records.is_permanent,
            merge=mlflow_records.merged,
            durable=self.durable,
            name=f"mlflow-delivery-{run_id[:8]}",
            niceness=self.delivery_niceness,
        )
        delivery.disk.on_drop = self._dropped.add
        for record in leftovers.later_records():
            delivery.put(record)
        leftovers.remove_later_files()
        for message in leftovers.messages(self._tracking_uri):
            warnings.warn(f"{_OWNER}: {message}", RuntimeWarning, stacklevel=4)
        return delivery

    def _send(self, record: Record) -> None:
        """Deliver one record (on the worker thread); a staged artifact file is removed once uploaded."""
        self._sender(record)
        if record["type"] in mlflow_records.STAGED_TYPES:
            outbox.remove_staged(Path(record["local_path"]))

    def _close(self) -> None:
        delivery = self._delivery
        if delivery is None or not delivery.running:
            return
        report = delivery.close(self.flush_timeout)
        self._warn_about_delivery()
        if self._staging is not None and self._staging.is_dir() and not any(self._staging.iterdir()):
            with contextlib.suppress(OSError):
                self._staging.rmdir()
        if report.spill_path is not None:
            held = "the file cannot be read back"
            with contextlib.suppress(OSError):
                held = mlflow_records.summary(mlflow_records.read_records(report.spill_path).records)
            command = outbox.replay_command(report.spill_path, self._tracking_uri)
            warnings.warn(
                f"{_OWNER}: {report.undelivered} records ({held}) could not be delivered to "
                f"{redact(self._tracking_uri)} within flush_timeout={self.flush_timeout:g} s; they are in "
                f"{report.spill_path}. Deliver them with: {command}",
                RuntimeWarning,
                stacklevel=2,
            )
        if delivery.disk.dropped:
            warnings.warn(f"{_OWNER}: {outbox.dropped_message(delivery, self._dropped)}", RuntimeWarning, stacklevel=2)

    def _warn_about_delivery(self) -> None:
        delivery = self._delivery
        assert delivery is not None
        kind = mlflow_records.failure_kind(delivery.last_error) if delivery.last_error is not None else ""
        if delivery.outages and f"outage {kind}" not in self._warned:
            self._warned.add(f"outage {kind}")
            assert self._sender is not None
            warnings.warn(
                f"{_OWNER}: {_describe(kind, self._sender)} ({_brief(delivery.last_error)}). Training goes on; "
                f"records are kept in order and sent again with backoff (up to {delivery.backoff.maximum:g} s "
                f"apart), in memory up to max_queue={self.max_queue} records or max_queue_bytes="
                f"{self.max_queue_bytes} bytes, then in "
                f"{delivery.spill_path}. What is still undelivered when fit ends (after flush_timeout="
                f"{self.flush_timeout:g} s) stays in that file for: "
                f"{outbox.replay_command(delivery.spill_path, self._tracking_uri)}",
                RuntimeWarning,
                stacklevel=2,
            )
        if delivery.disk.error is not None and "disk" not in self._warned:
            self._warned.add("disk")
            warnings.warn(f"{_OWNER}: {outbox.disk_message(delivery)}", RuntimeWarning, stacklevel=2)
        if delivery.rejected and "rejected" not in self._warned:
            self._warned.add("rejected")
            warnings.warn(
                f"{_OWNER}: the MLflow server at {redact(self._tracking_uri)} refused a record "
                f"({_brief(delivery.last_rejection)}); it is not sent again and is kept, with the error, in "
                f"{delivery.rejected_path}, as are any later refused records.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _stage(self, local_path: str) -> str | None:
        """A copy of ``local_path`` in the spill file's ``.artifacts/`` folder, that survives the original's
        removal and that a replay accepts: a hard link, else a copy. None when the disk refuses both."""
        assert self._staging is not None and self._delivery is not None
        source = Path(local_path).resolve()
        folder = self._staging / str(next(self._staged))
        target = folder / source.name
        try:
            make_private_folder(folder)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        except OSError as error:
            self._delivery.disk.failed_writes += 1
            self._delivery.disk.error = error
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
                folder.rmdir()
            return None
        return str(target)

    def _upload_now(self, record: Record, attempts: int = 3) -> None:
        """Upload an artifact that could not be staged, on this thread: its file may be gone after the call.

        At most ``attempts`` tries (each within the request timeout, which grows after a timeout); then it is
        counted as dropped, with a warning.
        """
        assert self._sender is not None and self._delivery is not None
        for attempt in range(attempts):
            try:
                self._sender(record)
                return
            except Exception as error:
                if attempt + 1 < attempts and not mlflow_records.is_permanent(error):
                    continue
                self._delivery.disk.drop(record)
                warnings.warn(
                    f"{_OWNER}: could not stage {record['local_path']} on disk "
                    f"({_brief(self._delivery.disk.error)}) nor upload it directly ({_brief(error)}); it is not in "
                    "the run.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return


def _brief(error: BaseException | None, limit: int = 300) -> str:
    text = redact(f"{type(error).__name__}: {error}")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(kind: str, sender: mlflow_records.Sender) -> str:
    """The start of the outage warning: which of "unreachable", "answered 5xx/429" and "too slow" it is."""
    server = f"the MLflow server at {redact(sender.tracking_uri)}"
    if kind == "too slow":
        return (
            f"{server} is too slow: no answer within {sender.timeout:g} s (the request timeout doubles after each "
            f"timeout, up to {sender.request_timeout * sender.TIMEOUT_GROWTH:g} s)"
        )
    if kind.startswith("answered"):
        return f"{server} {kind} (reachable, but failing)"
    return f"cannot reach {server}"


def warn_if_stock_mlflow_logger(loggers: Iterable[Logger]) -> None:
    """One warning when one of ``loggers`` is Lightning's stock MLFlowLogger rather than :class:`MLFlowLogger`."""
    if any(isinstance(logger, StockMLFlowLogger) and not isinstance(logger, MLFlowLogger) for logger in loggers):
        rank_zero_warn(_STOCK_WARNING)


class _QueueingClient:
    """Stands in for the MlflowClient while the stock logger's methods run: each call becomes a queued record."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self._logger = logger

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
        synchronous: bool | None = None,
    ) -> None:
        if metrics or params or tags:
            self._logger._put(mlflow_records.batch_record(run_id, metrics, params, tags))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        logger = self._logger
        if logger._delivery is None:
            logger._delivery = logger._new_delivery(run_id)
        staged = logger._stage(local_path)
        record = mlflow_records.artifact_record(run_id, staged or str(Path(local_path).resolve()), artifact_path)
        if staged is None:
            logger._upload_now(record)
            logger._warn_about_delivery()
        else:
            logger._put(record)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        for file in sorted(path for path in root.rglob("*") if path.is_file()):
            folder = file.parent.relative_to(root).as_posix()
            parts = [part for part in (artifact_path, folder) if part and part != "."]
            self.log_artifact(run_id, str(file), posixpath.join(*parts) if parts else None)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        end_time = end_time if end_time is not None else int(time.time() * 1000)
        self._logger._put(mlflow_records.status_record(run_id, status or "FINISHED", end_time))

    def get_run(self, run_id: str) -> bool:
        """True: the run exists, ``experiment`` created or fetched it before the first record."""
        return True
