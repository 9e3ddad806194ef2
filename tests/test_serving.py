"""The package step and the served Bento, end to end, with no mocks.

A random-init CLIP-Tiny goes through a real MLflow registry (sqlite) into a real BentoML store;
`bentoml serve` runs the Bento in a subprocess, called through `bentoml.SyncHTTPClient` and
plain HTTP. Serving limits are lowered through params so the 400 paths are cheap to reach and
are known to come from the packaged model, not from the service's code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import bentoml_server, free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_LABELS = 8
MAX_IMAGE_PIXELS = 128 * 128
MAX_IMAGE_BYTES = 60_000
MAX_TEXT_CHARS = 200


def _png(size: tuple[int, int], color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A champion registered in a fresh MLflow store, packaged into a fresh BentoML store."""
    import mlflow
    from mlflow import MlflowClient

    from clipflow import model as clip_model
    from clipflow import tracking
    from clipflow.package import package
    from clipflow.params import load_params
    from clipflow.registry.models import log_clip_model

    tmp = tmp_path_factory.mktemp("serving")
    params = load_params(
        ROOT / "params.yaml",
        overrides=[
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            "tracking.experiment=t",
            f"serve.max_labels={MAX_LABELS}",
            f"serve.max_image_pixels={MAX_IMAGE_PIXELS}",
            f"serve.max_image_bytes={MAX_IMAGE_BYTES}",
            f"serve.max_text_chars={MAX_TEXT_CHARS}",
        ],
        profile="test",
    )
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_HOME", str(tmp / "bentoml"))
        tracking.setup(params.tracking)
        model = clip_model.create("CLIP-Tiny")
        checkpoint = clip_model.save_checkpoint(tmp / "checkpoint", model.model, "CLIP-Tiny", extra={})
        with mlflow.start_run():
            logged_uri = log_clip_model(checkpoint)
        name = params.promote.model_name
        registered = mlflow.register_model(logged_uri, name)
        MlflowClient().set_registered_model_alias(name, "champion", registered.version)

        result = package(f"models:/{name}@champion", params)
        print(f"package() took {result['seconds']:.2f} s")
        yield {"result": result, "params": params, "version": str(registered.version), "tmp": tmp}
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="module")
def server(packaged):
    """`bentoml serve <bento_tag>` on a free port; always stopped, logs shown when it fails."""
    from clipflow.package import bentoml_env

    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", packaged["result"]["bento_tag"]]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with bentoml_server(command, port, bentoml_env(), packaged["tmp"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, timeout=60) as client:
        yield client


def test_package_stores_the_model_and_a_bento_that_names_it(packaged):
    import bentoml

    result = packaged["result"]
    assert result["model_uri"] == "models:/clipflow-clip@champion"
    bento = bentoml.bentos.get(result["bento_tag"])
    assert bento.info.args["model_tag"] == result["bento_model_tag"]
    assert [str(m.tag) for m in bento.info.all_models] == [result["bento_model_tag"]]
    assert bento.info.labels["mlflow_version"] == packaged["version"]

    stored = bentoml.models.get(result["bento_model_tag"])
    assert Path(stored.path_of("checkpoint.pt")).is_file()
    assert stored.info.metadata["limits"]["max_labels"] == MAX_LABELS
    assert stored.info.metadata["model_uri"] == result["model_uri"]
    assert stored.info.labels["mlflow_version"] == packaged["version"]


def test_package_rejects_an_unknown_alias(packaged):
    from clipflow.errors import ClipflowError
    from clipflow.package import package

    with pytest.raises(ClipflowError, match="cannot resolve models:/clipflow-clip@nope"):
        package("models:/clipflow-clip@nope", packaged["params"])


def test_encode_text_returns_unit_vectors(client, server):
    texts = ["a red circle", "two blue squares", "a green star on the left"]
    embeddings = client.encode_text(texts=texts)
    assert len(embeddings) == len(texts)
    assert {len(row) for row in embeddings} == {128}
    for row in embeddings:
        assert math.isclose(math.fsum(x * x for x in row), 1.0, rel_tol=1e-4)

    plain = httpx.post(f"{server}/encode_text", json={"texts": texts}, timeout=60)
    assert plain.status_code == 200
    assert [value for row in plain.json() for value in row] == pytest.approx(
        [value for row in embeddings for value in row], abs=1e-6
    )


def test_encode_image_returns_a_unit_vector(client, packaged):
    path = packaged["tmp"] / "red.png"
    path.write_bytes(_png((64, 64), "red"))
    embedding = client.encode_image(image=path)
    assert len(embedding) == 128
    assert math.isclose(math.fsum(x * x for x in embedding), 1.0, rel_tol=1e-4)


def test_classify_ranks_every_label(client, server, packaged):
    labels = ["a red circle", "a blue square", "a green star"]
    path = packaged["tmp"] / "blue.png"
    path.write_bytes(_png((80, 60), "blue"))

    ranked = client.classify(image=path, labels=labels)
    assert sorted(item["label"] for item in ranked) == sorted(labels)
    probabilities = [item["probability"] for item in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-5)

    plain = httpx.post(
        f"{server}/classify",
        files={"image": ("blue.png", path.read_bytes(), "image/png")},
        data={"labels": json.dumps(labels)},
        timeout=60,
    )
    assert plain.status_code == 200
    assert [item["label"] for item in plain.json()] == [item["label"] for item in ranked]
    assert [item["probability"] for item in plain.json()] == pytest.approx(probabilities)


@pytest.mark.parametrize(
    ("image", "labels", "message"),
    [
        (os.urandom(2048), ["a", "b"], "could not be decoded"),
        (_png((64, 64), "red")[:100], ["a", "b"], "could not be decoded"),
        (_png((200, 100), "red"), ["a", "b"], "pixels"),
        (os.urandom(MAX_IMAGE_BYTES + 1), ["a", "b"], "bytes"),
        (_png((64, 64), "red"), [f"label {i}" for i in range(MAX_LABELS + 1)], "at most"),
        (_png((64, 64), "red"), [], "must not be empty"),
        (_png((64, 64), "red"), ["x" * (MAX_TEXT_CHARS + 1)], "characters"),
    ],
    ids=[
        "random-bytes",
        "truncated-png",
        "too-many-pixels",
        "too-many-bytes",
        "too-many-labels",
        "no-labels",
        "long-label",
    ],
)
def test_classify_answers_400_to_bad_input(server, image, labels, message):
    response = httpx.post(
        f"{server}/classify",
        files={"image": ("upload.png", image, "image/png")},
        data={"labels": json.dumps(labels)},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert message in response.text


def test_encode_text_answers_400_to_bad_input(client, server):
    import bentoml

    assert httpx.post(f"{server}/encode_text", json={"texts": []}, timeout=60).status_code == 400
    with pytest.raises(bentoml.exceptions.InvalidArgument, match="characters"):
        client.encode_text(texts=["x" * (MAX_TEXT_CHARS + 1)])


def test_package_rejects_a_bento_name_bentoml_cannot_tag(packaged):
    from clipflow.errors import ClipflowError
    from clipflow.package import package

    params = packaged["params"]
    params = dataclasses.replace(params, serve=dataclasses.replace(params.serve, bento_name="Clip Flow"))
    with pytest.raises(ClipflowError, match="serve.bento_name"):
        package("models:/clipflow-clip@champion", params)
