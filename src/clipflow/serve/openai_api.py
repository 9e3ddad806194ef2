"""OpenAI's embeddings API on the served Bento: `POST /v1/embeddings` and `GET /v1/models`.

Application code reaches embedding servers through OpenAI's client (`client.embeddings.create`)
and the tools built on it. A request is checked here and then answered by the native batched
endpoint, `/encode_text` for texts or `/encode_image_base64` for images (marked `"modality":
"image"`, as Infinity marks them): it is handed on inside the server, so it joins the same
batches, passes the same checks and limits, decodes images the same way and is shed the same
way as a native request, and gets the same vectors. Its answer comes back in OpenAI's shape:

    {"object": "list", "model": "clipflow-clip",
     "data": [{"object": "embedding", "index": 0, "embedding": [0.01, ...]}],
     "usage": {"prompt_tokens": 5, "total_tokens": 5}}

with each embedding a list of floats, or with `"encoding_format": "base64"` (what OpenAI's
client asks for unless told otherwise) the base64 of its little-endian float32 bytes. `usage`
counts the tokens the model reads of each text (`clipflow.model.count_tokens`); images count none.

Images are `data:image/...;base64,` URLs or bare base64. An `http(s)://` URL is fetched only
from a host `serve.allow_image_urls` lists, its redirects too, within `serve.max_image_bytes`
and `IMAGE_URLS_DEADLINE_S`: a server fetching what any client names would reach whatever the
server's network can (server-side request forgery).

Every error under `/v1/` answers in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with its 4xx status (`ErrorShapeMiddleware`): 400 an input outside a limit or
undecodable, 401 a missing or wrong API key (the service's `Authorization: Bearer`, which the
client sends), 404 a `model` the server does not serve, 413 a body over `serve.max_request_bytes`,
503 with `Retry-After` a request the server is too busy for.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

import anyio
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipflow.serve.http import CLIENT_GONE, describe_validation_error, off_loop
from clipflow.serve.inputs import Limits, check_image_count, check_text_list

PREFIX = "/v1/"
EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"
PATHS = frozenset({EMBEDDINGS_PATH, MODELS_PATH})
OWNER = "clipflow"
# All the image URLs of one request are fetched within this, so a slow host holds a request
# (and a thread) no longer than a client would wait.
IMAGE_URLS_DEADLINE_S = 10.0
URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class ServedModel:
    """What `/v1/models` lists and what `/v1/embeddings` answers as, from the packaged BentoML model."""

    name: str  # the BentoML model's name (`serve.bento_name`), what answers call the model
    aliases: frozenset[str]  # the other names a request may give: its BentoML tag, the registry's name and URI
    config: str  # its open_clip config, whose tokenizer counts tokens
    dimensions: int
    created: int  # when it was packaged, in Unix seconds
    version: str | None  # its version in the MLflow registry, when it came from there
    allow_image_urls: frozenset[str] = field(default_factory=frozenset)

    def knows(self, name: str) -> bool:
        return name == self.name or name in self.aliases

    def card(self) -> dict[str, Any]:
        """Its entry in `/v1/models`: OpenAI's fields, then clipflow's."""
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": OWNER}
        card |= {"model_config": self.config, "dimensions": self.dimensions}
        return card | ({"version": self.version} if self.version else {})


def served_model(bento_model: Any) -> ServedModel:
    """The `ServedModel` of a BentoML model that `clipflow package` stored (`clipflow.serve.package`)."""
    from clipflow.model import model_config

    metadata = bento_model.info.metadata
    registry = metadata.get("mlflow_model")
    version = metadata.get("mlflow_version")
    aliases = {str(bento_model.tag), metadata.get("model_uri")}
    if registry:
        aliases |= {registry, f"models:/{registry}/{version}"}
    return ServedModel(
        name=bento_model.tag.name,
        aliases=frozenset(alias for alias in aliases if alias),
        config=metadata["model_config"],
        dimensions=model_config(metadata["model_config"])["embed_dim"],
        created=int(bento_model.info.creation_time.timestamp()),
        version=version,
        allow_image_urls=frozenset(metadata.get("allow_image_urls", ())),
    )


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, with Infinity's `modality`; other fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    dimensions: Optional[int] = None
    modality: Literal["text", "image"] = "text"


class OpenAIError(Exception):
    """A request refused with `status`, OpenAI's error body and `headers` (such as `Retry-After`)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or []


# OpenAI's error types by status; any other 4xx is an invalid request, any 5xx a server error.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 503: "server_busy"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error body for a refusal with `status`."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code or ERROR_CODES.get(status)}
    return _json({"error": error})


def error_message(body: bytes) -> str:
    """The message of an error answer from the native service: its `{"error": message}` (BentoML's
    own refusals too, see `clipflow.serve.bentoml_patches`), or its text."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300] or "error"
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return json.dumps(answer)[:300]


def _is_openai_error(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and isinstance(answer.get("error"), dict)


async def send_json(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# Headers of a refusal that the reshaped answer keeps: when to retry, and how to authenticate.
KEPT_HEADERS = frozenset({b"retry-after", b"www-authenticate", b"allow"})


class ErrorShapeMiddleware:
    """Answer every error under `/v1/` in OpenAI's shape, whichever layer refused the request.

    It runs first, so the API key check, the body gates, the shedding and BentoML's own answers
    (an unknown path, a wrong method) all reach OpenAI's clients as errors they can read.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        refusal: Message | None = None
        chunks: list[bytes] = []

        async def shaping(message: Message) -> None:
            nonlocal refusal
            if message["type"] == "http.response.start" and message["status"] >= 400:
                refusal = message
            elif refusal is None:
                await send(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    status = refusal["status"]
                    if not _is_openai_error(body):
                        body = error_body(status, error_message(body))
                    kept = [(name, value) for name, value in refusal["headers"] if name.lower() in KEPT_HEADERS]
                    await send_json(send, status, body, kept)

        await self.app(scope, receive, shaping)


@dataclass
class _Call:
    """An embeddings request, checked, as the native endpoint takes it."""

    request: EmbeddingsRequest
    items: list[str]  # texts, or images as base64 or `data:` URLs, once the URLs are fetched
    urls: dict[int, str]  # index in `items` of each image URL still to fetch
    tokens: int


class EmbeddingsMiddleware:
    """`POST /v1/embeddings` and `GET /v1/models`, answered through the native endpoints.

    It runs after the API key check and the body gates, and hands each request on to
    `text_path` or `image_path` of the same app. The parsing, the checks and the answer's
    encoding run in worker threads (`clipflow.serve.http.off_loop`), as the native requests' do.
    """

    def __init__(
        self,
        app: ASGIApp,
        served: Callable[[], ServedModel],
        limits: Callable[[], Limits],
        text_path: str,
        image_path: str,
        max_fetch_bytes: int,
    ) -> None:
        self.app = app
        self.served, self.limits = served, limits
        self.text_path, self.image_path = text_path, image_path
        self.max_fetch_bytes = max_fetch_bytes  # all the images fetched for one request, as for a body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        method = "POST" if scope["path"] == EMBEDDINGS_PATH else "GET"
        try:
            if scope["method"] != method:
                message = f"{scope['path']} takes {method} requests, not {scope['method']}"
                raise OpenAIError(405, message, headers=[(b"allow", method.encode())])
            if method == "GET":
                body = _json({"object": "list", "data": [self.served().card()]})
            else:
                body = await self._embeddings(scope, receive)
        except OpenAIError as exc:
            await send_json(send, exc.status, error_body(exc.status, exc.message, exc.param, exc.code), exc.headers)
            return
        await send_json(send, 200, body)

    async def _embeddings(self, scope: Scope, receive: Receive) -> bytes:
        try:
            body = await Request(scope, receive).body()
        except ClientDisconnect:
            raise OpenAIError(400, CLIENT_GONE) from None
        except BentoMLException as exc:  # the body gate's refusal of an oversized body
            raise OpenAIError(int(exc.error_code), str(exc)) from None
        call = await off_loop(self._check, body)
        if call.urls:
            await self._fetch(call)
        # The native endpoints' single argument: `texts` of /encode_text, `images` of /encode_image_base64.
        path, field = (self.image_path, "images") if call.request.modality == "image" else (self.text_path, "texts")
        native_body = await off_loop(_json, {field: call.items})
        status, headers, answer = await self._native(scope, path, native_body, receive)
        if status != 200:
            kept = [(name, value) for name, value in headers if name.lower() in KEPT_HEADERS]
            message = _about_input(error_message(answer), field)
            raise OpenAIError(status, message, "input" if status == 400 else None, headers=kept)
        return await off_loop(self._answer, call, answer)

    def _check(self, body: bytes) -> _Call:
        """The request, parsed and checked against OpenAI's fields and the served limits."""
        from clipflow import model as clip_model

        try:
            request = EmbeddingsRequest.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
            raise OpenAIError(400, describe_validation_error(exc), param) from None
        served, limits = self.served(), self.limits()
        if not served.knows(request.model):
            message = f"the model {request.model[:80]!r} is not served here; this server serves {served.name!r}"
            raise OpenAIError(404, message, "model", "model_not_found")
        if request.dimensions is not None and request.dimensions != served.dimensions:
            message = f"dimensions: {served.name} embeds in {served.dimensions} dimensions, not {request.dimensions}"
            raise OpenAIError(400, message, "dimensions")
        items = [request.input] if isinstance(request.input, str) else list(request.input)
        try:
            if request.modality == "text":
                check_text_list("input", items, limits)
            else:
                check_image_count("input", items, limits)
        except InvalidArgument as exc:
            raise OpenAIError(400, str(exc), "input") from None
        urls = {i: item for i, item in enumerate(items) if request.modality == "image" and _is_url(item)}
        for i, url in urls.items():
            host = _host(url)
            if host not in served.allow_image_urls:
                raise OpenAIError(
                    400,
                    f"input[{i}]: image URLs are fetched only from the hosts serve.allow_image_urls lists, "
                    f"and {host[:80]!r} is not one: send the image as a data: URL or base64",
                    "input",
                )
        tokens = sum(clip_model.count_tokens(_tokenizer(served.config), items)) if request.modality == "text" else 0
        return _Call(request, items, urls, tokens)

    async def _fetch(self, call: _Call) -> None:
        """Replace each image URL of `call` by the base64 of its bytes, fetched within the limits."""
        from clipflow.storage import FetchError, FetchLimits, fetch

        deadline = time.monotonic() + IMAGE_URLS_DEADLINE_S
        budget = self.max_fetch_bytes
        for i, url in call.urls.items():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OpenAIError(400, f"input: the image URLs took more than {IMAGE_URLS_DEADLINE_S:g} s to fetch")
            fits = min(self.limits().max_image_bytes, budget)
            limits = FetchLimits(fits, remaining, 0, "serve.max_image_bytes", self.served().allow_image_urls)
            try:
                data = await anyio.to_thread.run_sync(fetch, url, limits)  # I/O: not on the cores' decode limiter
            except FetchError as exc:
                raise OpenAIError(400, f"input[{i}]: {exc}", "input") from None
            budget -= len(data)
            call.items[i] = base64.b64encode(data).decode("ascii")

    async def _native(
        self, scope: Scope, path: str, body: bytes, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The native endpoint's status, headers and body for a JSON request of `body`."""
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        native = {**scope, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers}
        given = False

        async def request() -> Message:
            nonlocal given
            if given:
                return await receive()  # the client's disconnect, when it hangs up
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        answer: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def keep(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"], answer["headers"] = message["status"], message["headers"]
            elif message["type"] == "http.response.body":
                answer["body"].append(message.get("body", b""))

        await self.app(native, request, keep)
        return answer["status"], answer["headers"], b"".join(answer["body"])

    def _answer(self, call: _Call, rows_json: bytes) -> bytes:
        """OpenAI's response body for the native endpoint's rows."""
        import numpy as np

        rows = json.loads(rows_json)
        if call.request.encoding_format == "base64":
            rows = [base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii") for row in rows]
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        usage = {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
        return _json({"object": "list", "data": data, "model": self.served().name, "usage": usage})


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _about_input(message: str, field: str) -> str:
    """A native endpoint's message about its `field` ("images[2] could not be decoded"), about `input`."""
    return "input" + message[len(field) :] if message.startswith(field) else message


def _is_url(item: str) -> bool:
    return item[:8].lower().startswith(URL_SCHEMES)


def _host(url: str) -> str:
    """The host a URL names, lowercased; empty for one too malformed to name any."""
    try:
        return urlparse(url).hostname or ""
    except ValueError:  # an unclosed IPv6 bracket, a port that is no number
        return ""


@functools.cache
def _tokenizer(config: str) -> Callable:
    """The served model's tokenizer, for `usage`; built once per worker."""
    from clipflow import model as clip_model

    return clip_model.tokenizer(config)
