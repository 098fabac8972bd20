"""The private MLflow APIs of lightning_optloss.mlflow._private still exist in the installed MLflow, as used.

When an MLflow upgrade moves or changes one, these fail naming it; the fix belongs in ``_private.py`` alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.protos.service_pb2 import LogBatch
from mlflow.store.tracking.rest_store import RestStore

import lightning_optloss
from lightning_optloss.mlflow import _private


def test_every_private_mlflow_api_the_package_uses_is_still_there():
    missing = _private.missing_private_apis()
    assert not missing, (
        f"MLflow {mlflow.__version__} changed private APIs that lightning_optloss/mlflow/_private.py relies on: "
        + "; ".join(missing)
    )


def test_log_batch_has_an_endpoint_and_a_method_in_the_private_table():
    endpoint, method = RestStore._METHOD_TO_INFO[LogBatch]
    assert (endpoint.endswith("/runs/log-batch"), method) == (True, "POST"), (
        f"RestStore._METHOD_TO_INFO[LogBatch] is now {(endpoint, method)}; _private.SingleTryRestStore sends "
        "log_batch there"
    )
    assert LogBatch not in RestStore._V3_APIS, "RestStore._V3_APIS now holds LogBatch: it would take MLflow's retries"


def test_no_module_but_the_adapter_touches_a_private_mlflow_name():
    pattern = re.compile(r"(?<![\w.])mlflow[\w.]*\._[a-z]|_call_endpoint|_METHOD_TO_INFO|_V3_APIS")
    root = Path(lightning_optloss.__file__).parent
    adapter = root / "mlflow" / "_private.py"
    offenders = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path != adapter and pattern.search(path.read_text())
    ]
    assert offenders == [], f"private MLflow names outside lightning_optloss/mlflow/_private.py: {offenders}"
