"""Ordered delivery of records to a server that may be slow or away, without ever making the caller wait.

:class:`Delivery` takes records (JSON-ready dicts) from the caller with :meth:`Delivery.put`, which only appends
to a queue in memory (or, ``durable``, to the spill file), and hands them to a ``send`` callable, in order, on a
daemon worker thread of its own:

- **Retries.** When ``send`` raises, the same record is tried again after an exponential backoff (see
  :class:`Backoff`: 0.5 s, 1 s, 2 s ... at most 15 s by default), never in a busy loop; the records behind it
  wait, so the order is kept. An error that ``is_permanent`` says will not go away by retrying (the server
  refused the record) is not retried: the record goes to the *rejected* file and the next one is sent.
- **Merging.** Given ``merge``, the worker sends as few calls as it can: it folds the records that wait behind
  the first one into it while ``merge(first, next)`` returns one record doing both (and stops at the first
  that does not merge, so the order of what does not merge is kept).
- **Bounded memory.** When more than ``max_queue`` records or ``max_queue_bytes`` bytes (each record counted
  as its JSON line) wait in memory, the oldest are appended to the *spill* file until half of each remain;
  the caller never blocks on the server. The worker delivers the spill file's records (oldest first) before
  those still in memory.
- **Disk faults.** A write that fails (full disk, read-only or unwritable folder, I/O error: any ``OSError``)
  never reaches the caller: the records stay in memory, and the spill file is tried again at the next
  overflow. Beyond twice the bounds, the newest records are dropped (a ``status`` record never is); they are
  counted in :attr:`Delivery.disk` with the error. A half-written line is cut off again.
- **Flush.** :meth:`Delivery.close` gives the worker until a deadline to deliver everything, then stops it and
  writes whatever is left, in order, to the spill file (the record being sent included: if that send succeeds
  after all, the record is delivered twice, so senders should be idempotent). A later :meth:`Delivery.put`
  starts a new worker, which delivers the spill file first.
- **Durable.** With ``durable=True`` every record is appended to the spill file before :meth:`Delivery.put`
  returns (``os.fsync`` at most every ``fsync_interval`` seconds), and the worker reads them back from there:
  a killed process loses nothing that ``put`` returned, a machine crash at most the last interval.
- **Priority.** With ``niceness``, the worker runs that many ``nice`` levels below the thread that started it
  (Linux): on a machine whose cores the caller keeps busy, the worker takes CPU time from idle moments rather
  than from the caller. At :meth:`Delivery.close`, where the caller waits, the lowered worker stops after its
  current send and a worker at the caller's priority delivers the rest (a thread cannot raise its own
  priority again without privileges).

Both files hold one JSON object per line (``json.dumps``; non-finite floats as ``NaN``/``Infinity``), the
records as given, created with mode 0600 (their folder 0700 when created here); rejected records carry an
extra ``"error"`` key with the refusal. The rejected file is the spill file's name with ``.rejected.jsonl``. An
existing spill file (left by an earlier process) is continued: its records are delivered first. Nothing here
knows about MLflow or Lightning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after the ``n``-th failure in a row: ``initial * 2 ** (n - 1)``, at most ``maximum``."""

    initial: float = 0.5
    maximum: float = 15.0

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** min(failures - 1, 60))


@dataclass(frozen=True)
class Report:
    """What :meth:`Delivery.close` left behind.

    ``undelivered`` records are in ``spill_path`` (None when there are none), ``rejected`` (over the
    delivery's lifetime) in ``rejected_path``.
    """

    delivered: int
    undelivered: int
    spill_path: Path | None
    rejected: int
    rejected_path: Path | None


@dataclass
class DiskFaults:
    """What the spill and rejected files could not take: ``dropped`` records (lost: memory was full too), the
    last ``error`` (None when every write succeeded), and ``on_drop``, called with each dropped record."""

    failed_writes: int = 0
    dropped: int = 0
    error: OSError | None = None
    on_drop: Callable[[Record], None] | None = None

    def drop(self, record: Record) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(record)


def make_private_folder(folder: Path) -> None:
    """``folder`` and its missing parents, each created with mode 0700 (existing folders are left as they are)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of ``path`` with ``flags``, a new file created with mode 0600 (owner only)."""
    make_private_folder(path.parent)
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def write_all(descriptor: int, data: bytes) -> None:
    """Write every byte of ``data`` (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


class SpillFile:
    """An append-only jsonl file of records that the worker reads back from the front (oldest first).

    An existing file is continued: its lines count as unread. A line that does not parse is skipped (and
    counted in ``unreadable``) when read back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unread = 0
        self.unreadable = 0
        self._offset = 0
        self._descriptor: int | None = None
        self._synced = 0.0
        with contextlib.suppress(OSError), open(path, "rb") as file:
            self.unread = sum(1 for line in file if line.strip())

    def _open(self) -> int:
        if self._descriptor is None:
            self._descriptor = open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        return self._descriptor

    def append(self, lines: list[bytes], fsync: float | None = None) -> None:
        """Append the records' JSON ``lines``; ``OSError`` when the disk refuses, the file then as it was.

        ``fsync``: also sync the file when its last sync is older than that many seconds.
        """
        data = b"".join(lines)
        descriptor = self._open()
        size = os.fstat(descriptor).st_size
        try:
            write_all(descriptor, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, size)  # no half line left behind
            raise
        self.unread += data.count(b"\n")
        if fsync is not None and time.monotonic() - self._synced >= fsync:
            os.fsync(descriptor)
            self._synced = time.monotonic()

    def sync(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._descriptor)

    def pop(self) -> Record | None:
        """The oldest unread record (None when the rest of the file is unreadable); it stays in the file."""
        descriptor = self._open()
        with os.fdopen(os.dup(descriptor), "rb") as file:
            file.seek(self._offset)
            record = None
            while record is None and self.unread:
                line = file.readline()
                if not line:
                    self.unread = 0
                    break
                if not line.strip():
                    continue
                self.unread -= 1
                try:
                    record = json.loads(line)
                except ValueError:
                    self.unreadable += 1
                    log.warning("%s: skipped an unreadable line at byte %d", self.path, self._offset)
            self._offset = file.tell()
        return record

    def clear_if_read(self) -> None:
        """Empty the file when every record in it has been read (call once those records are delivered: until
        then a killed process leaves them in the file)."""
        if not self.unread and self._offset and self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, 0)
                self._offset = 0

    def unread_lines(self) -> list[bytes]:
        if not self.unread:
            return []
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            return [line if line.endswith(b"\n") else line + b"\n" for line in file if line.strip()]

    def close(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None

    def rewrite(self, first: Iterable[Record], last: Iterable[Record]) -> int:
        """Leave only ``first``, the unread records and ``last``, in that order, and close the file.

        Returns how many records the file holds; it is removed when none. ``OSError`` when the disk refuses (the
        file is then left as it was: the unread records are still in it).
        """
        lines = [_line(record) for record in first]
        lines += self.unread_lines()
        self.close()
        lines += [_line(record) for record in last]
        if not lines:
            if self.path.exists():
                self.path.unlink()
            self._offset = self.unread = 0
            return 0
        if len(lines) == self.unread and self._offset == 0 and self.path.exists():
            return self.unread  # nothing read and nothing added: the file already holds exactly that
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            descriptor = open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                write_all(descriptor, b"".join(lines))
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            temporary.replace(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        self._offset = 0
        self.unread = len(lines)
        return self.unread


def lower_thread_priority(niceness: int, name: str) -> bool:
    """Lower the calling thread's CPU priority by ``niceness`` ``nice`` levels (at most to 19), on Linux; return
    whether it was lowered.

    Linux's ``setpriority`` takes a thread id for one thread (not the process, as POSIX says); elsewhere, and
    where the call fails, nothing changes (logged at debug level under ``name``).
    """
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return False
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        if current >= 19:
            return False
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except OSError as error:
        log.debug("%s: cannot lower the worker thread's priority: %s", name, error)
        return False
    return True


class Delivery:
    """Sends records in order on a daemon thread, retrying with backoff; spills to disk instead of blocking.

    Args:
        send: Delivers one record or raises. Called on the worker thread only, one call at a time.
        spill_path: The jsonl file for records that wait on disk (created only when needed; an existing one is
            continued, its records first); the rejected records go next to it, in ``<name>.rejected.jsonl``.
        max_queue: How many records may wait in memory before the oldest move to the spill file. Default 1000.
        max_queue_bytes: How many bytes (of JSON) they may take. Default None: no bound by size.
        backoff: Waits between failed attempts (seconds). Default :class:`Backoff()`: 0.5 s doubling to 15 s.
        is_permanent: Whether an error of ``send`` means the record will never be accepted (it is then
            written to the rejected file instead of being retried). Default: no error is permanent.
        merge: One record doing what two consecutive records do, or None. Default: records are sent one by one.
        durable: Append every record to the spill file before :meth:`put` returns. Default False.
        fsync_interval: With ``durable``, the longest time (seconds) between two ``fsync`` of the spill file.
        name: Name of the worker thread.
        niceness: How many ``nice`` levels below the creating thread's the worker runs (Linux; 0-19, capped at
            19). Default 0: the same priority.
    """

    def __init__(
        self,
        send: Callable[[Record], None],
        spill_path: Path,
        *,
        max_queue: int = 1000,
        max_queue_bytes: int | None = None,
        backoff: Backoff = Backoff(),
        is_permanent: Callable[[BaseException], bool] = lambda error: False,
        merge: Callable[[Record, Record], Record | None] | None = None,
        durable: bool = False,
        fsync_interval: float = 0.1,
        name: str = "delivery",
        niceness: int = 0,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"Delivery: `max_queue` must be at least 1; got {max_queue}.")
        if max_queue_bytes is not None and max_queue_bytes < 1:
            raise ValueError(f"Delivery: `max_queue_bytes` must be None or at least 1; got {max_queue_bytes}.")
        self._send = send
        self._max_queue = max_queue
        self._max_bytes = max_queue_bytes
        self.backoff = backoff
        self._is_permanent = is_permanent
        self._merge = merge
        self.durable = durable
        self._fsync_interval = fsync_interval
        self._name = name
        self._niceness = niceness
        self._spill = SpillFile(Path(spill_path))
        self.rejected_path = self._spill.path.with_name(self._spill.path.stem + ".rejected.jsonl")
        self._cond = threading.Condition()
        self._memory: deque[tuple[str, bytes]] = deque()  # (type, JSON line): a record takes its JSON's size
        self._memory_bytes = 0
        self._in_flight: list[Record] = []  # the records the record being sent stands for (several when merged)
        self._sending: Record | None = None
        self._held: deque[Record] = deque()  # taken from the queue and not sent yet: they go first
        self._alone = 0  # how many of the next records are sent without merging (parts of a refused merge)
        self._thread: threading.Thread | None = None
        self._generation = 0  # a worker whose generation is stale has been left behind by close()
        self._stopping = False
        self._handed_over = False  # a lowered worker stopped at close() for one at the caller's priority
        self._wake = False
        self._failures = 0
        self.delivered = 0
        self.sends = 0
        self.spilled = 0
        self.rejected = 0
        self.outages = 0
        self.disk = DiskFaults()
        self.last_error: BaseException | None = None
        self.last_rejection: BaseException | None = None

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    @property
    def running(self) -> bool:
        """Whether a worker was started since the last :meth:`close`."""
        return self._thread is not None

    @property
    def pending(self) -> int:
        """Records not delivered yet: in memory, in the spill file, and those being sent."""
        with self._cond:
            return self._pending()

    @property
    def memory_bytes(self) -> int:
        """Bytes (of JSON) of the records waiting in memory."""
        return self._memory_bytes

    def _pending(self) -> int:
        return len(self._memory) + self._spill.unread + len(self._in_flight) + len(self._held)

    def put(self, record: Record) -> None:
        """Queue ``record``; never waits for the worker or the server, and never raises for a disk fault."""
        line = _line(record)
        with self._cond:
            if self._thread is None:
                self._stopping = self._handed_over = False
                self._start(self._niceness)
            if self.durable and self._try_spill([entry[1] for entry in self._memory] + [line], self._fsync_interval):
                self._memory.clear()  # what a disk fault had left in memory went first
                self._memory_bytes = 0
            else:
                self._memory.append((str(record.get("type")), line))
                self._memory_bytes += len(line)
                if self._over(1):
                    self._spill_oldest()
                if self._over(2):
                    self._drop_newest()
            self._cond.notify_all()

    def _over(self, factor: int) -> bool:
        return len(self._memory) > factor * self._max_queue or (
            self._max_bytes is not None and self._memory_bytes > factor * self._max_bytes
        )

    def _spill_oldest(self) -> None:
        count = size = 0
        while count < len(self._memory) and (
            len(self._memory) - count > self._max_queue // 2
            or (self._max_bytes is not None and self._memory_bytes - size > self._max_bytes // 2)
        ):
            size += len(self._memory[count][1])
            count += 1
        moved = [self._memory[position] for position in range(count)]
        if self._try_spill([line for _, line in moved]):
            for _ in range(count):
                self._memory.popleft()
            self._memory_bytes -= size
            self.spilled += count

    def _drop_newest(self) -> None:
        """Drop the newest records until memory is within twice its bounds; a ``status`` record stays, last."""
        statuses = []
        while self._over(2) and self._memory:
            kind, line = self._memory.pop()
            if kind == "status":
                statuses.append((kind, line))
                continue
            self._memory_bytes -= len(line)
            self.disk.drop(json.loads(line))
        self._memory.extend(reversed(statuses))

    def _try_spill(self, lines: list[bytes], fsync: float | None = None) -> bool:
        try:
            self._spill.append(lines, fsync)
        except OSError as error:
            self._disk_failed(error)
            return False
        return True

    def _disk_failed(self, error: OSError) -> None:
        if self.disk.error is None:
            log.debug("%s: cannot write %s: %s", self._name, self._spill.path, error)
        self.disk.failed_writes += 1
        self.disk.error = error

    def _start(self, niceness: int) -> None:
        self._generation += 1
        self._thread = threading.Thread(
            target=self._work,
            args=(self._generation, niceness),
            name=f"{self._name}-{self._generation}",
            daemon=True,
        )
        self._thread.start()

    def close(self, timeout: float, join_timeout: float = 1.0) -> Report:
        """Deliver until nothing is left or ``timeout`` seconds passed; then stop the worker and spill the rest.

        The worker is joined for at most ``join_timeout`` seconds more: a send still running then (a server that
        accepted the connection and does not answer) is left to finish on its daemon thread, its records
        already in the spill file. Never raises: what the disk does not take is counted in :attr:`disk`.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            thread = self._thread
            if thread is not None:
                self._stopping = True
                self._wake = True  # the first retry of the flush does not wait for the backoff
                self._cond.notify_all()
                while self._pending() and (remaining := deadline - time.monotonic()) > 0:
                    if self._handed_over:  # the caller waits: the flush runs at its priority, not the worker's
                        self._handed_over = False
                        self._start(0)
                        thread = self._thread
                    self._cond.wait(remaining)
                self._generation += 1
                self._thread = None
                self._cond.notify_all()
            first = self._in_flight + list(self._held)
            left = [json.loads(line) for _, line in self._memory]
            try:
                undelivered = self._spill.rewrite(first, left)
            except OSError as error:
                self._disk_failed(error)
                undelivered = self._spill.unread
                for record in first + left:
                    self.disk.drop(record)
            self._in_flight = []
            self._held.clear()
            self._sending = None
            self._memory.clear()
            self._memory_bytes = 0
        if thread is not None:
            thread.join(join_timeout)
            if thread.is_alive():
                log.debug("%s: left a send running on daemon thread %s", self._name, thread.name)
        return Report(
            delivered=self.delivered,
            undelivered=undelivered,
            spill_path=self._spill.path if undelivered else None,
            rejected=self.rejected,
            rejected_path=self.rejected_path if self.rejected else None,
        )

    # ------------------------------------------------------------------ the worker thread

    def _work(self, generation: int, niceness: int) -> None:
        lowered = lower_thread_priority(niceness, self._name)
        while True:
            with self._cond:
                if lowered and self._stopping and generation == self._generation:
                    # A lowered thread cannot raise its priority again (that needs privileges): it stops between
                    # two sends, and close() starts a worker at the caller's priority for the rest.
                    self._handed_over = True
                    self._cond.notify_all()
                    return
                record = self._next(generation)
            if record is None:
                return
            try:
                self._send(record)
                error = None
            except Exception as caught:  # anything the server or the store raised: decided below
                error = caught
            with self._cond:
                if generation != self._generation:
                    return
                if error is None:
                    self._delivered()
                elif self._is_permanent(error):
                    self._reject(record, error)
                else:
                    self._wait_after_failure(generation, error)

    def _next(self, generation: int) -> Record | None:
        """The record to send (oldest first, merged with those behind it), waiting for one; None when this
        worker is to stop."""
        while generation == self._generation:
            if self._sending is None:
                self._take()
            if self._sending is not None:
                return self._sending
            if self._stopping:
                return None
            self._cond.wait()
        return None

    def _take(self) -> None:
        while self._held or self._spill.unread or self._memory:
            if self._held:
                record = self._held.popleft()
            elif self._spill.unread:
                record = self._spill.pop()
                if record is None:
                    continue
            else:
                _, line = self._memory.popleft()
                self._memory_bytes -= len(line)
                record = json.loads(line)
            if self._sending is None:
                self._sending = record
            else:
                combined = self._merge(self._sending, record) if self._merge is not None else None
                if combined is None:
                    self._held.appendleft(record)  # the first that does not merge: sent next, before the rest
                    return
                self._sending = combined
            self._in_flight.append(record)
            if self._merge is None or self._alone:
                self._alone = max(0, self._alone - 1)
                return

    def _delivered(self) -> None:
        if self._failures:
            log.info("%s: delivering again after %d failed attempts", self._name, self._failures)
        self.delivered += len(self._in_flight)
        self.sends += 1
        self._in_flight = []
        self._spill.clear_if_read()
        self._sending = None
        self._failures = 0
        self._cond.notify_all()

    def _reject(self, record: Record, error: BaseException) -> None:
        """Write the refused records to the rejected file; a merged record that was refused is split again, so
        that each of its records gets its own try (MLflow refuses a whole batch for one bad param)."""
        parts, self._in_flight, self._sending = self._in_flight, [], None
        if len(parts) > 1:
            self._held.extendleft(reversed(parts))
            self._alone = len(parts)
            self._cond.notify_all()
            return
        log.debug("%s: record refused (%s); written to %s", self._name, error, self.rejected_path)
        try:
            descriptor = open_private(self.rejected_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                write_all(descriptor, _line({**record, "error": str(error)}))
            finally:
                os.close(descriptor)
        except OSError as disk_error:
            self._disk_failed(disk_error)
            self.disk.drop(record)
        self.rejected += 1
        self.last_rejection = error
        self._spill.clear_if_read()
        self._cond.notify_all()

    def _wait_after_failure(self, generation: int, error: BaseException) -> None:
        if not self._failures:
            self.outages += 1
        self._failures += 1
        self.last_error = error
        delay = self.backoff.delay(self._failures)
        log.debug("%s: attempt %d failed (%s); next in %.2f s", self._name, self._failures, error, delay)
        deadline = time.monotonic() + delay
        while generation == self._generation and not self._wake and (remaining := deadline - time.monotonic()) > 0:
            self._cond.wait(remaining)
        self._wake = False


def _line(record: Record) -> bytes:
    return (json.dumps(record) + "\n").encode()
