"""The fault matrix of lightning_optloss.MLFlowLogger: one test per fault of issue 11, on real parts.

A real ``mlflow server`` on loopback (one for the module), reached through :class:`FaultProxy` (a real TCP
proxy that makes it unreachable, failing with 503, or slow); real spill folders: a full or read-only tmpfs when
the tests run as root and may mount, else an ``OSError`` injected at the spill path's write calls (EACCES is
always injected: root ignores permissions). Each test checks what arrived on the server, what is on disk and
what was warned.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow_server import MlflowServer
from support import TinyRegression, make_trainer, metric_history, regression_data

from lightning_optloss import MLFlowLogger, OptimizeLoss
from lightning_optloss.mlflow import delivery as delivery_module
from lightning_optloss.mlflow import logger as logger_module
from lightning_optloss.mlflow import replay as mlflow_replay
from lightning_optloss.mlflow.records import batch_record

PASSWORD = "pa55-W0rd-h11"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    launched = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    launched.start(timeout=300.0)  # seconds on an idle machine; minutes on a loaded one
    yield launched
    launched.kill()


@pytest.fixture
def proxy(server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as opened:
        yield opened


class Logged(TinyRegression):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def new_logger(uri: str, spill_dir: Path, **kwargs) -> MLFlowLogger:  # type: ignore[no-untyped-def]
    """A logger whose run exists (created while the server answers, as at the start of a fit)."""
    options = {"flush_timeout": 10.0, "request_timeout": 5.0, **kwargs}
    name = f"faults-{uuid.uuid4().hex[:10]}"
    logger = MLFlowLogger(experiment_name=name, tracking_uri=uri, spill_dir=spill_dir, **options)
    assert logger.run_id
    return logger


def fit(logger: MLFlowLogger, steps: int) -> None:
    make_trainer([OptimizeLoss()], logger=logger, max_steps=steps).fit(Logged(), regression_data(steps))


def warned(records: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(record.message) for record in records if text in str(record.message)]


def stored_steps(server: MlflowServer, run_id: str, key: str = "train_loss") -> list[int]:
    history = metric_history(MLFlowLogger(tracking_uri=server.store_uri, run_id=run_id))
    return sorted(history.get(key, {}))


def artifact_paths(server: MlflowServer, run_id: str, folder: str | None = None) -> set[str]:
    return {item.path for item in MlflowClient(server.store_uri).list_artifacts(run_id, folder)}


def mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs on ``folder`` (True), or False where this process may not (not root, or no mounts)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )


def inject(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make every write of the logger under ``folder`` fail with ``OSError(code)``."""

    def refusing(original):  # type: ignore[no-untyped-def]
        def refuse(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(path).resolve().is_relative_to(folder.resolve()):
                raise OSError(code, os.strerror(code), str(path))
            return original(path, *args, **kwargs)

        return refuse

    monkeypatch.setattr(delivery_module, "open_private", refusing(delivery_module.open_private))
    monkeypatch.setattr(delivery_module, "make_private_folder", refusing(delivery_module.make_private_folder))
    monkeypatch.setattr(logger_module, "make_private_folder", refusing(logger_module.make_private_folder))


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "full"
    if mount_tmpfs(folder, "size=128k,mode=0700"):
        try:
            with open(folder / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        inject(monkeypatch, folder, errno.ENOSPC)
        yield folder


@pytest.fixture
def read_only_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    if mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        inject(monkeypatch, folder, errno.EROFS)
        yield folder


def test_full_spill_disk_with_the_server_down_drops_counted_records_and_the_fit_ends_normally(
    server, proxy, full_disk, recwarn
):
    logger = new_logger(proxy.uri(), full_disk, max_queue=4, flush_timeout=0.5)
    run_id = logger.run_id
    proxy.mode = "down"
    fit(logger, 12)  # no OSError reaches the training thread

    (disk,) = warned(recwarn.list, "a disk problem, not an MLflow one")
    assert "No space left on device" in disk or "ENOSPC" in disk or "Errno 28" in disk
    (dropped,) = warned(recwarn.list, "MLFlowLogger: dropped ")
    assert "steps 0 to 11" in dropped and "status FINISHED" in dropped and "not in the MLflow run" in dropped
    assert not warned(recwarn.list, "could not be delivered")  # nothing waits in a file: it said what it dropped
    for path in full_disk.rglob("*.jsonl"):  # no half-written line left behind
        assert all(json.loads(line) for line in path.read_text().splitlines())
    proxy.mode = "pass"
    run = MlflowClient(server.store_uri).get_run(run_id)
    assert run.info.status == "RUNNING" and stored_steps(server, run_id) == []  # the server saw nothing


def test_read_only_spill_folder_with_the_store_reachable_loses_nothing_and_finishes(
    server, proxy, read_only_disk, recwarn, monkeypatch
):
    monkeypatch.setenv("LIGHTNING_OPTLOSS_PLOTS", "1")
    logger = new_logger(proxy.uri(), read_only_disk)
    fit(logger, 6)  # finalize does not raise

    run = MlflowClient(server.store_uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert stored_steps(server, logger.run_id) == list(range(6))
    uploaded = artifact_paths(server, logger.run_id, "optimize_loss")
    assert "optimize_loss/config.json" in uploaded
    assert any(path.endswith(".png") for path in artifact_paths(server, logger.run_id, "optimize_loss/plots"))
    assert len(warned(recwarn.list, "a disk problem, not an MLflow one")) == 1
    assert not warned(recwarn.list, "MLFlowLogger: dropped ")
    assert list(read_only_disk.iterdir()) == []


def test_unwritable_spill_folder_uploads_config_and_plots_directly_and_blames_the_disk(
    server, proxy, tmp_path, recwarn, monkeypatch
):
    monkeypatch.setenv("LIGHTNING_OPTLOSS_PLOTS", "1")
    spill_dir = tmp_path / "no-access"
    inject(monkeypatch, spill_dir, errno.EACCES)
    logger = new_logger(proxy.uri(), spill_dir)
    fit(logger, 4)

    assert "optimize_loss/config.json" in artifact_paths(server, logger.run_id, "optimize_loss")
    assert artifact_paths(server, logger.run_id, "optimize_loss/plots")
    assert MlflowClient(server.store_uri).get_run(logger.run_id).info.status == "FINISHED"
    (disk,) = warned(recwarn.list, "a disk problem, not an MLflow one")
    assert "Permission denied" in disk
    assert not warned(recwarn.list, "to MLflow")
    assert not spill_dir.exists()


def spill_file_of(server: MlflowServer, proxy: FaultProxy, tmp_path: Path, steps: int) -> tuple[str, Path]:
    """A run whose records the server never got, left in a spill file (the server down when fit ended)."""
    logger = new_logger(proxy.uri(), tmp_path / "spill", flush_timeout=0.2, max_queue=2)
    run_id = logger.run_id
    proxy.mode = "down"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(logger, steps)
    proxy.mode = "pass"
    (spill,) = (tmp_path / "spill").glob("mlflow-*.jsonl")
    return run_id, spill


def test_replay_delivers_every_readable_record_and_names_the_damaged_line(server, proxy, tmp_path, capsys):
    run_id, spill = spill_file_of(server, proxy, tmp_path, 5)
    lines = spill.read_bytes().splitlines(keepends=True)
    damaged = 3
    lines[damaged - 1] = lines[damaged - 1][:25] + b"\n"  # what a crash mid-write leaves
    spill.write_bytes(b"".join(lines))

    assert mlflow_replay.main([str(spill), "--tracking-uri", server.uri]) == 1
    out, err = capsys.readouterr()
    assert f"{spill}:{damaged}: skipped: not a JSON object" in err
    assert f"delivered {len(lines) - 1} of {len(lines) - 1} records" in out
    assert MlflowClient(server.store_uri).get_run(run_id).info.status == "FINISHED"
    assert len(stored_steps(server, run_id)) >= 4  # the damaged line held at most one step


def test_replay_reports_a_malformed_record_as_refused_not_as_try_again(server, proxy, tmp_path, capsys):
    run_id, spill = spill_file_of(server, proxy, tmp_path, 2)
    with open(spill, "a") as file:
        file.write(json.dumps({"type": "batch", "run_id": run_id, "metrics": [{"key": "x"}], "params": [], "tags": []}))
        file.write("\n")
    assert mlflow_replay.main([str(spill), "--tracking-uri", server.uri]) == 1
    err = capsys.readouterr().err
    assert "skipped: a batch record whose metrics are not a list of objects with key, value, timestamp, step" in err
    assert "run the same command again" not in err
    assert stored_steps(server, run_id) == [0, 1]


def test_replay_refuses_an_artifact_outside_the_spill_files_own_folder(server, proxy, tmp_path, capsys):
    run_id, spill = spill_file_of(server, proxy, tmp_path, 2)
    with open(spill, "a") as file:
        for path in ("/etc/hostname", str(spill.with_suffix(".artifacts") / ".." / ".." / "secret.txt")):
            file.write(json.dumps({"type": "artifact", "run_id": run_id, "local_path": path, "artifact_path": "x"}))
            file.write("\n")
    (tmp_path / "secret.txt").write_text("not for the server")

    assert mlflow_replay.main([str(spill), "--tracking-uri", server.uri, "--dry-run"]) == 1
    assert "/etc/hostname is outside" in capsys.readouterr().out
    assert mlflow_replay.main([str(spill), "--tracking-uri", server.uri]) == 1
    err = capsys.readouterr().err
    assert "refused: /etc/hostname is outside" in err and "secret.txt is outside" in err
    assert artifact_paths(server, run_id, "x") == set()
    assert "optimize_loss/config.json" in artifact_paths(server, run_id, "optimize_loss")  # staged: accepted


def test_a_password_in_the_tracking_uri_appears_in_no_output(server, proxy, tmp_path, recwarn, caplog, capfd):
    uri = proxy.uri(f"alice:{PASSWORD}@")
    logger = new_logger(uri, tmp_path / "spill", flush_timeout=0.3)
    logger.log_hyperparams({"tracking": f"{uri}/?token={PASSWORD}"})
    proxy.mode = "down"
    with caplog.at_level("DEBUG"):
        fit(logger, 3)
    proxy.mode = "pass"
    (spill,) = (tmp_path / "spill").glob("mlflow-*.jsonl")
    (flush,) = warned(recwarn.list, "could not be delivered")
    assert "alice:***@" in flush
    training_output = "".join(capfd.readouterr())
    with caplog.at_level("DEBUG"):
        assert mlflow_replay.main([str(spill), "--tracking-uri", uri]) == 0  # prints MLflow's "View run" line too
    replay_output = "".join(capfd.readouterr())
    assert "delivered" in replay_output and "View run" in replay_output
    run = MlflowClient(server.store_uri).get_run(logger.run_id)
    assert run.data.params["tracking"] == f"{proxy.uri('alice:***@')}/?token=***"
    outputs = {
        "warnings": "\n".join(str(record.message) for record in recwarn.list),
        "logs": caplog.text,
        "training stdout and stderr": training_output,
        "replay stdout and stderr": replay_output,
        "files": "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file()),
        "params and tags": json.dumps([run.data.params, run.data.tags]),
    }
    assert {name: PASSWORD in text for name, text in outputs.items()} == dict.fromkeys(outputs, False)
    assert outputs["warnings"].count("cannot reach the MLflow server") == 1


def test_spill_files_and_folders_are_private_to_their_owner(server, proxy, tmp_path):
    spill_dir = tmp_path / "new" / "spill"
    logger = new_logger(proxy.uri(), spill_dir, flush_timeout=0.2, max_queue=2)
    proxy.mode = "down"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(logger, 3)
    proxy.mode = "pass"
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*")}
    spill = [name for name in modes if name.endswith(".jsonl")]
    assert spill and all(modes[name] == 0o600 for name in spill), modes
    folders = [name for name in modes if (tmp_path / name).is_dir()]
    assert all(modes[name] == 0o700 for name in folders), modes


def test_a_server_slower_than_the_request_timeout_gets_a_longer_one_and_each_record_once(
    server, proxy, tmp_path, recwarn
):
    logger = new_logger(proxy.uri(), tmp_path / "spill", request_timeout=0.3, flush_timeout=30.0)
    run_id = logger.run_id
    proxy.mode, proxy.delay = "slow", 0.5
    fit(logger, 3)
    proxy.mode = "pass"
    assert stored_steps(server, run_id) == [0, 1, 2]  # metric_history also checks each point is stored once
    assert MlflowClient(server.store_uri).get_run(run_id).info.status == "FINISHED"
    (slow,) = warned(recwarn.list, "is too slow")
    assert "doubles after each timeout, up to 2.4 s" in slow
    assert not warned(recwarn.list, "cannot reach")


def test_a_server_answering_503_is_told_apart_from_an_unreachable_one(server, proxy, tmp_path, recwarn):
    logger = new_logger(proxy.uri(), tmp_path / "spill", flush_timeout=10.0)
    proxy.mode = "error"
    logger.log_metrics({"x": 1.0}, step=0)
    deadline = time.monotonic() + 10
    while not warned(recwarn.list, "answered 503") and time.monotonic() < deadline:
        time.sleep(0.05)
        logger.log_metrics({"x": 2.0}, step=1)
    proxy.mode = "pass"
    logger.finalize("success")
    assert warned(recwarn.list, "answered 503 (reachable, but failing)")
    assert not warned(recwarn.list, "cannot reach")
    assert stored_steps(server, logger.run_id, "x")[:2] == [0, 1]


def test_a_backlog_of_wide_records_stays_under_max_queue_bytes_and_drains_in_merged_calls(server, proxy, tmp_path):
    tensors = 400  # per-tensor summaries of a wide model: one record of about 40 kB per logged step
    logger = new_logger(proxy.uri(), tmp_path / "spill", max_queue_bytes=200_000, flush_timeout=60.0)
    proxy.mode = "down"
    peak = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(40):
            logger.log_metrics({f"OptimizeLoss/gradients/t{i}/norm": float(step + i) for i in range(tensors)}, step)
            peak = max(peak, logger.stats["queued_bytes"])
    assert 0 < peak <= 200_000
    assert logger.stats["spilled"] > 0
    proxy.mode = "pass"
    logger.finalize("success")
    stats = logger.stats
    assert stats["delivered"] == 41  # 40 steps and the status
    assert stats["calls"] <= 40 * tensors // 1000 + 8, stats  # 1000 metrics per log_batch, not one call per step
    history = metric_history(MLFlowLogger(tracking_uri=server.store_uri, run_id=logger.run_id))
    assert len(history) == tensors and all(sorted(steps) == list(range(40)) for steps in history.values())


KILLED_WRITER = """
import os, signal, sys
from lightning_optloss import MLFlowLogger
logger = MLFlowLogger(tracking_uri=sys.argv[1], run_id=sys.argv[2], spill_dir=sys.argv[3], durable=True)
logger.experiment  # the run is found while the server answers, as at the start of a resumed fit
print("ready", flush=True)
sys.stdin.readline()  # the test takes the server away
for step in range(30):
    logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill: no finalize, no atexit
"""


def other_runs_leftover(spill_dir: Path) -> Path:
    other = spill_dir / "mlflow-0123456789abcdef0123456789abcdef-20260101-000000.jsonl"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text(json.dumps({"type": "status", "run_id": "0" * 32, "status": "FINISHED", "end_time": 1}) + "\n")
    return other


def assert_leftovers_delivered(server, proxy, spill_dir, run_id, left, other, recwarn, steps):  # type: ignore[no-untyped-def]
    resumed = new_logger(proxy.uri(), spill_dir, run_id=run_id)
    resumed.log_metrics({"loss": 0.01}, step=steps)
    resumed.finalize("success")
    assert stored_steps(server, run_id, "loss") == list(range(steps + 1))
    (same,) = warned(recwarn.list, "spill file(s) of this run")
    assert left.name in same and "delivered first" in same
    (others,) = warned(recwarn.list, "of other runs")
    assert other.name in others and "lightning_optloss.mlflow_replay" in others
    assert not left.exists() and other.exists()


def test_the_next_start_in_the_same_folder_delivers_what_a_killed_run_left(server, proxy, tmp_path, recwarn):
    """What a SIGKILL in durable mode leaves (records appended, the last line cut), delivered by the next start."""
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment(f"left-{uuid.uuid4().hex[:8]}")).info.run_id
    spill_dir = tmp_path / "spill"
    other = other_runs_leftover(spill_dir)
    left = spill_dir / f"mlflow-{run_id}-20260101-000001.jsonl"
    timestamp = int(time.time() * 1000)
    lines = [json.dumps(batch_record(run_id, [Metric("loss", 1.0 / (s + 1), timestamp, s)])) for s in range(10)]
    left.write_text("\n".join(lines) + "\n" + lines[0][:20])  # killed in the middle of a write
    assert_leftovers_delivered(server, proxy, spill_dir, run_id, left, other, recwarn, 10)


@pytest.mark.slow
def test_a_killed_durable_run_is_delivered_by_the_next_start_in_the_same_folder(server, proxy, tmp_path, recwarn):
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment(f"killed-{uuid.uuid4().hex[:8]}")).info.run_id
    spill_dir = tmp_path / "spill"
    other = other_runs_leftover(spill_dir)
    command = [sys.executable, "-c", KILLED_WRITER, proxy.uri(), run_id, str(spill_dir)]
    writer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()[-2000:]
    proxy.mode = "down"
    writer.stdin.write("go\n")
    writer.stdin.flush()
    assert writer.wait(timeout=300) == -9, writer.stderr.read()[-2000:]
    (left,) = [path for path in spill_dir.glob("mlflow-*.jsonl") if path != other]
    assert len(left.read_text().splitlines()) == 30  # every record that log_metrics returned is on disk
    proxy.mode = "pass"
    assert_leftovers_delivered(server, proxy, spill_dir, run_id, left, other, recwarn, 30)
