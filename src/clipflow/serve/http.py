"""The HTTP edge of the served Bento: the web page, the API docs, an optional API key, request gates, strict parsing.

BentoML 1.4 runs the middleware classes in every API worker (`Service.add_asgi_middleware`);
they answer before BentoML reads a request, so neither an unauthorised nor an oversized request
reaches the model, and the pages are served without touching it. `/docs` is Swagger UI from
the files BentoML installs (`/static_content/`), over the OpenAPI spec as `ApiDocs` rewrites it:
nothing on either page is fetched from another host. Every refusal answers `{"error": message}`
(`ERROR_SCHEMA`), with the statuses `ERRORS` lists. The strict serdes, which
`clipflow.serve.bentoml_patches.install()` puts in place, change how BentoML turns a request
into arguments, so that what a client sends maps to clear 4xx answers:

- a request that does not fit an endpoint's signature (invalid JSON, a missing field, a wrong
  type) answers 422, with the fields at fault, where BentoML would answer 400;
- a malformed multipart body answers 400, where BentoML would answer 500;
- text in a file field answers 400, where BentoML would download it as a URL from the server;
- a file in a text field answers 400, where BentoML would answer 500;
- a client that hangs up mid-upload is answered 400, where BentoML would count a 500.

They also validate each request, which decodes its images, in a worker thread rather than on
the event loop, so a request of large images never stalls the others or the probes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import html
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import anyio
from bentoml.exceptions import BentoMLException, HTTPStatus, InvalidArgument, UnprocessableEntity
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipflow.serve.bentoml_patches import JSONSerde, MultipartSerde, Payload
from clipflow.serve.dispatch import SHED, Overloaded
from clipflow.serve.encoder import usable_cores

T = TypeVar("T")

API_KEY_ENV = "CLIPFLOW_API_KEY"
# Probes and Prometheus must work without the key (Kubernetes and scrapers send none), and
# the docs page and schema describe the API without calling it.
# The page holds no data: it asks for the key and sends it with each API call it makes.
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/", "/docs", "/docs.json", "/schema.json"})
DOCS_PATH = "/docs"
OPEN_PREFIXES = ("/static_content/",)
# BentoML also reads urlencoded forms, but then every file field is text it would fetch as a URL.
ACCEPTED_MEDIA_TYPES = frozenset({"application/json", "multipart/form-data"})
MAX_REPORTED_ERRORS = 5


async def send_error(send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer `{"error": message}` with `status`."""
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def is_open(path: str) -> bool:
    """Whether a path is served without the API key: probes, metrics and the docs."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ApiKeyMiddleware:
    """Require `Authorization: Bearer <key>` or `X-API-Key: <key>` when `CLIPFLOW_API_KEY` is set.

    The key is read from the worker's environment (a Kubernetes Secret arrives the same way,
    through `env.valueFrom.secretKeyRef`), compared in constant time, and never logged. Without
    the variable every request passes; an empty value stops the worker at startup rather than
    being read as "no key", so a missing Secret cannot silently open the API.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        key = os.environ.get(API_KEY_ENV)
        if key is not None and not key.strip():
            raise ValueError(f"{API_KEY_ENV} is set but empty; unset it to serve without an API key")
        self.key = key.strip().encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _presented_key(scope["headers"])
        if given is None:
            message = "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            await send_error(send, 401, message, ((b"www-authenticate", b"Bearer"),))
        elif not hmac.compare_digest(given, self.key):
            await send_error(send, 401, "wrong API key", ((b"www-authenticate", b'Bearer error="invalid_token"'),))
        else:
            await self.app(scope, receive, send)


class PageMiddleware:
    """Answer `GET /` with the web page, and `GET /docs` with the API docs page titled `docs_title`.

    Both are read or built once, at startup; a strict Content-Security-Policy lets each reach
    only this server. BentoML's own docs page, which they replace, loads Google Tag Manager.
    """

    def __init__(self, app: ASGIApp, page: Path, docs_title: str) -> None:
        self.app = app
        self.pages = {
            "/": (Path(page).read_bytes(), CONTENT_SECURITY_POLICY),
            DOCS_PATH: (docs_page(docs_title), DOCS_CONTENT_SECURITY_POLICY),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in self.pages:
            body, policy = self.pages[scope["path"]]
            headers = [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"content-security-policy", policy),
                (b"x-content-type-options", b"nosniff"),
                (b"cache-control", b"no-cache"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
            return
        await self.app(scope, receive, send)


# Inline script and style only (the page has no other files), images from blob: URLs the page makes
# from fetched thumbnails and uploads (and its empty data: icon), requests to this origin only.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
    b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Swagger UI's bundle, started by the one inline script. `validatorUrl: null`: by default it shows a
# badge that sends the spec's URL to validator.swagger.io.
DOCS_SCRIPT = (
    'window.ui = SwaggerUIBundle({url: "docs.json", dom_id: "#swagger-ui", deepLinking: true, '
    'validatorUrl: null, presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});'
)
# Swagger UI styles its elements inline and draws its icons as data: images; "Try it out" calls
# this server and shows an image answer from a blob: URL.
DOCS_CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self' 'sha256-"
    + base64.b64encode(hashlib.sha256(DOCS_SCRIPT.encode()).digest())
    + b"'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; "
    b"form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def docs_page(title: str) -> bytes:
    """The `/docs` page: Swagger UI from BentoML's installed copy, over `/docs.json`."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static_content/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="static_content/swagger-ui-bundle.js"></script>
<script>{DOCS_SCRIPT}</script>
</body>
</html>
""".encode()


# The one shape of every refusal, whichever layer answers it.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was refused and why, in one line"}},
    "additionalProperties": False,
    "example": {"error": "labels: 9 given, at most 8 allowed"},
}
# Every endpoint may answer these; `ApiDocs.gallery_paths` may also answer 404.
ERRORS = {
    400: "Input outside a limit of `serve:` in params.yaml, or an image that cannot be decoded; "
    "the message names the field and the limit.",
    401: "A missing or wrong API key, when the server's environment sets `CLIPFLOW_API_KEY`.",
    413: "A body over `serve.max_request_bytes`.",
    415: "A content type other than `application/json` or `multipart/form-data`.",
    422: "A request that does not fit the endpoint: invalid JSON, a missing field, a wrong type; "
    "the message names the fields at fault.",
    500: "A fault of the server; its log has the details.",
    503: "The server is too busy to answer in time: retry after the `Retry-After` header's seconds.",
}
NOT_FOUND = "This Bento was packaged without a gallery (`clipflow package --gallery DIR`), or has no item of that id."
# Schemas BentoML adds to every spec: task endpoints' (clipflow has none) and its error
# schemas, whose `detail` no answer has.
BENTOML_SCHEMAS = ("TaskStatusResponse", "InvalidArgument", "NotFound", "InternalServerError")


@dataclass(frozen=True)
class ApiDocs:
    """What `/docs` says beyond the endpoints' signatures; `rewrite` puts it in BentoML's OpenAPI spec."""

    title: str
    description: str  # Markdown, above the endpoints
    # Example values of request fields, by endpoint path then field name.
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gallery_paths: frozenset[str] = frozenset()  # endpoints that answer 404 without a gallery

    def rewrite(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A copy of BentoML's spec with this title and description, dedented endpoint docs,
        the examples, and the error answers the server really gives."""
        spec = json.loads(json.dumps(spec))  # a copy, with the status codes as JSON has them: strings
        # BentoML fills the description with its README (badges from shields.io) and the contact with its team.
        spec["info"] = {"title": self.title, "version": spec["info"]["version"], "description": self.description}
        schemas = spec["components"]["schemas"]
        for name in BENTOML_SCHEMAS:
            schemas.pop(name, None)
        schemas["Error"] = ERROR_SCHEMA
        for tag in spec["tags"]:
            if tag["name"] == "Service APIs":
                tag["description"] = "Embeddings, zero-shot classification, ranking and gallery search."
        for path, item in spec["paths"].items():
            for operation in item.values():
                if "x-bentoml-name" in operation:  # a service endpoint, not a probe
                    self._document(path, operation)
        return spec

    def _document(self, path: str, operation: dict[str, Any]) -> None:
        # Docstrings keep their indentation, which Markdown renders as code.
        operation["description"] = inspect.cleandoc(operation.get("description", ""))
        statuses = {**ERRORS, **({404: NOT_FOUND} if path in self.gallery_paths else {})}
        operation["responses"] = {
            "200": operation["responses"]["200"],
            **{str(status): _error_response(statuses[status]) for status in sorted(statuses)},
        }
        for media in operation.get("requestBody", {}).get("content", {}).values():
            properties = media["schema"].get("properties", {})
            for name, example in self.examples.get(path, {}).items():
                properties[name]["example"] = example


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if name == b"x-api-key":
            return value.strip()
    return None


class RequestTooLarge(BentoMLException):
    """A request body over the limit; BentoML answers a BentoMLException with its code, 413."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class RequestGateMiddleware:
    """Refuse API requests BentoML would mishandle: an unknown content type or an oversized body.

    A content type other than JSON or multipart answers 415. BentoML reads a JSON body, and each
    uploaded file, whole into memory before any check, so a body over `max_bytes` answers 413:
    unread when its Content-Length says so, else as soon as the count passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if media_type and media_type not in ACCEPTED_MEDIA_TYPES:
            message = f"content type {media_type!r} is not accepted: send application/json or multipart/form-data"
            await send_error(send, 415, message)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, self._message())
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside BentoML's request parsing, which answers with its error code.
                    raise RequestTooLarge(self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body over {self.max_bytes} bytes (serve.max_request_bytes)"


class AdmissionMiddleware:
    """Refuse on arrival a request to an unbatched model endpoint when `workers + max_waiting` are already in.

    The batched endpoints shed in their dispatcher; classify, rank and search run in BentoML's
    thread pool, where a flood would only queue, each request waiting longer than the last. Past
    the running and the allowed waiting ones, a request answers 503 with a `Retry-After` of the
    time the ones ahead of it take at the recent pace, before its body is read.
    """

    # Weight of the newest request's seconds in the moving average of how long one takes.
    PACE_WEIGHT = 0.2

    def __init__(self, app: ASGIApp, paths: frozenset[str], workers: int, max_waiting: int) -> None:
        self.app = app
        self.paths, self.workers = paths, workers
        self.max_in_flight = workers + max_waiting  # running, one per worker thread, and waiting
        self.in_flight = 0
        self.seconds_each = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            retry_after = max(1, math.ceil(self.seconds_each * self.in_flight / self.workers))
            message = (
                f"the server is busy: {self.in_flight} model calls are running or waiting, "
                f"the most serve.max_waiting allows; retry after {retry_after} s"
            )
            await send_error(send, 503, message, ((b"retry-after", str(retry_after).encode()),))
            return
        self.in_flight += 1
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            elapsed = time.monotonic() - started
            self.seconds_each += self.PACE_WEIGHT * (elapsed - self.seconds_each)


class ShedMiddleware:
    """Answer a request the batch dispatcher refused (`clipflow.serve.dispatch.Overloaded`) with
    its own message and a `Retry-After` header.

    BentoML answers every 5xx exception with one generic message and no headers, so the
    dispatcher leaves its refusal in `SHED` and the 503 BentoML sends is replaced here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusals: list[Overloaded] = []
        token = SHED.set(refusals)
        replaced = False

        async def sending(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 503 and refusals:
                replaced = True
                retry_after = str(refusals[0].retry_after_s).encode()
                await send_error(send, 503, refusals[0].message, ((b"retry-after", retry_after),))
            elif not replaced:
                await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            SHED.reset(token)


class StrictJSONSerde(JSONSerde):
    """BentoML's JSON parsing, validated off the event loop; a request that does not fit the signature answers 422.

    BentoML would download a body that is a URL when the endpoint takes files; this parses it as
    JSON like any other body (URLs are not fetched).
    """

    async def parse_request(self, request: Request, cls: type[T]) -> T:
        try:
            body = await request.body()
        except ClientDisconnect:
            raise InvalidArgument(CLIENT_GONE) from None
        try:
            return await off_loop(self.deserialize_model, Payload((body,), metadata=request.headers), cls)
        except ValidationError as exc:
            raise UnprocessableEntity(describe_validation_error(exc)) from None


class StrictMultipartSerde(MultipartSerde):
    """BentoML's multipart parsing, taking uploads only, validated off the event loop, and
    answering malformed bodies with 4xx."""

    @staticmethod
    async def ensure_file(obj: str | UploadFile) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise InvalidArgument("a file field holds text: upload the file itself (URLs are not fetched)")

    async def parse_request(self, request: Request, cls: type[T]) -> T:
        # BentoML reads the form and validates it in one coroutine; the stand-in it is given here
        # hands the fields back unvalidated (`dict`), so the validation runs in a thread.
        form_fields = SimpleNamespace(
            multipart_fields=cls.multipart_fields, model_fields=cls.model_fields, model_validate=dict
        )
        try:
            fields = await super().parse_request(request, form_fields)
            return await off_loop(cls.model_validate, fields)
        except ValidationError as exc:
            raise UnprocessableEntity(describe_validation_error(exc)) from None
        except ClientDisconnect:
            raise InvalidArgument(CLIENT_GONE) from None
        except HTTPException as exc:  # Starlette's answer to a malformed multipart body
            raise InvalidArgument(f"multipart body: {exc.detail}") from None
        except UnicodeDecodeError:  # BentoML reads a text field as JSON text
            raise InvalidArgument("multipart body: a text field holds binary data (a file in a text field?)") from None


# A client that hangs up mid-upload gets no answer; the 400 keeps it out of the server errors.
CLIENT_GONE = "the client closed the connection before the request body was complete"


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run `function` in a worker thread, at most one per core at a time.

    Validating a request decodes its images, seconds of work for large ones; on the event loop
    that would stall every other request and the probes. One thread per core keeps the images
    being decoded at once, and so the memory they take, to the cores that can decode them.
    """
    return await anyio.to_thread.run_sync(functools.partial(function, *args), limiter=_decode_limiter())


@functools.cache
def _decode_limiter() -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(usable_cores())


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each field at fault: `malformed request: labels: Field required`."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    problems = [f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}" for error in errors]
    text = "; ".join(problems[:MAX_REPORTED_ERRORS])
    if len(problems) > MAX_REPORTED_ERRORS:
        text += f"; and {len(problems) - MAX_REPORTED_ERRORS} more"
    if any(error["type"] == "path_type" for error in errors):
        text += " (send files as multipart/form-data uploads)"
    return f"malformed request: {text}"
