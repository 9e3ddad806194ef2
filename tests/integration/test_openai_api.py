"""`/v1/embeddings` and `/v1/models` of the served Bento, called through OpenAI's own Python client.

The Bentos are the ones `tests/support/serving_fixtures.py` packages (a random-init CLIP-Tiny, its
limits lowered, `serve.allow_image_urls` naming 127.0.0.1), each served by `bentoml serve`: the one
with a gallery without an API key, the bare one with `CLIPFLOW_API_KEY`. What the OpenAI API answers
is compared with what the native endpoints answer for the same inputs.
"""

from __future__ import annotations

import base64
import io
import os
from http.server import BaseHTTPRequestHandler

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from clipflow import model as clip_model
from tests.support.servers import local_http_server
from tests.support.serving_fixtures import (
    API_KEY,
    MAX_BATCH,
    MAX_IMAGE_BYTES,
    MAX_REQUEST_BYTES,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
)

TEXTS = ["a red circle", "two blue squares", "a small green star to the left of a large purple triangle", "!"]
DIMENSIONS = 128  # CLIP-Tiny's embed_dim


def _png(color: str, size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE, GREEN = _png("red"), _png("blue"), _png("green")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class _ImageHost(BaseHTTPRequestHandler):
    """An image host on 127.0.0.1 (which the test Bento allows): an image, one too large, and a
    redirect to `localhost` (which it does not)."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        port = self.server.server_address[1]
        if self.path == "/red.png":
            self._send(200, RED)
        elif self.path == "/large.png":
            self._send(200, RED + os.urandom(MAX_IMAGE_BYTES))
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/red.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    with local_http_server(_ImageHost) as url:
        yield url


@pytest.fixture(scope="module")
def name(packaged) -> str:
    """The served model's name: the BentoML model's, `serve.bento_name`."""
    return packaged["params"].serve.bento_name


def _client(url: str, key: str = "no key needed") -> openai.OpenAI:
    # No retries: a refusal must show as the error it is, at once.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _native(url: str, endpoint: str, **request) -> np.ndarray:
    response = httpx.post(f"{url}/{endpoint}", timeout=60, **request)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def _rows(embeddings) -> np.ndarray:
    assert [item.index for item in embeddings.data] == list(range(len(embeddings.data)))
    return np.asarray([item.embedding for item in embeddings.data], dtype=np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_text_embeddings_are_the_native_endpoints_in_order_with_their_token_counts(server, name):
    embeddings = _client(server).embeddings.create(model=name, input=TEXTS, encoding_format="float")
    assert embeddings.model == name and embeddings.object == "list"
    assert _cosines(_rows(embeddings), _native(server, "encode_text", json={"texts": TEXTS})).min() > 0.9999
    tokens = sum(clip_model.count_tokens(clip_model.tokenizer("CLIP-Tiny"), TEXTS))
    assert tokens == 5 + 5 + 14 + 3  # each text's words with its start and end tokens; "!" is token 0
    assert (embeddings.usage.prompt_tokens, embeddings.usage.total_tokens) == (tokens, tokens)
    one = _client(server).embeddings.create(model=name, input=TEXTS[2], encoding_format="float")
    assert len(one.data) == 1 and _cosines(_rows(one), _rows(embeddings)[2:3]).min() > 0.9999


def test_base64_is_the_little_endian_float32_of_the_same_vectors(server, name):
    floats = _client(server).embeddings.create(model=name, input=TEXTS[:2], encoding_format="float")
    answer = httpx.post(
        f"{server}/v1/embeddings",
        json={"model": name, "input": TEXTS[:2], "encoding_format": "base64"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in answer.json()["data"]]
    )
    assert decoded.shape == (2, DIMENSIONS)
    assert _cosines(decoded, _rows(floats)).min() > 0.9999
    # Without `encoding_format`, OpenAI's client asks for base64 and decodes it itself.
    default = _client(server).embeddings.create(model=name, input=TEXTS[:2])
    assert _cosines(_rows(default), decoded).min() > 0.9999


def test_image_embeddings_from_data_urls_and_bare_base64_are_the_native_endpoints(server, name):
    images = [_data_url(RED), base64.b64encode(BLUE).decode(), _data_url(GREEN)]
    embeddings = _client(server).embeddings.create(
        model=name, input=images, encoding_format="float", extra_body={"modality": "image"}
    )
    uploads = [("images", (f"{i}.png", png, "image/png")) for i, png in enumerate([RED, BLUE, GREEN])]
    assert _cosines(_rows(embeddings), _native(server, "encode_image", files=uploads)).min() > 0.9999
    assert embeddings.usage.prompt_tokens == 0


def test_an_image_url_is_fetched_only_from_an_allowed_host(server, name, image_host):
    client = _client(server)
    fetched = client.embeddings.create(
        model=name, input=[f"{image_host}/red.png"], encoding_format="float", extra_body={"modality": "image"}
    )
    sent = client.embeddings.create(
        model=name, input=[_data_url(RED)], encoding_format="float", extra_body={"modality": "image"}
    )
    assert _cosines(_rows(fetched), _rows(sent)).min() > 0.9999
    refusals = {
        "http://localhost:1/red.png": "'localhost' is not one",
        "https://169.254.169.254/latest/meta-data": "'169.254.169.254' is not one",
        f"{image_host}/moved.png": "'localhost' is not a host that may be fetched from",
        f"{image_host}/large.png": "serve.max_image_bytes",
        f"{image_host}/missing.png": "HTTP 404",
        "http://127.0.0.1:port/red.png": "invalid URL",
    }
    for url, message in refusals.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=name, input=[url], extra_body={"modality": "image"})
        assert message in refused.value.message, url
        assert refused.value.body["param"] == "input"


# id: (create() keyword arguments, status, the error's param, part of its message)
BAD_REQUESTS = {
    "no-input": ({"input": []}, 400, "input", "input must not be empty"),
    "too-many-texts": ({"input": ["a"] * (MAX_TEXTS + 1)}, 400, "input", f"at most {MAX_TEXTS} allowed"),
    "text-too-long": ({"input": ["x" * (MAX_TEXT_CHARS + 1)]}, 400, "input", f"at most {MAX_TEXT_CHARS}"),
    "token-arrays": ({"input": [[320, 736, 7117]]}, 400, "input", "input"),
    "bad-encoding-format": ({"input": ["a"], "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
    "other-dimensions": ({"input": ["a"], "dimensions": 64}, 400, "dimensions", f"in {DIMENSIONS} dimensions, not 64"),
    "unknown-field": ({"input": ["a"], "extra_body": {"truncate": True}}, 400, "truncate", "Extra inputs"),
    "unknown-modality": ({"input": ["a"], "extra_body": {"modality": "audio"}}, 400, "modality", "'text' or 'image'"),
    "not-an-image": (
        {"input": [base64.b64encode(b"hello, world").decode()], "extra_body": {"modality": "image"}},
        400,
        "input",
        "input[0] could not be decoded",
    ),
    "not-base64": ({"input": ["not base64!"], "extra_body": {"modality": "image"}}, 400, "input", "not valid base64"),
    "too-many-images": (
        {"input": [_data_url(RED)] * (MAX_BATCH + 1), "extra_body": {"modality": "image"}},
        400,
        "input",
        f"at most {MAX_BATCH} allowed",
    ),
    "unknown-model": ({"model": "text-embedding-3-small", "input": ["a"]}, 404, "model", "is not served here"),
}


@pytest.mark.parametrize(("arguments", "status", "param", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_bad_requests_get_openai_errors_with_a_4xx(server, name, arguments, status, param, message):
    with pytest.raises(openai.APIStatusError) as refused:
        _client(server).embeddings.create(**{"model": name, **arguments})
    error = refused.value
    assert error.status_code == status, error.body
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["type"] == "invalid_request_error" and error.body["param"] == param
    assert message in error.message
    if status == 404:
        assert isinstance(error, openai.NotFoundError) and error.code == "model_not_found"
    else:
        assert isinstance(error, openai.BadRequestError)


def test_every_refusal_under_v1_is_in_openai_shape(server):
    refusals = [
        (httpx.post(f"{server}/v1/embeddings", content=b"x" * (MAX_REQUEST_BYTES + 1), timeout=60), 413),
        (httpx.post(f"{server}/v1/embeddings", content=b'{"input": [', timeout=60), 400),
        (httpx.post(f"{server}/v1/embeddings", content=b"a", headers={"content-type": "text/plain"}), 415),
        (httpx.get(f"{server}/v1/embeddings", timeout=60), 405),
        (httpx.get(f"{server}/v1/nothing-here", timeout=60), 404),
    ]
    for response, status in refusals:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
    assert refusals[3][0].headers["allow"] == "POST"


def test_models_lists_the_served_model_with_its_registry_version(server, name, packaged):
    (card,) = _client(server).models.list().data
    assert (card.id, card.object, card.owned_by) == (name, "model", "clipflow")
    assert card.created > 0
    assert card.model_extra == {"version": packaged["version"], "model_config": "CLIP-Tiny", "dimensions": DIMENSIONS}
    # The registry's name and version name the same model.
    registry = f"models:/{packaged['params'].promote.model_name}/{packaged['version']}"
    assert len(_client(server).embeddings.create(model=registry, input=["a"]).data) == 1


def test_the_api_key_guards_the_openai_api_as_every_endpoint(keyed_server, name):
    for key in ("wrong", API_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as refused:
            _client(keyed_server, key).embeddings.create(model=name, input=["a red circle"])
        assert refused.value.status_code == 401 and refused.value.body["type"] == "authentication_error"
        assert refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(keyed_server, key).models.list()
    unkeyed = httpx.post(f"{keyed_server}/v1/embeddings", json={"model": name, "input": "a"}, timeout=60)
    assert unkeyed.status_code == 401 and "API key required" in unkeyed.json()["error"]["message"]
    assert unkeyed.headers["www-authenticate"] == "Bearer"

    client = _client(keyed_server, API_KEY)
    embeddings = client.embeddings.create(model=name, input=TEXTS, encoding_format="float")
    native = _native(keyed_server, "encode_text", json={"texts": TEXTS}, headers={"X-API-Key": API_KEY})
    assert _cosines(_rows(embeddings), native).min() > 0.9999
    assert [card.id for card in client.models.list().data] == [name]
