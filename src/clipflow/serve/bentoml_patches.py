"""Everything clipflow takes from BentoML's private modules, for the one BentoML version it was written against.

BentoML's public API cannot choose how batches are dispatched, how requests are parsed, or tell
which store a process already uses, so clipflow reaches into `bentoml._internal` and
`_bentoml_impl` for those, here and nowhere else:

- `CorkDispatcher` and `NonBlockSema`, the bases of `clipflow.serve.dispatch.FillingDispatcher`,
  and the service app module's `CorkDispatcher` name that `install()` points at the dispatcher it is given;
- `JSONSerde` and `MultipartSerde`, the bases of the strict parsers in `clipflow.serve.http`,
  `Payload`, what the JSON parser deserialises, and the `ALL_SERDE` table that `install()` puts
  them in;
- the BentoML container's `bentoml_home`, the store this process uses (`store_home()`), and its
  `prometheus_multiproc_dir`, which `own_metrics_folder()` gives each server a folder of;
- `RunnerTrafficMetricsMiddleware`, whose request metrics `install()` replaces with ones that
  label every path that is not a route alike, and the service app's `log_exception`, which
  `install()` makes log a client's error in one line;
- the service app's `api_endpoint_wrapper`, whose 4xx answers `install()` unwraps from the
  one-element list BentoML puts them in (`[{"error": ...}]`) into `{"error": ...}`, the shape
  every other refusal of the server has;
- the new SDK's `generate_spec` and the `OpenAPISpecification` it returns, which `install()`
  passes through clipflow's rewrite of the spec `/docs.json` serves;
- the new SDK's `IOMixin.mime_type`, which builds an endpoint's whole JSON schema to name the media
  type of each answer, a cost every one-item request paid again, and which `install()` makes
  remember its answer per class.

Private modules change without notice between releases, so `install()` and `store_home()` refuse
any version but `PINNED_VERSION` (pyproject.toml pins the same), rather than patching something
that is no longer there or no longer means the same.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from clipflow.errors import ClipflowError

# The version whose private modules this file was read against; pyproject.toml pins the same.
PINNED_VERSION = "1.4.40"
DISTRIBUTION = "bentoml"


def installed_version() -> str:
    """The installed BentoML version, as its distribution's metadata records it."""
    return version(DISTRIBUTION)


def check_version() -> None:
    """Raise ClipflowError unless the installed BentoML is the pinned one."""
    installed = installed_version()
    if installed != PINNED_VERSION:
        raise ClipflowError(
            f"clipflow patches BentoML {PINNED_VERSION}'s private modules, but BentoML {installed} is "
            f"installed: install bentoml=={PINNED_VERSION} (pyproject.toml pins it)"
        )


try:
    from _bentoml_impl import serde as _serde
    from _bentoml_impl.server import app as _service_app
    from _bentoml_sdk import io_models as _io_models
    from _bentoml_sdk.service import openapi as _sdk_openapi
    from bentoml._internal.configuration.containers import BentoMLContainer as _Container
    from bentoml._internal.context import server_context as _server_context
    from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema
    from bentoml._internal.server.http import instruments as _instruments
    from bentoml._internal.service.openapi.specification import OpenAPISpecification as _OpenAPISpecification
    from bentoml._internal.utils.cattr import bentoml_cattr as _cattr
except ImportError as exc:  # another BentoML moved them: say which versions, not only what is missing
    check_version()
    raise ClipflowError(f"BentoML {installed_version()} lacks a private module clipflow uses: {exc}") from None

JSONSerde = _serde.JSONSerde
MultipartSerde = _serde.MultipartSerde
Payload = _serde.Payload

__all__ = [
    "CorkDispatcher",
    "JSONSerde",
    "MultipartSerde",
    "NonBlockSema",
    "Payload",
    "install",
    "own_metrics_folder",
    "store_home",
]


# The `endpoint` label of every request to a path that is neither a route nor a labelled path.
OTHER_PATHS = "other"
_ORIGINAL_PATH = "clipflow.path"
_logger = logging.getLogger("bentoml.serve")
# BentoML's own, which `install()` replaces.
_log_exception = _service_app.log_exception
_instruments_middleware = _instruments.RunnerTrafficMetricsMiddleware
_api_endpoint_wrapper = _service_app.ServiceAppFactory.api_endpoint_wrapper
_generate_spec = _sdk_openapi.generate_spec
_mime_type = _io_models.IOMixin.__dict__["mime_type"].__func__
# What `install()` passes the OpenAPI spec through; None serves BentoML's own.
OpenAPIRewrite = Callable[[dict[str, Any]], dict[str, Any]]


def install(
    dispatcher: Callable[..., CorkDispatcher],
    serdes: Iterable[type[JSONSerde | MultipartSerde]],
    labelled_paths: Iterable[str] = (),
    openapi: OpenAPIRewrite | None = None,
) -> None:
    """Patch BentoML's service app to build `dispatcher` for every batchable endpoint and parse with `serdes`.

    clipflow passes `clipflow.serve.dispatch.FillingDispatcher` (BentoML's own runs one batch at
    a time) and `clipflow.serve.http`'s strict serdes; this module knows only where they go.
    The request metrics label the API routes and `labelled_paths` by their path and every other
    path as `OTHER_PATHS`: BentoML's label each path a client sends, about 20 series for each
    distinct unknown path, unauthenticated ones too. A request refused with a 4xx, or shed with
    a 503, is logged in one line, not as an error with its traceback, and answered
    `{"error": message}`. The OpenAPI spec (`/docs.json`, and the Bento's `apis/openapi.yaml`)
    is BentoML's passed through `openapi`. An answer's media type is worked out once per IO
    model, not on every answer. Calling it again replaces what an earlier call put in place.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    # The service app builds each batchable endpoint's dispatcher by this module-level name.
    _service_app.CorkDispatcher = dispatcher
    # BentoML looks its request parsers up by media type in this table on every request.
    for parser in serdes:
        _serde.ALL_SERDE[parser.media_type] = parser
    # The service app imports the middleware by this name when it builds its middleware stack.
    _instruments.RunnerTrafficMetricsMiddleware = type(
        "BoundedTrafficMetricsMiddleware", (_BoundedTrafficMetrics,), {"labelled_paths": frozenset(labelled_paths)}
    )
    # The service app calls this module-level name from inside each failed request's `except`.
    _service_app.log_exception = _log_request_error
    # The service app binds each endpoint's handler to this method when it builds its routes.
    _service_app.ServiceAppFactory.api_endpoint_wrapper = _error_as_object
    # A service imports this module-level name each time it is asked for its spec.
    _sdk_openapi.generate_spec = _generate_spec if openapi is None else _rewritten_spec(openapi)
    # An IO model's media type follows from its class alone, which never changes once defined.
    _io_models.IOMixin.mime_type = classmethod(functools.cache(_mime_type))


async def _error_as_object(self: Any, name: str, request: Any) -> Any:
    """BentoML's `api_endpoint_wrapper`, with a 4xx `[{"error": message}]` answered `{"error": message}`."""
    response = await _api_endpoint_wrapper(self, name, request)
    if 400 <= response.status_code < 500 and response.media_type == "application/json":
        answer = json.loads(response.body)
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict):
            response.body = response.render(answer[0])
            response.headers["content-length"] = str(len(response.body))
    return response


def _rewritten_spec(rewrite: OpenAPIRewrite) -> Callable[..., Any]:
    """BentoML's `generate_spec`, its result passed through `rewrite` as plain JSON."""

    def generate_spec(service: Any, **options: Any) -> Any:
        spec = _generate_spec(service, **options).asdict()
        # Back into BentoML's classes: `bentoml build` writes the spec with their YAML representers.
        return _cattr.structure(rewrite(spec), _OpenAPISpecification)

    return generate_spec


class _RestorePath:
    """The app behind the metrics middleware, given back the path `_BoundedTrafficMetrics` relabelled."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if _ORIGINAL_PATH in scope:
            scope = {**scope, "path": scope[_ORIGINAL_PATH]}
        await self.app(scope, receive, send)


class _BoundedTrafficMetrics(_instruments_middleware):
    """BentoML's request metrics, which label a request by its path, with unknown paths labelled alike."""

    labelled_paths: frozenset[str] = frozenset()

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(_RestorePath(app), **options)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path")
        if path is not None and path not in self.labelled_paths and path not in _server_context.service_routes:
            scope = {**scope, "path": OTHER_PATHS, _ORIGINAL_PATH: path}
        await super().__call__(scope, receive, send)


def _log_request_error(request: Any, exc_info: Any = True) -> None:
    """BentoML's `log_exception`, with a client's error (4xx) and a shed request (503) in one line."""
    from bentoml.exceptions import BentoMLException, ServiceUnavailable
    from pydantic import ValidationError

    error = sys.exc_info()[1]
    if isinstance(error, ValidationError):  # BentoML answers it 400
        status = 400
    elif isinstance(error, BentoMLException) and (error.error_code < 500 or isinstance(error, ServiceUnavailable)):
        status = int(error.error_code)
    else:
        _log_exception(request, exc_info)
        return
    reason = (str(error).splitlines() or [type(error).__name__])[0][:300]
    level = logging.WARNING if status >= 500 else logging.INFO
    _logger.log(level, "%s %s answered %d: %s", request.method, request.url.path, status, reason)


def own_metrics_folder() -> Path:
    """Give the server this process starts a Prometheus folder of its own; returns it.

    BentoML keeps its workers' metrics in one folder of its home, which every server it starts
    empties first, so a second server on the same machine would wipe the first one's metrics.
    Each server gets `prometheus/<pid>` instead; the folders of servers no longer running are
    removed.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    parent = Path(_Container.bentoml_home.get()) / "prometheus"
    parent.mkdir(parents=True, exist_ok=True)
    for folder in parent.iterdir():
        if folder.name.isdigit() and not _running(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    folder = parent / str(os.getpid())
    _Container.prometheus_multiproc_dir.set(str(folder))
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def store_home() -> Path:
    """The BentoML store this process uses; BentoML fixes it from `$BENTOML_HOME` on first use.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    return Path(_Container.bentoml_home.get()).resolve()
