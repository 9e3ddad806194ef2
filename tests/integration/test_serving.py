"""The package step and the served Bento, end to end, with no mocks.

A random-init CLIP-Tiny goes through a real MLflow registry (sqlite) into a real BentoML store,
with a gallery built from an ingested test-profile dataset; `bentoml serve` runs the Bento in a
subprocess, called through `bentoml.SyncHTTPClient` and plain HTTP. A second Bento, packaged
without a gallery, is served with `CLIPFLOW_API_KEY` set. The package step and its lowered
serving limits are in `tests/support/serving_fixtures.py`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support import REPO
from tests.support.serving_fixtures import (
    API_KEY,
    MAX_BATCH,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_K,
    MAX_LABELS,
    MAX_REQUEST_BYTES,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    METRICS,
    SERVING,
    serve_bento,
)


def _png(size: tuple[int, int], color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height`: a decompression bomb's signature, cheaply."""
    png = bytearray(_png((1, 1), "red"))
    # After the 8-byte signature: IHDR length (4), type (4), data (13: width, height, ...), CRC (4).
    struct.pack_into(">II", png, 16, width, height)
    struct.pack_into(">I", png, 29, zlib.crc32(png[12:29]))
    return bytes(png)


def _flat(rows: list[list[float]]) -> list[float]:
    """Rows of numbers as one list, for pytest.approx (which does not compare nested lists)."""
    return [value for row in rows for value in row]


def _unit(row: list[float]) -> bool:
    return math.isclose(math.fsum(x * x for x in row), 1.0, rel_tol=1e-4)


@pytest.fixture(scope="module")
def client(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def gallery_images(packaged):
    """The first three test-split images as files, with their sample keys."""
    from clipflow.data.shards import ShardIndex, split_shards

    index = ShardIndex(split_shards(packaged["tmp"] / "data", "test"))
    images = {}
    for i in range(3):
        path = packaged["tmp"] / f"{index.keys[i]}.png"
        path.write_bytes(index.read(i, "png"))
        images[index.keys[i]] = path
    return images


def _assert_still_serving(url: str, headers: dict[str, str] | None = None) -> None:
    response = httpx.post(f"{url}/encode_text", json={"texts": ["a red circle"]}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert _unit(response.json()[0])


def test_package_stores_the_model_the_gallery_and_the_registry_facts(packaged):
    import bentoml
    import torch

    from clipflow.data.shards import ShardIndex, split_shards

    result = packaged["result"]
    assert result.model_uri == "models:/clipflow-clip@champion"
    assert result.gallery == {
        "split": "test",
        "size": 200,
        "precision": "fp32",
        "data_version": packaged["data"].data_version,
    }
    bento = bentoml.bentos.get(result.bento_tag)
    assert bento.info.args["model_tag"] == result.bento_model_tag
    assert bento.info.args["max_request_bytes"] == MAX_REQUEST_BYTES
    assert [str(m.tag) for m in bento.info.all_models] == [result.bento_model_tag]
    assert bento.info.labels["mlflow_version"] == packaged["version"]

    stored = bentoml.models.get(result.bento_model_tag)
    assert Path(stored.path_of("checkpoint.pt")).is_file()
    metadata = stored.info.metadata
    assert metadata["limits"]["max_labels"] == MAX_LABELS
    assert metadata["limits"]["max_k"] == MAX_K
    assert metadata["model_uri"] == result.model_uri
    assert metadata["metrics"] == METRICS
    assert metadata["data_version"] == packaged["data"].data_version
    assert metadata["gallery"] == result.gallery
    assert stored.info.labels["mlflow_version"] == packaged["version"]

    embeddings = torch.load(stored.path_of("gallery/embeddings.pt"), weights_only=True)
    items = json.loads(Path(stored.path_of("gallery/items.json")).read_text())
    keys = ShardIndex(split_shards(packaged["tmp"] / "data", "test")).keys
    assert embeddings.shape == (200, 128)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert items["ids"] == keys and len(items["captions"]) == 200

    bare = bentoml.models.get(packaged["bare"].bento_model_tag)
    assert packaged["bare"].gallery is None and "gallery" not in bare.info.metadata
    assert not Path(bare.path_of("gallery")).exists()


def test_package_rejects_an_unknown_alias(packaged):
    from clipflow.errors import ClipflowError
    from clipflow.serve.package import package

    with pytest.raises(ClipflowError, match="cannot resolve models:/clipflow-clip@nope"):
        package("models:/clipflow-clip@nope", packaged["params"], SERVING)


def test_package_rejects_a_gallery_it_cannot_read(packaged):
    from clipflow.errors import ClipflowError
    from clipflow.serve.package import package

    params = packaged["params"]
    with pytest.raises(ClipflowError, match="gallery data directory not found"):
        package("models:/clipflow-clip@champion", params, SERVING, gallery=packaged["tmp"] / "nowhere")
    params = dataclasses.replace(params, serve=dataclasses.replace(params.serve, gallery_split="nope"))
    with pytest.raises(ClipflowError, match="has no split 'nope'"):
        package("models:/clipflow-clip@champion", params, SERVING, gallery=packaged["tmp"] / "data")


def test_cli_package_builds_a_bento_with_the_gallery_it_is_given(packaged, capsys):
    from clipflow.cli import main

    common = ["--params", str(REPO / "params.yaml"), "--profile", "test"]
    # fp32 as the fixture's Bentos: bf16's check of an untrained model's zero-shot top-1 is a coin toss.
    common += ["--set", f"tracking.uri=sqlite:///{packaged['tmp']}/mlflow.db", "--set", "serve.precision=fp32"]
    assert main(["package", "--gallery", str(packaged["tmp"] / "data"), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gallery"]["size"] == 200 and result["bento_tag"].startswith("clipflow-clip:")

    assert main(["package", "--gallery", str(packaged["tmp"] / "nowhere"), *common]) == 1
    assert "gallery data directory not found" in capsys.readouterr().err


def test_package_rejects_a_bento_name_bentoml_cannot_tag(packaged):
    from clipflow.errors import ClipflowError
    from clipflow.serve.package import package

    params = packaged["params"]
    params = dataclasses.replace(params, serve=dataclasses.replace(params.serve, bento_name="Clip Flow"))
    with pytest.raises(ClipflowError, match="serve.bento_name"):
        package("models:/clipflow-clip@champion", params, SERVING)


def test_encode_text_returns_unit_vectors(client, server):
    texts = ["a red circle", "two blue squares", "a green star on the left"]
    embeddings = client.encode_text(texts=texts)
    assert len(embeddings) == len(texts)
    assert {len(row) for row in embeddings} == {128}
    assert all(_unit(row) for row in embeddings)

    plain = httpx.post(f"{server}/encode_text", json={"texts": texts}, timeout=60)
    assert plain.status_code == 200
    assert _flat(plain.json()) == pytest.approx(_flat(embeddings), abs=1e-6)


def test_requests_are_not_traced_by_default_so_their_log_lines_carry_no_trace_id(server, packaged):
    # A caller's own trace would make a sampled span, were the request traced (serve.tracing).
    traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    answer = httpx.post(f"{server}/encode_text", json={"texts": ["a red circle"]}, headers={"traceparent": traceparent})
    assert answer.status_code == 200
    log = packaged["tmp"] / f"serve-{server.rsplit(':', 1)[1]}.log"
    deadline = time.monotonic() + 60
    while "path=/encode_text" not in log.read_text():  # the worker writes its access log
        assert time.monotonic() < deadline, "no access-log line for /encode_text"
        time.sleep(0.05)
    assert "trace=" not in log.read_text()


def test_encode_image_takes_a_batch_as_uploads_or_as_base64(client, server, gallery_images):
    paths = list(gallery_images.values())
    uploaded = client.encode_image(images=paths)
    assert len(uploaded) == len(paths)
    assert all(len(row) == 128 and _unit(row) for row in uploaded)
    assert uploaded[0] != uploaded[1]

    files = [("images", (path.name, path.read_bytes(), "image/png")) for path in paths]
    plain = httpx.post(f"{server}/encode_image", files=files, timeout=60)
    assert plain.status_code == 200, plain.text
    assert _flat(plain.json()) == pytest.approx(_flat(uploaded), abs=1e-6)

    encoded = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    encoded[1] = f"data:image/png;base64,{encoded[1]}"
    assert _flat(client.encode_image_base64(images=encoded)) == pytest.approx(_flat(uploaded), abs=1e-6)
    plain = httpx.post(f"{server}/encode_image_base64", json={"images": encoded}, timeout=60)
    assert plain.status_code == 200, plain.text
    assert _flat(plain.json()) == pytest.approx(_flat(uploaded), abs=1e-6)


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


def test_classify_uses_the_templates_it_is_given(client, packaged):
    labels = ["a red circle", "a blue square"]
    path = packaged["tmp"] / "red.png"
    path.write_bytes(_png((64, 64), "red"))

    default = {item["label"]: item["probability"] for item in client.classify(image=path, labels=labels)}
    custom = client.classify(image=path, labels=labels, templates=["a drawing of {}", "{}, drawn"])
    assert sorted(item["label"] for item in custom) == sorted(labels)
    assert math.isclose(sum(item["probability"] for item in custom), 1.0, rel_tol=1e-5)
    assert {item["label"]: item["probability"] for item in custom} != pytest.approx(default, abs=1e-6)


def test_rank_orders_every_image_for_each_text(client, server, gallery_images):
    queries = ["a red circle", "two blue squares"]
    paths = list(gallery_images.values())
    rankings = client.rank(queries=queries, candidates=paths)
    assert len(rankings) == len(queries)
    for ranking in rankings:
        assert sorted(match["index"] for match in ranking) == list(range(len(paths)))
        probabilities = [match["probability"] for match in ranking]
        assert probabilities == sorted(probabilities, reverse=True)
        assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-5)
        # the softmax is monotonic in the cosine, so both orders agree
        cosines = [match["cosine"] for match in ranking]
        assert cosines == sorted(cosines, reverse=True)
        assert all(-1.0 - 1e-5 <= c <= 1.0 + 1e-5 for c in cosines)

    files = [("candidates", (path.name, path.read_bytes(), "image/png")) for path in paths]
    plain = httpx.post(f"{server}/rank", files=files, data={"queries": json.dumps(queries)}, timeout=60)
    assert plain.status_code == 200, plain.text
    assert [[m["index"] for m in r] for r in plain.json()] == [[m["index"] for m in r] for r in rankings]


def test_rank_texts_orders_every_text_for_each_image(server, gallery_images):
    texts = ["a red circle", "two blue squares", "a green star", "a white triangle"]
    paths = list(gallery_images.values())[:2]
    files = [("queries", (path.name, path.read_bytes(), "image/png")) for path in paths]
    response = httpx.post(f"{server}/rank_texts", files=files, data={"candidates": json.dumps(texts)}, timeout=60)
    assert response.status_code == 200, response.text
    rankings = response.json()
    assert len(rankings) == len(paths)
    for ranking in rankings:
        assert sorted(match["index"] for match in ranking) == list(range(len(texts)))
        probabilities = [match["probability"] for match in ranking]
        assert probabilities == sorted(probabilities, reverse=True)
        assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-5)


def _check_search_results(results: list[dict], k: int, packaged) -> None:
    from clipflow.data.shards import ShardIndex, split_shards

    keys = set(ShardIndex(split_shards(packaged["tmp"] / "data", "test")).keys)
    assert len(results) == k
    assert {item["id"] for item in results} <= keys
    scores = [item["score"] for item in results]
    assert scores == sorted(scores, reverse=True)
    assert all(item["caption"] for item in results)


def test_search_by_text_returns_the_top_k_gallery_items(client, server, packaged):
    results = client.search(text="a red circle", k=7)
    _check_search_results(results, 7, packaged)

    plain = httpx.post(f"{server}/search", json={"text": "a red circle", "k": 7}, timeout=60)
    assert plain.status_code == 200, plain.text
    assert [item["id"] for item in plain.json()] == [item["id"] for item in results]
    # k defaults to 5
    assert len(client.search(text="a blue star")) == 5


def test_search_with_a_gallery_image_finds_that_image_first(client, server, gallery_images, packaged):
    for key, path in gallery_images.items():
        results = client.search_image(image=path, k=MAX_K)
        _check_search_results(results, MAX_K, packaged)
        assert results[0]["id"] == key
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)

    key, path = next(iter(gallery_images.items()))
    plain = httpx.post(
        f"{server}/search_image", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"k": "3"}
    )
    assert plain.status_code == 200, plain.text
    assert [item["id"] for item in plain.json()][0] == key and len(plain.json()) == 3


def _files(field: str, payloads: list[bytes]) -> list:
    return [(field, (f"upload{i}.png", payload, "image/png")) for i, payload in enumerate(payloads)]


def _upload(endpoint: str, field: str, payloads: list[bytes], **fields) -> tuple[str, dict]:
    """A multipart request: files under `field`, other fields JSON-encoded as BentoML reads them."""
    return endpoint, {"files": _files(field, payloads), "data": {k: json.dumps(v) for k, v in fields.items()}}


def _raw(endpoint: str, content, content_type: str) -> tuple[str, dict]:
    return endpoint, {"content": content, "headers": {"content-type": content_type}}


RED = _png((64, 64), "red")
JSON = "application/json"

# id: (endpoint, httpx.post keyword arguments, status, part of the message)
BAD_REQUESTS = {
    "random-bytes": (*_upload("classify", "image", [os.urandom(2048)], labels=["a"]), 400, "could not be decoded"),
    "truncated-png": (*_upload("classify", "image", [RED[:100]], labels=["a"]), 400, "could not be decoded"),
    "30000x30000-png": (
        *_upload("classify", "image", [_png_claiming(30000, 30000)], labels=["a"]),
        400,
        f"more than {MAX_IMAGE_PIXELS} pixels",
    ),
    "too-many-pixels": (
        *_upload("encode_image", "images", [_png((200, 100), "red")]),
        400,
        "images[0] has 20000 pixels",
    ),
    "too-many-bytes": (
        *_upload("encode_image", "images", [RED, os.urandom(MAX_IMAGE_BYTES + 1)]),
        400,
        "images[1] has",
    ),
    "no-labels": (*_upload("classify", "image", [RED], labels=[]), 400, "labels must not be empty"),
    "10000-labels": (*_upload("classify", "image", [RED], labels=["x"] * 10_000), 400, "10000 given, at most 8"),
    "1MB-text": ("encode_text", {"json": {"texts": ["x" * 999_000]}}, 400, f"at most {MAX_TEXT_CHARS}"),
    "too-many-texts": ("encode_text", {"json": {"texts": ["a"] * (MAX_TEXTS + 1)}}, 400, f"at most {MAX_TEXTS}"),
    "template-without-braces": (
        *_upload("classify", "image", [RED], labels=["a"], templates=["a photo"]),
        400,
        "must contain '{}'",
    ),
    "template-with-a-field": (
        *_upload("classify", "image", [RED], labels=["a"], templates=["{} {name}"]),
        400,
        "must contain '{}'",
    ),
    "too-many-prompts": (
        *_upload("classify", "image", [RED], labels=list("abcde"), templates=["{}", "a {}", "the {}"]),
        400,
        "15 prompts",
    ),
    "batch-too-large": (*_upload("encode_image", "images", [RED] * (MAX_BATCH + 1)), 400, f"at most {MAX_BATCH}"),
    "bad-base64": ("encode_image_base64", {"json": {"images": ["not base64!"]}}, 400, "images[0] is not valid base64"),
    "no-candidates": ("rank", {"json": {"queries": ["a"], "candidates": []}}, 400, "candidates must not be empty"),
    "k-zero": ("search", {"json": {"text": "a", "k": 0}}, 400, f"k must be between 1 and {MAX_K}"),
    "k-too-large": ("search", {"json": {"text": "a", "k": MAX_K + 1}}, 400, f"k must be between 1 and {MAX_K}"),
    "url-in-a-file-field": (
        "encode_image",
        {"files": _files("images", [RED]), "data": {"images": "http://127.0.0.1:1/x.png"}},
        400,
        "URLs are not fetched",
    ),
    "file-in-a-text-field": (
        "rank",
        {"files": _files("candidates", [RED]) + _files("queries", [RED])},
        400,
        "a text field holds binary data",
    ),
    "malformed-multipart": (
        *_raw("encode_image", b"garbage", "multipart/form-data; boundary=x"),
        400,
        "multipart body",
    ),
    "wrong-content-type": (*_raw("classify", RED, "image/png"), 415, "send application/json or multipart/form-data"),
    "form-urlencoded": ("encode_text", {"data": {"texts": "a"}}, 415, "application/x-www-form-urlencoded"),
    "missing-field": (*_upload("classify", "image", [RED]), 422, "labels: Field required"),
    "malformed-json": (*_raw("encode_text", b'{"texts": [', JSON), 422, "Invalid JSON"),
    "wrong-type": ("search", {"json": {"text": "a", "k": "many"}}, 422, "k: Input should be a valid integer"),
    "json-for-a-file": ("encode_image", {"json": {"images": ["aGVsbG8="]}}, 422, "send files as multipart/form-data"),
    "declared-too-large": (*_raw("encode_text", b"x" * (MAX_REQUEST_BYTES + 1), JSON), 413, "serve.max_request_bytes"),
    "streamed-too-large": (*_raw("encode_text", iter([b"x" * 65536] * 20), JSON), 413, "serve.max_request_bytes"),
}


@pytest.mark.parametrize(("endpoint", "request_args", "status", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, endpoint, request_args, status, message):
    response = httpx.post(f"{server}/{endpoint}", timeout=60, **request_args)
    assert response.status_code == status, response.text
    assert message in response.text
    _assert_still_serving(server)


def test_search_without_a_gallery_says_so(keyed_server):
    response = httpx.post(
        f"{keyed_server}/search", json={"text": "a red circle"}, headers={"X-API-Key": API_KEY}, timeout=60
    )
    assert response.status_code == 404
    assert "no gallery" in response.text and "--gallery" in response.text


def test_api_key_guards_every_endpoint_but_probes_and_metrics(keyed_server, packaged):
    import bentoml

    url = f"{keyed_server}/encode_text"
    body = {"texts": ["a red circle"]}
    missing = httpx.post(url, json=body, timeout=60)
    assert missing.status_code == 401
    assert "API key required" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    for headers in ({"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": API_KEY}):
        wrong = httpx.post(url, json=body, headers=headers, timeout=60)
        assert wrong.status_code == 401, headers
        assert API_KEY not in wrong.text
    files = _files("images", [RED])
    assert httpx.post(f"{keyed_server}/encode_image", files=files, timeout=60).status_code == 401

    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        _assert_still_serving(keyed_server, headers)
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{keyed_server}{path}", timeout=60).status_code == 200, path

    with bentoml.SyncHTTPClient(keyed_server, token=API_KEY, timeout=60) as client:
        assert _unit(client.encode_text(texts=["a red circle"])[0])
    with (
        bentoml.SyncHTTPClient(keyed_server, token="wrong", timeout=60) as client,
        pytest.raises(bentoml.exceptions.BentoMLException, match="wrong API key"),
    ):
        client.encode_text(texts=["a red circle"])
    assert API_KEY not in (packaged["tmp"] / f"serve-{keyed_server.rsplit(':', 1)[1]}.log").read_text()


def test_client_example_calls_every_endpoint_with_the_key_from_its_environment(keyed_server, gallery_images):
    paths = [str(path) for path in gallery_images.values()]
    command = [sys.executable, str(REPO / "serving/client.py"), "--url", keyed_server]
    command += [arg for path in paths for arg in ("--image", path)]
    env = {**os.environ, "CLIPFLOW_API_KEY": API_KEY}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert answers["encode_text"] == [3, 128]
    assert answers["encode_image"] == answers["encode_image_base64"] == [len(paths), 128]
    assert len(answers["rank"]) == 2 and len(answers["rank_texts"]) == len(paths)
    assert "no gallery" in answers["search"]


def test_the_bento_runs_this_service_with_pinned_packages(packaged):
    import bentoml

    from clipflow.serve.package import RUNTIME_DISTRIBUTIONS

    bento = Path(bentoml.bentos.get(packaged["result"].bento_tag).path)
    for name in ("service.py", "page.html"):
        assert (bento / "src" / name).read_bytes() == (REPO / "serving" / name).read_bytes(), name
    requirements = (bento / "env/python/requirements.txt").read_text().split()
    for name in RUNTIME_DISTRIBUTIONS:
        assert f"{name}=={version(name)}" in requirements
    pyproject = (REPO / "pyproject.toml").read_text()
    for name in ("torch", "torchvision", "open-clip-torch", "bentoml"):
        assert f'"{name}=={version(name)}"' in pyproject


def test_the_page_is_served_at_the_root_and_the_api_docs_at_docs(server, keyed_server):
    for url in (server, keyed_server):
        page = httpx.get(f"{url}/", timeout=60)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.content == (REPO / "serving/page.html").read_bytes()
        docs = httpx.get(f"{url}/docs", timeout=60)
        assert docs.status_code == 200 and docs.content != page.content
        assert "/docs.json" in docs.text or "swagger" in docs.text.lower()


def test_gallery_image_returns_the_thumbnail_of_a_search_result(client, server, packaged, gallery_images):
    key, path = next(iter(gallery_images.items()))
    response = httpx.post(f"{server}/gallery_image", json={"id": key}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    thumbnail = Image.open(io.BytesIO(response.content))
    original = Image.open(path)
    # The built-in images are smaller than a thumbnail, which never enlarges: it is the image itself.
    assert max(original.size) <= packaged["params"].serve.thumbnail_px
    assert thumbnail.size == original.size
    assert thumbnail.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    found = client.search_image(image=path, k=1)[0]
    assert httpx.post(f"{server}/gallery_image", json={"id": found["id"]}, timeout=60).content == response.content

    missing = httpx.post(f"{server}/gallery_image", json={"id": "no-such-item"}, timeout=60)
    assert missing.status_code == 404 and "no item 'no-such-item'" in missing.text
    long_id = httpx.post(f"{server}/gallery_image", json={"id": "x" * (MAX_TEXT_CHARS + 1)}, timeout=60)
    assert long_id.status_code == 400 and f"at most {MAX_TEXT_CHARS}" in long_id.text


def _concurrently(calls: list) -> list:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_concurrent_encode_requests_are_batched_and_each_gets_its_own_rows(server):
    texts = [[f"{n} red circles", f"a blue star number {n}"][: 1 + n % 2] for n in range(16)]
    alone = [httpx.post(f"{server}/encode_text", json={"texts": t}, timeout=120).json() for t in texts]
    pattern = r'bentoml_service_adaptive_batch_size_(sum|count)\{[^}]*method_name="encode_text"[^}]*\} ([0-9.e+]+)'
    for _ in range(5):
        answers = _concurrently(
            [lambda t=t: httpx.post(f"{server}/encode_text", json={"texts": t}, timeout=120) for t in texts]
        )
        assert [a.status_code for a in answers] == [200] * len(texts)
        for answer, expected in zip(answers, alone, strict=True):
            assert _flat(answer.json()) == pytest.approx(_flat(expected), abs=1e-5)
        totals = dict(re.findall(pattern, httpx.get(f"{server}/metrics", timeout=60).text))
        # Each observation is the number of requests one model call served: more requests than
        # calls means some calls merged several requests. A busy machine may need a few rounds.
        if float(totals["sum"]) > float(totals["count"]):
            break
    assert float(totals["sum"]) > float(totals["count"]) > 0, totals


def test_a_request_larger_than_a_batch_is_split_over_model_calls_and_answered_in_order(server, packaged):
    batch_max_size = packaged["params"].serve.batch_max_size
    texts = [f"{n} green triangles" for n in range(2 * batch_max_size + 3)]
    alone = [httpx.post(f"{server}/encode_text", json={"texts": [t]}, timeout=120).json()[0] for t in texts]
    pattern = r'bentoml_service_adaptive_batch_size_count\{[^}]*method_name="encode_text"[^}]*\} ([0-9.e+]+)'

    def model_calls() -> float:
        return float(re.search(pattern, httpx.get(f"{server}/metrics", timeout=60).text).group(1))

    calls_before = model_calls()
    whole = httpx.post(f"{server}/encode_text", json={"texts": texts}, timeout=120)
    assert whole.status_code == 200, whole.text
    assert _flat(whole.json()) == pytest.approx(_flat(alone), abs=1e-5)
    assert model_calls() - calls_before >= 3


def test_a_bad_request_fails_alone_and_not_the_batch_it_arrives_with(server):
    url = f"{server}/encode_text"
    good = [lambda n=n: httpx.post(url, json={"texts": [f"{n} stars"]}, timeout=120) for n in range(8)]
    bad = [lambda: httpx.post(url, json={"texts": ["x" * (MAX_TEXT_CHARS + 1)]}, timeout=120)]
    files = [lambda: httpx.post(f"{server}/encode_image", files=_files("images", [RED, RED[:100]]), timeout=120)]
    answers = _concurrently(good + bad + files)
    assert [a.status_code for a in answers] == [200] * 8 + [400, 400]
    assert "images[1] could not be decoded" in answers[-1].text


def test_the_served_model_answers_as_evaluation_computes(server, packaged):
    """What a client gets for the test split's images is what `clipflow evaluate` computes for them:
    the same image and caption embeddings, and classify's top label is evaluation's zero-shot prediction."""
    import torch

    from clipflow import model as clip_model
    from clipflow.evaluate.embeddings import SplitEmbeddings
    from clipflow.params import load_params

    templates = load_params(REPO / "params.yaml", profile="test").evaluate.templates
    clip = clip_model.load(clip_model.resolve_checkpoint(packaged["tmp"] / "checkpoint"))
    clip.model.eval()
    pairs, evaluated = SplitEmbeddings(clip, packaged["tmp"] / "data", batch_size=64)("test")
    shown = range(MAX_BATCH)
    images = [("images", (f"{i}.png", pairs.index.read(i, "png"), "image/png")) for i in shown]
    served = torch.tensor(httpx.post(f"{server}/encode_image", files=images, timeout=60).json())
    assert (served * evaluated[: len(shown)]).sum(dim=1).min() > 0.9999

    captions = [pairs.caption(i) for i in shown]
    served_texts = torch.tensor(httpx.post(f"{server}/encode_text", json={"texts": captions}, timeout=60).json())
    assert (served_texts * clip.encode_text(captions)).sum(dim=1).min() > 0.9999

    labels = sorted({pairs.meta(i)["label"] for i in range(len(pairs))})[:MAX_LABELS]
    classes = clip.encode_labels(labels, templates)
    for i in shown:
        expected = (clip.model.logit_scale.exp() * evaluated[i] @ classes.T).softmax(dim=-1)
        response = httpx.post(
            f"{server}/classify",
            files={"image": ("i.png", pairs.index.read(i, "png"), "image/png")},
            data={"labels": json.dumps(labels)},
            timeout=60,
        )
        answered = {item["label"]: item["probability"] for item in response.json()}
        assert response.json()[0]["label"] == labels[int(expected.argmax())]
        assert [answered[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-4)


# bf16: the same champion packaged at serve.precision=bf16 (`packaged_bf16`), against the fp32 Bento.


@pytest.fixture(scope="module")
def bf16_server(packaged_bf16):
    with serve_bento(packaged_bf16["result"].bento_tag, packaged_bf16["tmp"]) as url:
        yield url


def _worst_cosine(rows: list[list[float]], reference: list[list[float]]) -> float:
    assert len(rows) == len(reference)
    return min(
        math.fsum(a * b for a, b in zip(row, ref, strict=True)) for row, ref in zip(rows, reference, strict=True)
    )


def test_package_at_bf16_stores_the_precision_with_its_check_against_fp32(packaged, packaged_bf16):
    import bentoml

    result = packaged_bf16["result"]
    assert result.precision == "bf16"
    numbers = result.precision_check
    assert numbers["worst_image_cosine"] > 0.999 and numbers["worst_text_cosine"] > 0.999
    for name in ("heldout", "seen"):  # both zero-shot sets' splits are in the packaged data
        drop = numbers[f"zeroshot_top1_drop_{name}"]
        assert drop == pytest.approx(numbers[f"zeroshot_top1_{name}_fp32"] - numbers[f"zeroshot_top1_{name}_bf16"])
        assert drop <= packaged_bf16["params"].serve.precision_max_top1_drop
    metadata = bentoml.models.get(result.bento_model_tag).info.metadata
    assert metadata["precision"] == "bf16" and metadata["precision_check"] == pytest.approx(numbers)
    # embedded at the precision this machine serves `bf16` at: bf16 itself
    assert result.gallery["precision"] == metadata["gallery"]["precision"] == "bf16"

    fp32 = packaged["result"]
    assert fp32.precision == "fp32" and fp32.precision_check == {}
    assert bentoml.models.get(fp32.bento_model_tag).info.metadata["precision"] == "fp32"


def test_a_bento_whose_precision_check_fails_is_refused_with_its_numbers(packaged, capsys):
    import bentoml

    from clipflow.cli import main

    before = ({str(m.tag) for m in bentoml.models.list()}, {str(b.tag) for b in bentoml.bentos.list()})
    command = ["package", "--gallery", str(packaged["tmp"] / "data"), "--params", str(REPO / "params.yaml")]
    command += ["--profile", "test", "--set", f"tracking.uri=sqlite:///{packaged['tmp']}/mlflow.db"]
    command += ["--set", "serve.precision=bf16", "--set", "serve.precision_min_cosine=1.0"]
    assert main(command) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after MLflow's download progress
    assert error.startswith("clipflow: error: bf16 does not match fp32: worst_image_cosine 0.99")
    for name in ("worst_image_cosine", "worst_text_cosine", "worst_image_cosine_heldout", "worst_image_cosine_test"):
        assert re.search(rf"{name} 0\.99\d+ < serve\.precision_min_cosine 1\.0", error)
    assert "serve.precision=fp32" in error
    assert ({str(m.tag) for m in bentoml.models.list()}, {str(b.tag) for b in bentoml.bentos.list()}) == before


def test_bf16_serving_answers_every_endpoint_close_to_fp32(client, server, bf16_server, gallery_images, packaged):
    import bentoml

    texts = ["a red circle", "two blue squares", "a green star on the left"]
    labels = ["red circle", "blue square", "green star"]
    paths = list(gallery_images.values())
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    with bentoml.SyncHTTPClient(bf16_server, timeout=60) as bf16:
        assert _worst_cosine(bf16.encode_text(texts=texts), client.encode_text(texts=texts)) > 0.999
        assert _worst_cosine(bf16.encode_image(images=paths), client.encode_image(images=paths)) > 0.999
        base64_rows = bf16.encode_image_base64(images=encoded)
        assert _worst_cosine(base64_rows, client.encode_image_base64(images=encoded)) > 0.999

        def by_label(ranked: list[dict]) -> dict[str, float]:
            return {item["label"]: item["probability"] for item in ranked}

        classified = bf16.classify(image=paths[0], labels=labels)
        assert by_label(classified) == pytest.approx(by_label(client.classify(image=paths[0], labels=labels)), abs=0.01)

        def cosines(rankings: list[list[dict]]) -> list[dict[int, float]]:
            return [{match["index"]: match["cosine"] for match in ranking} for ranking in rankings]

        for low, full in [
            (bf16.rank(queries=texts, candidates=paths), client.rank(queries=texts, candidates=paths)),
            (bf16.rank_texts(queries=paths, candidates=texts), client.rank_texts(queries=paths, candidates=texts)),
        ]:
            for row, reference in zip(cosines(low), cosines(full), strict=True):
                assert row == pytest.approx(reference, abs=0.005)

        # Sorted top-k scores move no more than any one score does, whatever near-ties swap places.
        def scores(results: list[dict]) -> list[float]:
            return [item["score"] for item in results]

        found = bf16.search(text=texts[0], k=5)
        _check_search_results(found, 5, packaged)
        assert scores(found) == pytest.approx(scores(client.search(text=texts[0], k=5)), abs=0.005)
        found = bf16.search_image(image=paths[0], k=5)
        _check_search_results(found, 5, packaged)
        assert scores(found) == pytest.approx(scores(client.search_image(image=paths[0], k=5)), abs=0.005)

    def embeddings(url: str) -> list[list[float]]:
        body = {"model": packaged["params"].serve.bento_name, "input": texts}
        response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [item["embedding"] for item in response.json()["data"]]

    assert _worst_cosine(embeddings(bf16_server), embeddings(server)) > 0.999
