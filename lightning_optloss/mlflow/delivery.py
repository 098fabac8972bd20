"""Ordered delivery of records to a server that may be slow or away, without ever making the caller wait.

:class:`Delivery` takes records (JSON-ready dicts) from the caller with :meth:`Delivery.put`, which only appends
to a queue in memory, and hands them to a ``send`` callable, one at a time and in order, on a daemon worker
thread of its own:

- **Retries.** When ``send`` raises, the same record is tried again after an exponential backoff (see
  :class:`Backoff`: 0.5 s, 1 s, 2 s ... at most 15 s by default), never in a busy loop; the records behind it
  wait, so the order is kept. An error that ``is_permanent`` says will not go away by retrying (the server
  refused the record) is not retried: the record goes to the *rejected* file and the next one is sent.
- **Bounded memory.** When more than ``max_queue`` records wait in memory, the oldest of them are appended to
  the *spill* file until half of ``max_queue`` remain; the caller never blocks on the server and nothing is
  dropped. The worker delivers the spill file's records (oldest first) before those still in memory.
- **Flush.** :meth:`Delivery.close` gives the worker until a deadline to deliver everything, then stops it and
  writes whatever is left, in order, to the spill file (the record being sent included: if that send succeeds
  after all, the record is delivered twice, so senders should be idempotent). A later :meth:`Delivery.put`
  starts a new worker, which delivers the spill file first.

Both files hold one JSON object per line (``json.dumps``; non-finite floats as ``NaN``/``Infinity``), the
records as given; rejected records carry an extra ``"error"`` key with the refusal. The rejected file is the
spill file's name with ``.rejected.jsonl``. Nothing here knows about MLflow or Lightning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


class SpillFile:
    """An append-only jsonl file of records that the worker reads back from the front (oldest first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unread = 0
        self._offset = 0
        self._file: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+b")  # noqa: SIM115 (kept open between appends and reads)
        return self._file

    def append(self, records: Iterable[Record]) -> None:
        file = self._open()
        file.seek(0, 2)
        for record in records:
            file.write(_line(record))
            self.unread += 1
        file.flush()

    def pop(self) -> Record:
        """The oldest unread record; the file is emptied once everything in it has been read."""
        file = self._open()
        file.seek(self._offset)
        record = json.loads(file.readline())
        self._offset = file.tell()
        self.unread -= 1
        if not self.unread:
            file.truncate(0)
            self._offset = 0
        return record

    def rewrite(self, first: Record | None, last: Iterable[Record]) -> int:
        """Leave only ``first``, the unread records and ``last``, in that order, and close the file.

        Returns how many records the file holds; it is removed when none.
        """
        lines = [_line(first)] if first is not None else []
        if self.unread:
            file = self._open()
            file.seek(self._offset)
            lines += file.readlines()
        if self._file is not None:
            self._file.close()
            self._file = None
        lines += [_line(record) for record in last]
        self._offset = 0
        self.unread = len(lines)
        if not lines:
            self.path.unlink(missing_ok=True)
            return 0
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            file.writelines(lines)
        temporary.replace(self.path)
        return self.unread


class Delivery:
    """Sends records in order on a daemon thread, retrying with backoff; spills to disk instead of blocking.

    Args:
        send: Delivers one record or raises. Called on the worker thread only, one call at a time.
        spill_path: The jsonl file for records that wait on disk (created only when needed); the rejected
            records go next to it, in ``<name>.rejected.jsonl``.
        max_queue: How many records may wait in memory before the oldest move to the spill file. Default 1000.
        backoff: Waits between failed attempts (seconds). Default :class:`Backoff()`: 0.5 s doubling to 15 s.
        is_permanent: Whether an error of ``send`` means the record will never be accepted (it is then
            written to the rejected file instead of being retried). Default: no error is permanent.
        name: Name of the worker thread.
    """

    def __init__(
        self,
        send: Callable[[Record], None],
        spill_path: Path,
        *,
        max_queue: int = 1000,
        backoff: Backoff = Backoff(),
        is_permanent: Callable[[BaseException], bool] = lambda error: False,
        name: str = "delivery",
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"Delivery: `max_queue` must be at least 1; got {max_queue}.")
        self._send = send
        self._max_queue = max_queue
        self.backoff = backoff
        self._is_permanent = is_permanent
        self._name = name
        self._spill = SpillFile(Path(spill_path))
        self.rejected_path = self._spill.path.with_name(self._spill.path.stem + ".rejected.jsonl")
        self._cond = threading.Condition()
        self._memory: deque[Record] = deque()
        self._in_flight: Record | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0  # a worker whose generation is stale has been left behind by close()
        self._stopping = False
        self._wake = False
        self._failures = 0
        self.delivered = 0
        self.spilled = 0
        self.rejected = 0
        self.outages = 0
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
        """Records not delivered yet: in memory, in the spill file, and the one being sent."""
        with self._cond:
            return self._pending()

    def _pending(self) -> int:
        return len(self._memory) + self._spill.unread + (self._in_flight is not None)

    def put(self, record: Record) -> None:
        """Queue ``record``; never waits for the worker or the server (a spill is a local file append)."""
        with self._cond:
            if self._thread is None:
                self._start()
            self._memory.append(record)
            if len(self._memory) > self._max_queue:
                moved = [self._memory.popleft() for _ in range(len(self._memory) - self._max_queue // 2)]
                self._spill.append(moved)
                self.spilled += len(moved)
            self._cond.notify_all()

    def _start(self) -> None:
        self._generation += 1
        self._stopping = False
        self._thread = threading.Thread(
            target=self._work, args=(self._generation,), name=f"{self._name}-{self._generation}", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float, join_timeout: float = 1.0) -> Report:
        """Deliver until nothing is left or ``timeout`` seconds passed; then stop the worker and spill the rest.

        The worker is joined for at most ``join_timeout`` seconds more: a send still running then (a server that
        accepted the connection and does not answer) is left to finish on its daemon thread, its record already
        in the spill file.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            thread = self._thread
            if thread is not None:
                self._stopping = True
                self._wake = True  # the first retry of the flush does not wait for the backoff
                self._cond.notify_all()
                while self._pending() and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                self._generation += 1
                self._thread = None
                self._cond.notify_all()
            undelivered = self._spill.rewrite(self._in_flight, self._memory)
            self._in_flight = None
            self._memory.clear()
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

    def _work(self, generation: int) -> None:
        while True:
            with self._cond:
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
        """The record to send (oldest first), waiting for one; None when this worker is to stop."""
        while generation == self._generation:
            if self._in_flight is None and self._spill.unread:
                self._in_flight = self._spill.pop()
            elif self._in_flight is None and self._memory:
                self._in_flight = self._memory.popleft()
            if self._in_flight is not None:
                return self._in_flight
            if self._stopping:
                return None
            self._cond.wait()
        return None

    def _delivered(self) -> None:
        if self._failures:
            log.info("%s: delivering again after %d failed attempts", self._name, self._failures)
        self._in_flight = None
        self._failures = 0
        self.delivered += 1
        self._cond.notify_all()

    def _reject(self, record: Record, error: BaseException) -> None:
        log.debug("%s: record refused (%s); written to %s", self._name, error, self.rejected_path)
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejected_path, "ab") as file:
            file.write(_line({**record, "error": str(error)}))
        self._in_flight = None
        self.rejected += 1
        self.last_rejection = error
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
