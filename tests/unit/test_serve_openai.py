"""The pieces of the OpenAI API that need no server: the hosts params allows, the error shapes, the model card.

The API itself, through OpenAI's client against `bentoml serve`, is tests/integration/test_openai_api.py.
"""

from __future__ import annotations

import json

import pytest

from clipflow.errors import ClipflowError
from clipflow.params import load_params
from clipflow.serve.openai_api import ServedModel, error_body, error_message
from tests.support import REPO


def test_allow_image_urls_takes_bare_hosts():
    params = load_params(
        REPO / "params.yaml", overrides=["serve.allow_image_urls=[images.example.com, 10.0.0.7, '::1']"]
    )
    assert params.serve.allow_image_urls == ["images.example.com", "10.0.0.7", "::1"]
    assert load_params(REPO / "params.yaml").serve.allow_image_urls == []  # none by default


@pytest.mark.parametrize(
    "host", ["https://images.example.com", "images.example.com:443", "Images.Example.com", "*.example.com", "a/b"]
)
def test_allow_image_urls_refuses_what_is_no_bare_host(host):
    with pytest.raises(ClipflowError, match="serve.allow_image_urls lists hosts"):
        load_params(REPO / "params.yaml", overrides=[f"serve.allow_image_urls=['{host}']"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": "wrong API key"}', "wrong API key"),  # clipflow.serve.http's, and BentoML's once patched
        (b"Not Found", "Not Found"),  # Starlette's
        (b"", "error"),
    ],
)
def test_the_message_of_every_refusal_shape(body, message):
    assert error_message(body) == message


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "authentication_error", "invalid_api_key"),
        (413, "invalid_request_error", "request_too_large"),
        (503, "server_error", "server_busy"),
    ],
)
def test_errors_take_openai_types_by_status(status, kind, code):
    error = json.loads(error_body(status, "why"))["error"]
    assert error == {"message": "why", "type": kind, "param": None, "code": code}
    assert json.loads(error_body(404, "m", "model", "model_not_found"))["error"]["code"] == "model_not_found"


def test_the_model_answers_to_its_name_and_aliases_and_lists_its_registry_version():
    served = ServedModel("clip", frozenset({"clip:abc", "models:/reg/3"}), "CLIP-Tiny", 128, 1700000000, "3")
    assert served.knows("clip") and served.knows("models:/reg/3") and not served.knows("text-embedding-3-small")
    assert served.card() == {
        "id": "clip",
        "object": "model",
        "created": 1700000000,
        "owned_by": "clipflow",
        "model_config": "CLIP-Tiny",
        "dimensions": 128,
        "version": "3",
    }
    assert "version" not in ServedModel("clip", frozenset(), "CLIP-Tiny", 128, 0, None).card()
