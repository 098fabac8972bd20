"""The delivery worker on plain callables: order, backoff, bounded waits, spilling, flush deadlines. No server."""

from __future__ import annotations

import errno
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_optloss.mlflow import delivery as delivery_module
from lightning_optloss.mlflow.delivery import Backoff, Delivery, Record

FAST = Backoff(initial=0.02, maximum=0.08)


class FlakyServer:
    """A ``send`` that fails while ``down`` (or the first ``failures`` times), optionally blocking first."""

    def __init__(self, failures: int = 0, down: bool = False, refuse: Callable[[Record], bool] | None = None) -> None:
        self.failures = failures
        self.down = down
        self.refuse = refuse or (lambda record: False)
        self.received: list[Record] = []
        self.attempts: list[tuple[float, Record]] = []
        self.gate: threading.Event | None = None

    def __call__(self, record: Record) -> None:
        self.attempts.append((time.monotonic(), record))
        if self.gate is not None:
            assert self.gate.wait(10.0), "the test never opened the gate"
        if self.down or self.failures > 0:
            self.failures -= 1
            raise ConnectionError("server away")
        if self.refuse(record):
            raise ValueError(f"refused {record['n']}")
        self.received.append(record)


def records(count: int, start: int = 0) -> list[Record]:
    return [{"n": n} for n in range(start, start + count)]


def read_jsonl(path: Path) -> list[Record]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def thread_priority() -> int:
    """The calling thread's nice value (Linux: a thread id addresses one thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_backoff_doubles_from_the_initial_wait_up_to_the_maximum():
    backoff = Backoff(initial=0.5, maximum=15.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert backoff.delay(10_000) == 15.0


def test_failed_sends_are_retried_after_growing_waits_and_the_order_is_kept(tmp_path):
    server = FlakyServer(failures=3)
    delivery = Delivery(server, tmp_path / "spill.jsonl", backoff=FAST)
    for record in records(5):
        delivery.put(record)
    wait_until(lambda: len(server.received) == 5)
    report = delivery.close(timeout=5.0)
    assert server.received == records(5)
    first_tries = [at for at, record in server.attempts if record["n"] == 0]
    assert len(first_tries) == 4
    waits = [later - earlier for earlier, later in itertools.pairwise(first_tries)]
    for wait, expected in zip(waits, [0.02, 0.04, 0.08], strict=True):
        assert wait >= expected * 0.9
    assert (report.delivered, report.undelivered, report.spill_path, delivery.outages) == (5, 0, None, 1)
    assert not (tmp_path / "spill.jsonl").exists()


def test_a_server_that_stays_down_is_tried_at_the_backoff_pace_not_in_a_busy_loop(tmp_path):
    server = FlakyServer(down=True)
    delivery = Delivery(server, tmp_path / "spill.jsonl", backoff=Backoff(initial=0.05, maximum=0.05))
    delivery.put({"n": 0})
    time.sleep(0.5)
    tried = len(server.attempts)
    delivery.close(timeout=0.0)
    assert 5 <= tried <= 12  # one try every 0.05 s


def test_put_never_waits_for_a_blocked_send_and_overflow_goes_to_disk_in_order(tmp_path):
    server = FlakyServer()
    server.gate = threading.Event()
    delivery = Delivery(server, tmp_path / "spill.jsonl", max_queue=10, backoff=FAST)
    slowest = 0.0
    for record in records(100):
        started = time.perf_counter()
        delivery.put(record)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.05  # generous: a put appends to a deque or a local file, it never waits for send
    assert delivery.spilled >= 80
    assert (tmp_path / "spill.jsonl").exists()
    server.gate.set()
    report = delivery.close(timeout=5.0)
    assert server.received == records(100)
    assert (report.undelivered, report.spill_path) == (0, None)
    assert not (tmp_path / "spill.jsonl").exists()


def test_close_writes_what_is_left_in_order_the_record_in_flight_first(tmp_path):
    server = FlakyServer(down=True)
    delivery = Delivery(server, tmp_path / "spill.jsonl", max_queue=4, backoff=FAST)
    for record in records(20):
        delivery.put(record)
    started = time.monotonic()
    report = delivery.close(timeout=0.2)
    assert time.monotonic() - started < 1.5
    assert report.undelivered == 20
    assert report.spill_path == tmp_path / "spill.jsonl"
    assert read_jsonl(report.spill_path) == records(20)


def test_close_leaves_a_send_that_hangs_behind_at_the_deadline(tmp_path):
    server = FlakyServer()
    server.gate = threading.Event()
    delivery = Delivery(server, tmp_path / "spill.jsonl", backoff=FAST)
    for record in records(3):
        delivery.put(record)
    wait_until(lambda: len(server.attempts) == 1)
    started = time.monotonic()
    report = delivery.close(timeout=0.1, join_timeout=0.1)
    assert time.monotonic() - started < 1.0
    assert read_jsonl(report.spill_path) == records(3)
    server.gate.set()  # the abandoned send completes: it must not touch the delivery's state any more
    wait_until(lambda: len(server.received) == 1)
    time.sleep(0.05)
    assert read_jsonl(report.spill_path) == records(3)
    assert delivery.pending == 3


def test_a_later_put_delivers_the_records_left_on_disk_first(tmp_path):
    server = FlakyServer(down=True)
    delivery = Delivery(server, tmp_path / "spill.jsonl", max_queue=2, backoff=FAST)
    for record in records(5):
        delivery.put(record)
    assert delivery.close(timeout=0.05).undelivered == 5
    server.down = False
    delivery.put({"n": 5})
    report = delivery.close(timeout=5.0)
    assert server.received == records(6)
    assert (report.undelivered, report.spill_path) == (0, None)


def test_refused_records_go_to_the_rejected_file_and_the_others_are_delivered(tmp_path):
    server = FlakyServer(refuse=lambda record: record["n"] == 2)
    delivery = Delivery(
        server, tmp_path / "spill.jsonl", backoff=FAST, is_permanent=lambda error: isinstance(error, ValueError)
    )
    for record in records(5):
        delivery.put(record)
    report = delivery.close(timeout=5.0)
    assert server.received == [record for record in records(5) if record["n"] != 2]
    assert (report.rejected, report.rejected_path) == (1, tmp_path / "spill.rejected.jsonl")
    assert read_jsonl(report.rejected_path) == [{"n": 2, "error": "refused 2"}]
    assert report.undelivered == 0


def test_max_queue_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_queue"):
        Delivery(FlakyServer(), tmp_path / "spill.jsonl", max_queue=0)


def test_close_retries_at_once_instead_of_sleeping_out_the_backoff(tmp_path):
    server = FlakyServer(failures=1)
    delivery = Delivery(server, tmp_path / "spill.jsonl", backoff=Backoff(initial=30.0, maximum=30.0))
    delivery.put({"n": 0})
    wait_until(lambda: len(server.attempts) == 1)
    started = time.monotonic()
    report = delivery.close(timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert (server.received, report.undelivered) == ([{"n": 0}], 0)


class FailingDisk:
    """Makes the spill file's writes fail with ``OSError(code)`` while ``failing`` (a real file otherwise)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
        self.failing = True
        original = delivery_module.write_all

        def write_all(descriptor: int, data: bytes) -> None:
            if self.failing:
                os.write(descriptor, data[: len(data) // 2])  # a half-written line, as a full disk leaves
                raise OSError(code, os.strerror(code))
            original(descriptor, data)

        monkeypatch.setattr(delivery_module, "write_all", write_all)


def test_a_failing_spill_disk_keeps_records_in_memory_drops_the_newest_and_never_raises(tmp_path, monkeypatch):
    FailingDisk(monkeypatch, errno.ENOSPC)
    server = FlakyServer(down=True)
    delivery = Delivery(server, tmp_path / "spill.jsonl", max_queue=4, backoff=FAST)
    for record in records(20):
        delivery.put(record)
    delivery.put({"n": "status", "type": "status"})
    assert delivery.disk.error.errno == errno.ENOSPC and delivery.disk.dropped > 0
    assert (tmp_path / "spill.jsonl").read_bytes() == b""  # each half-written line was cut off again
    server.down = False
    report = delivery.close(timeout=5.0)
    received = [record["n"] for record in server.received]
    assert received[-1] == "status"  # never dropped, still last
    assert received[:-1] == list(range(len(received) - 1))  # the oldest kept, in order; the newest dropped
    assert len(received) - 1 + delivery.disk.dropped == 20
    assert (report.undelivered, report.spill_path) == (0, None)


def test_close_on_a_read_only_disk_counts_what_it_could_not_write_and_does_not_raise(tmp_path, monkeypatch):
    disk = FailingDisk(monkeypatch, errno.EROFS)
    delivery = Delivery(FlakyServer(down=True), tmp_path / "spill.jsonl", backoff=FAST)
    for record in records(3):
        delivery.put(record)
    report = delivery.close(timeout=0.1)
    assert disk.failing and delivery.disk.dropped == 3 and report.undelivered == 0


def test_records_merge_into_one_send_in_order_and_a_refused_merge_is_retried_one_by_one(tmp_path):
    def merge(first: Record, second: Record) -> Record | None:
        together = [*first.get("batch", [first["n"]]), second["n"]]
        return {"n": together[0], "batch": together} if len(together) <= 4 else None

    server = FlakyServer(refuse=lambda record: 5 in record.get("batch", [record["n"]]))
    delivery = Delivery(server, tmp_path / "spill.jsonl", merge=merge, is_permanent=lambda e: True, backoff=FAST)
    server.gate = threading.Event()
    for record in records(10):
        delivery.put(record)
    server.gate.set()
    report = delivery.close(timeout=5.0)
    sent = [record.get("batch", [record["n"]]) for record in server.received]
    assert [n for batch in sent for n in batch] == [n for n in range(10) if n != 5]
    assert max(len(batch) for batch in sent) == 4 and len(sent) < 9
    assert (report.delivered, report.rejected) == (9, 1)
    assert [json.loads(line)["n"] for line in report.rejected_path.read_text().splitlines()] == [5]


def test_max_queue_bytes_bounds_memory_by_the_records_json_size(tmp_path):
    server = FlakyServer(down=True)
    delivery = Delivery(server, tmp_path / "spill.jsonl", max_queue=10_000, max_queue_bytes=2_000, backoff=FAST)
    for n in range(200):
        delivery.put({"n": n, "payload": "x" * 80})
        assert delivery.memory_bytes <= 2_000
    assert delivery.spilled > 150
    server.down = False
    delivery.close(timeout=5.0)
    assert [record["n"] for record in server.received] == list(range(200))


def test_durable_records_are_in_the_spill_file_before_put_returns_and_stay_until_delivered(tmp_path):
    server = FlakyServer(down=True)
    path = tmp_path / "spill.jsonl"
    delivery = Delivery(server, path, durable=True, backoff=FAST)
    for record in records(5):
        delivery.put(record)
        assert read_jsonl(path)[-1] == record
    wait_until(lambda: len(server.attempts) >= 2)
    assert read_jsonl(path) == records(5)  # the one being retried included
    server.down = False
    wait_until(lambda: delivery.delivered == 5)
    assert path.read_bytes() == b""
    delivery.close(timeout=1.0)
    assert not path.exists()


def test_an_existing_spill_file_is_continued_first_skipping_an_unreadable_line(tmp_path):
    path = tmp_path / "spill.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1\n{"n": 2}\n')
    server = FlakyServer()
    delivery = Delivery(server, path, backoff=FAST)
    delivery.put({"n": 3})
    delivery.close(timeout=5.0)
    assert server.received == [{"n": 0}, {"n": 2}, {"n": 3}]
    assert delivery._spill.unreadable == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
@pytest.mark.parametrize("niceness", [0, 5, 40])
def test_the_worker_runs_niceness_levels_below_the_thread_that_started_it(tmp_path, niceness):
    seen: list[int] = []
    caller = thread_priority()
    delivery = Delivery(lambda record: seen.append(thread_priority()), tmp_path / "spill.jsonl", niceness=niceness)
    delivery.put({"n": 0})
    wait_until(lambda: seen)  # sent before close(), which hands what is left to a worker at the caller's priority
    report = delivery.close(5.0)
    assert report.delivered == 1
    assert seen == [min(19, caller + niceness)]  # never beyond 19, the lowest priority
    assert thread_priority() == caller  # the thread that puts keeps its own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_at_close_a_worker_at_the_callers_priority_delivers_what_the_lowered_one_left(tmp_path):
    caller, gate = thread_priority(), threading.Event()
    seen: list[tuple[int, int]] = []

    def send(record: Record) -> None:
        seen.append((record["n"], thread_priority()))
        if record["n"] == 0:
            assert gate.wait(10.0), "the test never opened the gate"

    delivery = Delivery(send, tmp_path / "spill.jsonl", niceness=5)  # no merge: one send per record
    for record in records(3):
        delivery.put(record)
    wait_until(lambda: len(seen) == 1)  # the lowered worker is sending record 0
    closing = threading.Thread(target=lambda: seen.append((-1, delivery.close(10.0).delivered)))
    closing.start()
    wait_until(lambda: delivery._stopping)
    gate.set()
    closing.join(10.0)
    lowered = min(19, caller + 5)
    assert seen == [(0, lowered), (1, caller), (2, caller), (-1, 3)]
    assert list(tmp_path.iterdir()) == []  # nothing spilled
