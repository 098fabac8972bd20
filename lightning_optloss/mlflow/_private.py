"""Every private MLflow API lightning_optloss relies on, in one place (checked by ``tests/test_mlflow_private_api.py``).

MLflow's REST client retries each request for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 retries with backoff
factor 2) and cannot be interrupted; the delivery worker needs one try with a timeout instead, and decides itself
when to try again. MLflow has no public switch for that, so :class:`SingleTryRestStore` overrides
``RestStore._call_endpoint`` and reads ``RestStore._METHOD_TO_INFO`` (endpoint and HTTP method of each API) and
``RestStore._V3_APIS`` (APIs with another route, left to MLflow), and :class:`SingleTryTrackingClient` subclasses
the private ``mlflow.tracking._tracking_service.client.TrackingServiceClient`` (and overrides its ``_log_url``,
which prints the tracking URI's credentials). :data:`PRIVATE_APIS` names them
all; :func:`missing_private_apis` says which of them an installed MLflow no longer has.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import sys
from typing import Any

from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import http_request, verify_rest_response

from lightning_optloss.common.redaction import redact

PRIVATE_APIS = (
    "mlflow.tracking._tracking_service.client.TrackingServiceClient",
    "mlflow.store.tracking.rest_store.RestStore._call_endpoint",
    "mlflow.store.tracking.rest_store.RestStore._METHOD_TO_INFO",
    "mlflow.store.tracking.rest_store.RestStore._V3_APIS",
    "mlflow.tracking._tracking_service.client.TrackingServiceClient._log_url",
)
"""The private MLflow names this module uses (``module.Class.attribute``)."""

_CALL_ENDPOINT_ARGUMENTS = ("self", "api", "json_body", "endpoint", "retry_timeout_seconds", "response_proto")


def missing_private_apis() -> list[str]:
    """The entries of :data:`PRIVATE_APIS` that the installed MLflow lacks or changed, each with what changed."""
    missing = []
    if not inspect.isclass(TrackingServiceClient) or not hasattr(TrackingServiceClient, "log_batch"):
        missing.append(f"{PRIVATE_APIS[0]} (no class with log_batch)")
    call_endpoint = getattr(RestStore, "_call_endpoint", None)
    if call_endpoint is None:
        missing.append(f"{PRIVATE_APIS[1]} (gone)")
    elif (
        tuple(inspect.signature(call_endpoint).parameters)[: len(_CALL_ENDPOINT_ARGUMENTS)] != _CALL_ENDPOINT_ARGUMENTS
    ):
        missing.append(f"{PRIVATE_APIS[1]} (arguments now {tuple(inspect.signature(call_endpoint).parameters)})")
    method_to_info = getattr(RestStore, "_METHOD_TO_INFO", None)
    if not isinstance(method_to_info, dict) or not all(
        isinstance(info, tuple) and len(info) == 2 for info in method_to_info.values()
    ):
        missing.append(f"{PRIVATE_APIS[2]} (not a dict of (endpoint, method) pairs)")
    if not isinstance(getattr(RestStore, "_V3_APIS", None), (set, frozenset, dict, list, tuple)):
        missing.append(f"{PRIVATE_APIS[3]} (gone or not a collection)")
    log_url = getattr(TrackingServiceClient, "_log_url", None)
    if log_url is None or tuple(inspect.signature(log_url).parameters) != ("self", "run_id"):
        missing.append(f"{PRIVATE_APIS[4]} (gone, or no longer (self, run_id))")
    return missing


class SingleTryRestStore(RestStore):
    """MLflow's REST store with each request tried once, ``timeout`` seconds at most (MLflow's own
    ``RestStore._get_server_version`` does the same, noting that the default retry policy takes minutes).

    A 5xx or 429 answer is returned to :func:`verify_rest_response` as it came (no retry), which raises it as an
    ``MlflowException`` carrying that HTTP status. ``timeout`` may be changed between calls.
    """

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        super().__init__(functools.partial(get_default_host_creds, tracking_uri))
        self.timeout = timeout

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
            retry_codes=frozenset(),
            raise_on_status=False,
            timeout=self.timeout,
            **{"params" if method == "GET" else "json": body},
        )
        response = verify_rest_response(response, endpoint)
        response_proto = response_proto or api.Response()
        if response.status_code != 204:
            parse_dict(js_dict=json.loads(response.text), message=response_proto)
        return response_proto


class SingleTryTrackingClient(TrackingServiceClient):
    """MLflow's tracking client on a :class:`SingleTryRestStore` (``store.timeout`` is its request timeout).

    ``set_terminated`` prints the run's URL (``TrackingServiceClient._log_url``) with the tracking URI's
    credentials; here they are redacted first.
    """

    def _log_url(self, run_id: str) -> None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            super()._log_url(run_id)
        sys.stdout.write(redact(printed.getvalue()))

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        self._single_try_store = SingleTryRestStore(tracking_uri, timeout)
        super().__init__(tracking_uri)

    @property
    def store(self) -> RestStore:
        return self._single_try_store
