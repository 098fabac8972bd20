"""lightning_optloss.MLFlowLogger against a real ``mlflow server`` that is killed and restarted mid-run.

One server for the module (its start takes seconds); the tests that kill it start it again on the same port and
store. The store is read back from its sqlite file, so it can be checked while the server is down.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow import MlflowClient
from mlflow_server import MlflowServer
from support import TinyRegression, make_trainer, metric_history, regression_data
from torch import Tensor

from lightning_optloss import MLFlowLogger, OptimizeLoss
from lightning_optloss.mlflow import replay as mlflow_replay
from lightning_optloss.mlflow.outbox import replay_command

SUMMARIES = ("OptimizeLoss/loss", "OptimizeLoss/learning_rate", "OptimizeLoss/global_norm/gradient_norm")
HPARAMS = {"width": 8, "optimizer": "SGD"}


# The module's server (tests/mlflow/conftest.py) is launched when the module starts: the tests without a server
# run while it boots.
pytestmark = pytest.mark.usefixtures("server")


class LoggingRegression(TinyRegression):
    """TinyRegression with hyperparameters and a metric of its own (``self.log``); fails at ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(HPARAMS)
        self.fail_at = fail_at

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError(f"failure at batch {batch_idx}")
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


class TimedLogger(MLFlowLogger):
    """Records how long each ``log_metrics`` call held the training thread, and whether the server was up."""

    def __init__(self, server: MlflowServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = server
        self.calls: list[tuple[float, bool]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        started = time.perf_counter()
        super().log_metrics(metrics, step)
        self.calls.append((time.perf_counter() - started, self.server.running))


class Outage(Callback):
    """Kills the server after global step ``kill_after``, starts it again after ``restart_after`` (None: never),
    and notes the spill files seen on disk while it is down."""

    def __init__(self, server: MlflowServer, kill_after: int | None, restart_after: int | None, spill_dir: Path):
        self.server = server
        self.kill_after = kill_after
        self.restart_after = restart_after
        self.spill_dir = spill_dir
        self.spilled_while_down: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.kill_after:
            self.server.kill()
        if not self.server.running:
            self.spilled_while_down.update(path.name for path in self.spill_dir.glob("*.jsonl"))
        if trainer.global_step == self.restart_after:
            self.server.start()  # the callback waits for the server; log_metrics never does


def new_logger(server: MlflowServer, tmp_path: Path, **kwargs: Any) -> TimedLogger:
    return TimedLogger(
        server,
        experiment_name=f"outage-{uuid.uuid4().hex[:12]}",
        tracking_uri=server.uri,
        spill_dir=tmp_path / "spill",
        request_timeout=2.0,
        **kwargs,
    )


def stored(server: MlflowServer, logger: MLFlowLogger) -> tuple[dict[str, dict[int, float]], Any]:
    """The run's metric histories and the run itself, read from the server's sqlite store."""
    store_logger = MLFlowLogger(tracking_uri=server.store_uri, run_id=logger.run_id)
    return metric_history(store_logger), MlflowClient(server.store_uri).get_run(logger.run_id)


def assert_every_step_stored(history: dict[str, dict[int, float]], steps: int) -> None:
    for key in (*SUMMARIES, "train_loss"):
        assert sorted(history[key]) == list(range(steps)), key


def messages(records: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(record.message) for record in records if text in str(record.message)]


def delivery_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("mlflow-delivery-")]


def test_replay_reports_an_unreachable_server_and_exits_non_zero(tmp_path, capsys):
    record = {"type": "status", "run_id": "0" * 32, "status": "FINISHED", "end_time": 1}
    spill_file = tmp_path / "spill.jsonl"
    spill_file.write_text(json.dumps(record) + "\n")
    closed = MlflowServer(tmp_path)  # never started: nothing listens on its port
    assert mlflow_replay.main([str(spill_file), "--tracking-uri", closed.uri, "--request-timeout", "2"]) == 1
    assert "stopped at record 1 of 1 (status)" in capsys.readouterr().err


def test_replay_reports_a_line_that_is_not_a_record_by_number(tmp_path, capsys):
    spill_file = tmp_path / "notes.jsonl"
    spill_file.write_text('{"type": "status", "run_id": "x", "status": "FINISHED", "end_time": 1}\nhello\n')
    assert mlflow_replay.main([str(spill_file), "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"]) == 1
    err = capsys.readouterr().err
    assert "notes.jsonl:2: skipped: not a JSON object" in err
    assert "record 1 (status) refused" in err  # run x does not exist in the store


def test_metric_keys_lose_the_characters_the_stock_logger_drops(tracking_uri, tmp_path):
    logger = MLFlowLogger(experiment_name=f"keys-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri)
    with pytest.warns(RuntimeWarning, match="Replacing loss\\(train\\) with losstrain"):
        logger.log_metrics({"loss(train)": 1.5}, step=3)
    logger.finalize()
    assert metric_history(logger) == {"losstrain": {3: 1.5}}


def test_optimize_loss_warns_once_about_the_stock_logger_only(mlflow_logger, tracking_uri, tmp_path):
    with pytest.warns(UserWarning, match="Use lightning_optloss.MLFlowLogger"):
        make_trainer([OptimizeLoss()], logger=mlflow_logger, max_steps=1).fit(TinyRegression(), regression_data(1))
    ours = MLFlowLogger(experiment_name=f"ours-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([OptimizeLoss()], logger=ours, max_steps=1).fit(TinyRegression(), regression_data(1))
    assert not messages(caught, "lightning_optloss.MLFlowLogger")


def test_other_ranks_start_no_thread_and_send_nothing(tracking_uri, monkeypatch):
    logger = MLFlowLogger(experiment_name=f"rank-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"m": 1.0}, step=0)
    logger.log_tags({"t": "v"})
    logger.finalize()
    assert logger.pending == 0
    assert not delivery_threads()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert logger._run_id is None  # rank 1 never created a run


def test_the_logger_pickles_for_ddp_spawn_and_logs_after(tracking_uri):
    import pickle

    logger = MLFlowLogger(experiment_name=f"pickle-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri)
    logger.log_metrics({"m": 1.0}, step=0)
    copy = pickle.loads(pickle.dumps(logger))
    copy.log_metrics({"m": 2.0}, step=1)
    copy.log_tags({"phase": "copy"})
    copy.finalize()
    logger.finalize()
    assert metric_history(logger) == {"m": {0: 1.0, 1: 2.0}}
    assert MlflowClient(tracking_uri).get_run(logger.run_id).data.tags["phase"] == "copy"


def test_logging_after_finalize_starts_a_new_worker(tracking_uri):
    """Trainer.fit then Trainer.test: finalize runs after each, and the same run gets more records."""
    logger = MLFlowLogger(experiment_name=f"again-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri)
    logger.log_metrics({"m": 1.0}, step=0)
    logger.finalize()
    assert not delivery_threads()
    logger.log_metrics({"m": 2.0}, step=1)
    logger.finalize()
    assert metric_history(logger) == {"m": {0: 1.0, 1: 2.0}}
    assert MlflowClient(tracking_uri).get_run(logger.run_id).info.status == "FINISHED"


def test_extra_options_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        MLFlowLogger("e", None, None, None, "./mlruns", False, "", None, None, None, 10)
    with pytest.raises(ValueError, match="`max_queue` must be an integer >= 1; got 0"):
        MLFlowLogger(max_queue=0)
    with pytest.raises(ValueError, match=r"`flush_timeout` must be a finite number >= 0\.0; got -1"):
        MLFlowLogger(flush_timeout=-1)
    for niceness in (-1, 20, 1.5, True):
        with pytest.raises(ValueError, match=r"`delivery_niceness` must be an integer >= 0 and < 20; got "):
            MLFlowLogger(delivery_niceness=niceness)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_delivery_thread_stores_at_a_lower_priority_than_the_training_thread(tracking_uri):
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    logger = MLFlowLogger(
        experiment_name=f"nice-{uuid.uuid4().hex[:12]}", tracking_uri=tracking_uri, delivery_niceness=7
    )
    logger.log_metrics({"m": 1.0}, step=0)
    (thread,) = delivery_threads()
    deadline = time.monotonic() + 10.0
    while os.getpriority(os.PRIO_PROCESS, thread.native_id) != min(19, training + 7):
        assert time.monotonic() < deadline, "the delivery thread's priority was not lowered"
        time.sleep(0.01)
    logger.finalize()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == training
    assert metric_history(logger) == {"m": {0: 1.0}}


def test_training_goes_on_through_a_server_restart_and_every_record_arrives(live_server, tmp_path, recwarn):
    logger = new_logger(live_server, tmp_path, max_queue=2)
    outage = Outage(live_server, kill_after=3, restart_after=7, spill_dir=tmp_path / "spill")
    trainer = make_trainer([OptimizeLoss(), outage], logger=logger, max_steps=12)
    trainer.fit(LoggingRegression(), regression_data(12))

    history, run = stored(live_server, logger)
    assert_every_step_stored(history, 12)
    user_params = {key: value for key, value in run.data.params.items() if not key.startswith("optimize_loss.")}
    assert user_params == {key: str(value) for key, value in HPARAMS.items()}
    assert "optimize_loss.clip_mode" in run.data.params  # the run configuration went through the outage too
    assert run.info.status == "FINISHED"
    # Not a performance test: while the server was down no call may have waited for a send or a retry.
    down = [seconds for seconds, up in logger.calls if not up]
    assert len(down) >= 6
    assert max(down) < 1.0
    assert outage.spilled_while_down, "with max_queue=2 the outage should have moved records to disk"
    assert not list((tmp_path / "spill").glob("*.jsonl")), "delivered records stay on disk"
    assert len(messages(recwarn.list, "cannot reach the MLflow server")) == 1
    assert not messages(recwarn.list, "could not be delivered")
    assert not delivery_threads()


def test_records_left_when_fit_ends_with_the_server_down_are_replayed_later(live_server, tmp_path, recwarn, capsys):
    logger = new_logger(live_server, tmp_path, max_queue=2, flush_timeout=0.5, log_model="all")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    watch = Outage(live_server, kill_after=None, restart_after=None, spill_dir=tmp_path / "spill")
    assert logger.run_id  # the run is created while the server is up
    live_server.kill()
    trainer = make_trainer([OptimizeLoss(), checkpoints, watch], logger=logger, max_steps=6, enable_checkpointing=True)
    trainer.fit(LoggingRegression(), regression_data(6))

    (spill_file,) = (tmp_path / "spill").glob("*.jsonl")
    assert watch.spilled_while_down == {spill_file.name}, "with max_queue=2 records go to disk during the run"
    (final,) = messages(recwarn.list, "could not be delivered")
    assert f"Deliver them with: {replay_command(spill_file, live_server.uri)}" in final
    assert len(messages(recwarn.list, "cannot reach the MLflow server")) == 1
    records = [json.loads(line) for line in spill_file.read_text().splitlines()]
    assert records[-1]["type"] == "status" and records[-1]["status"] == "FINISHED"
    artifacts = [record for record in records if record["type"] == "artifact"]
    assert {Path(record["local_path"]).name for record in artifacts} >= {"epoch=0-step=2.ckpt", "metadata.yaml"}
    assert all(Path(record["local_path"]).is_file() for record in artifacts)

    live_server.start()
    command = [str(spill_file), "--tracking-uri", live_server.uri]
    assert mlflow_replay.main(command) == 0
    assert f"delivered {len(records)} of {len(records)} records to run {logger.run_id}" in capsys.readouterr().out
    history, run = stored(live_server, logger)
    assert_every_step_stored(history, 6)
    user_params = {key: value for key, value in run.data.params.items() if not key.startswith("optimize_loss.")}
    assert user_params == {key: str(value) for key, value in HPARAMS.items()}
    assert run.data.params["optimize_loss.clip_mode"] == "none"  # OptimizeLoss's run configuration, replayed
    assert run.info.status == "FINISHED"
    assert run.info.end_time == records[-1]["end_time"]
    client = MlflowClient(live_server.uri)
    logged = {item.path for item in client.list_artifacts(logger.run_id, "epoch=0-step=2")}
    assert logged == {f"epoch=0-step=2/{name}" for name in ("epoch=0-step=2.ckpt", "metadata.yaml", "aliases.txt")}
    assert "optimize_loss/config.json" in {item.path for item in client.list_artifacts(logger.run_id, "optimize_loss")}

    assert mlflow_replay.main(command) == 0  # a second replay changes nothing and does not fail
    assert metric_history(MLFlowLogger(tracking_uri=live_server.store_uri, run_id=logger.run_id)) == history


def test_an_exception_in_training_still_flushes_what_was_logged_before_it(live_server, tmp_path, recwarn):
    logger = new_logger(live_server, tmp_path)
    trainer = make_trainer([OptimizeLoss()], logger=logger, max_steps=10)
    with pytest.raises(RuntimeError, match="failure at batch 5"):
        trainer.fit(LoggingRegression(fail_at=5), regression_data(10))
    history, run = stored(live_server, logger)
    assert_every_step_stored(history, 5)
    assert run.info.status == "FAILED"
    assert not delivery_threads()
    assert not messages(recwarn.list, "MLFlowLogger")
