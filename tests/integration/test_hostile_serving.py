"""Hostile and careless requests against a real `bentoml serve` (issue 19), each measured as it runs.

The champion of `tests/support/serving_fixtures.py` is packaged once more with the default
serving limits of params.yaml (those an operator gets), except a batch latency of a few seconds,
so shedding is reached with a few requests, and served through `clipflow.serve.launch`, which
gives each server its own Prometheus folder. Every attack must get a 4xx (or a 503 that says
why, with `Retry-After`) while the test samples the server's memory (RSS of the server process
and its workers) and the latency of `/livez`; afterwards the server still classifies correctly.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import string
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from clipflow.serve.encoder import usable_cores
from tests.support import REPO
from tests.support.bad_inputs import (
    encoded,
    exif_rotated_jpeg,
    flat_jpeg,
    flat_png,
    gray16_scene_png,
    half_transparent_png,
    rgb_png,
    scene,
)
from tests.support.servers import bentoml_server, free_port
from tests.support.serving_fixtures import SERVING

BATCH_MAX_LATENCY_MS = 3000
MAX_WAITING = 2  # unbatched model calls that may wait for a core
# Concurrent requests of the longest texts allowed: several times the batch latency of work.
FLOOD = 16
# /livez must answer within this while an attack runs: a Kubernetes probe's default timeout is 1 s.
LIVEZ_S = 2.0
MB = 1 << 20
RED = rgb_png((230, 20, 20), (64, 64))
BLUE = rgb_png((20, 20, 230), (64, 64))


@pytest.fixture(scope="module")
def hostile(packaged):
    """The champion packaged with the default serving limits and traced requests; the params it was packaged with."""
    from clipflow.params import load_params
    from clipflow.serve.package import package

    params = load_params(
        REPO / "params.yaml",
        overrides=[
            f"tracking.uri=sqlite:///{packaged['tmp']}/mlflow.db",
            "tracking.experiment=t",
            "serve.bento_name=clipflow-hostile",
            f"serve.batch_max_latency_ms={BATCH_MAX_LATENCY_MS}",
            f"serve.max_waiting={MAX_WAITING}",
            "serve.tracing=true",
        ],
        profile="test",
    )
    result = package(f"models:/{params.promote.model_name}@champion", params, SERVING)
    return {"tag": result.bento_tag, "params": params, "home": _home(packaged["tmp"] / "hostile-home")}


def _home(home):
    """A BentoML home over the session's store, shared by every server of this module."""
    from clipflow.serve.package import bentoml_home

    home.mkdir()
    for name in ("bentos", "models"):
        (home / name).symlink_to(bentoml_home() / name)
    return home


@contextlib.contextmanager
def _launch(hostile, tmp) -> Iterator[Server]:
    from clipflow.serve.package import bentoml_env

    port = free_port()
    command = [sys.executable, "-m", "clipflow.serve.launch", "serve", hostile["tag"], "--port", str(port)]
    command += ["--host", "127.0.0.1"]
    env = {**bentoml_env(), "BENTOML_HOME": str(hostile["home"])}
    with bentoml_server(command, port, env, tmp) as url:
        yield Server(url, _listener(port), tmp / f"serve-{port}.log", _classify_colours(url))


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    log: Path
    # What classify answered right after the server started, before any attack.
    baseline: list[dict]

    def rss(self) -> int:
        """Resident memory of the server process and all its workers, in bytes."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            total = 0
            for process in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += process.memory_info().rss
            return total
        return 0


def _listener(port: int) -> int:
    """The process that listens on `port` and is not a child of another that does (the arbiter)."""
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    return next(pid for pid in pids if psutil.Process(pid).ppid() not in pids)


@pytest.fixture(scope="module")
def server(hostile, packaged):
    with _launch(hostile, packaged["tmp"]) as running:
        yield running


@dataclass
class Watch:
    """The server's peak memory and slowest /livez while a request runs."""

    start_rss: int
    peak_rss: int
    livez_s: list[float] = field(default_factory=list)

    @property
    def growth_mb(self) -> float:
        return (self.peak_rss - self.start_rss) / MB

    @property
    def slowest_livez_s(self) -> float:
        return max(self.livez_s, default=0.0)


@contextlib.contextmanager
def watching(server: Server, name: str) -> Iterator[Watch]:
    """Sample RSS and /livez every 50 ms while the body runs; print what was seen."""
    watch = Watch(server.rss(), server.rss())
    done = threading.Event()

    def sample() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                watch.peak_rss = max(watch.peak_rss, server.rss())
                started = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    client.get(f"{server.url}/livez")
                watch.livez_s.append(time.monotonic() - started)
                done.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield watch
    finally:
        done.set()
        sampler.join()
        print(f"{name}: RSS +{watch.growth_mb:.0f} MB at peak, slowest /livez {watch.slowest_livez_s:.2f} s")


def _classify(url: str, image: bytes, labels: list[str], templates: list[str] | None = None, **kw) -> httpx.Response:
    data = {"labels": json.dumps(labels)}
    if templates is not None:
        data["templates"] = json.dumps(templates)
    return httpx.post(f"{url}/classify", files={"image": ("i.png", image)}, data=data, timeout=kw.get("timeout", 60))


def _classify_colours(url: str) -> list[dict]:
    response = _classify(url, RED, ["red", "blue", "green"], ["a {} square.", "a {{{}}}"])
    assert response.status_code == 200, response.text
    return response.json()


def _assert_classifies(server: Server) -> None:
    """The server still classifies as it did before any attack (the model is random: the answer
    is checked against the one it gave then), and the probabilities cover every label."""
    answer = _classify_colours(server.url)
    assert [item["label"] for item in answer] == [item["label"] for item in server.baseline]
    assert [item["probability"] for item in answer] == pytest.approx([i["probability"] for i in server.baseline])
    assert sum(item["probability"] for item in answer) == pytest.approx(1.0, abs=1e-5)


def _embed(url: str, payload: bytes) -> np.ndarray:
    response = httpx.post(f"{url}/encode_image", files=[("images", ("x", payload))], timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()[0])


def _random_words(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


TEMPLATE_ATTACKS = {
    "pad-to-40M": "{{}}{:x>40000000}",
    "cut-the-label": "{{}} {:.1}",
    "precision": "a {:.0}",
    "repr": "a photo of {!r}",
    "named": "{} {name}",
    "positional": "a {0}",
    "two-labels": "{} and {}",
    "nested-spec": "{:{}}",
    "lone-brace": "a {} }",
}


@pytest.mark.parametrize("template", TEMPLATE_ATTACKS.values(), ids=TEMPLATE_ATTACKS)
def test_a_template_field_that_is_not_a_bare_brace_pair_gets_400_at_no_cost(server, template):
    with watching(server, f"template {template!r}") as watch:
        response = _classify(server.url, RED, ["cat", "dog"], [template], timeout=30)
    assert response.status_code == 400, response.text
    assert "must contain '{}' exactly once" in response.text
    assert watch.growth_mb < 100
    assert watch.slowest_livez_s < LIVEZ_S


def test_templates_fill_the_label_literally_and_the_prompt_is_bounded(server, hostile):
    limit = hostile["params"].serve.max_text_chars
    # Escaped braces stay literal, and a label holding braces is never formatted.
    literal = _classify(server.url, RED, ["{0}", "{:x>9}"], ["{{{}}}"])
    assert literal.status_code == 200, literal.text
    assert {item["label"] for item in literal.json()} == {"{0}", "{:x>9}"}
    too_long = _classify(server.url, RED, ["x" * (limit // 2 + 1)], ["{}" + "y" * (limit // 2)])
    assert too_long.status_code == 400, too_long.text
    assert f"makes a prompt of {limit + 1} characters, at most {limit}" in too_long.text
    _assert_classifies(server)


def test_images_over_the_request_pixel_budget_are_refused_from_their_headers(server, hostile):
    budget = hostile["params"].serve.max_request_pixels
    big = flat_png(6300)  # under serve.max_image_pixels alone
    files = [("images", (f"{i}.png", big)) for i in range(32)]
    with watching(server, "32 PNGs of 6300x6300") as watch:
        response = httpx.post(f"{server.url}/encode_image", files=files, timeout=60)
    assert response.status_code == 400, response.text
    assert f"{32 * 6300 * 6300} pixels to decode in this request, at most {budget}" in response.text
    assert watch.growth_mb < 150
    assert watch.slowest_livez_s < LIVEZ_S
    _assert_classifies(server)


def test_large_images_within_the_budget_decode_off_the_event_loop_one_at_a_time(server):
    side = 6300
    files = [("images", (f"{i}.png", flat_png(side))) for i in range(2)]
    with watching(server, "2 PNGs of 6300x6300") as watch:
        response = httpx.post(f"{server.url}/encode_image", files=files, timeout=120)
    assert response.status_code == 200, response.text
    decoded_mb = side * side * 3 / MB
    # One full-size image at a time, never both.
    assert watch.growth_mb < 1.5 * decoded_mb
    assert watch.slowest_livez_s < LIVEZ_S
    _assert_classifies(server)


def test_large_jpegs_decode_at_a_reduced_scale_so_a_batch_of_photos_fits_the_budget(server, hostile):
    size = (6000, 4000)
    budget = hostile["params"].serve.max_request_pixels
    assert 32 * size[0] * size[1] > budget  # decoded at full scale, they would not fit
    photo = flat_jpeg(size)
    files = [("images", (f"{i}.jpg", photo)) for i in range(32)]
    with watching(server, "32 JPEGs of 6000x4000") as watch:
        response = httpx.post(f"{server.url}/encode_image", files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()) == 32
    assert watch.growth_mb < size[0] * size[1] * 3 / MB
    assert watch.slowest_livez_s < LIVEZ_S


ODD_IMAGES = {
    "exif-rotated-jpeg": (exif_rotated_jpeg, lambda image: image.transpose(Image.Transpose.ROTATE_90)),
    "16-bit-png": (gray16_scene_png, lambda image: Image.new("RGB", image.size, "white")),
    "transparent-png": (half_transparent_png, lambda image: image),
}


@pytest.mark.parametrize(("make", "misread"), ODD_IMAGES.values(), ids=ODD_IMAGES)
def test_a_served_image_embeds_as_ingest_stores_it(server, hostile, make, misread):
    from clipflow.validate.rows import check_image

    image = scene()
    payload = make(image)
    params = hostile["params"]
    stored = check_image(payload, params.validate, params.data.image_size).jpeg
    served, ingested = _embed(server.url, payload), _embed(server.url, stored)
    # What serving made of it before it decoded as ingest does: on its side, pure white, alpha dropped.
    wrong = _embed(server.url, encoded(misread(image), "PNG"))
    agreement = float(served @ ingested)
    print(f"cosine to the ingested image: {agreement:.5f}, to the misread one: {float(served @ wrong):.5f}")
    assert agreement > 0.999
    assert float(ingested @ wrong) < agreement


def test_unknown_paths_add_no_metric_series(server):
    def series() -> set[str]:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(20):
            assert client.get(f"/probe-{i}").status_code == 404
        client.get("/livez")  # what the watch below calls has its series already
        after_20 = series()
        with watching(server, "2000 unknown paths") as watch:
            for i in range(2000):
                client.get(f"/no-such-path-{i}")
    after_2000 = series()
    print(f"metric series: {len(after_20)} after 20 unknown paths, {len(after_2000)} after 2,020")
    assert after_2000 == after_20
    assert any('endpoint="other"' in name for name in after_2000)
    assert not any("no-such-path" in name for name in after_2000)
    assert watch.slowest_livez_s < LIVEZ_S


def test_long_random_texts_within_the_limits_are_answered_not_shed(server, hostile):
    serve = hostile["params"].serve
    rng = random.Random(1)
    texts = [_random_words(rng, serve.max_text_chars) for _ in range(serve.max_texts)]
    with watching(server, f"{serve.max_texts} texts of {serve.max_text_chars} random letters") as watch:
        response = httpx.post(f"{server.url}/encode_text", json={"texts": texts}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()) == serve.max_texts
    assert watch.slowest_livez_s < LIVEZ_S
    labels = [_random_words(rng, 8) for _ in range(16)]
    templates = ["{}" + _random_words(rng, serve.max_text_chars - 20) for _ in range(16)]
    with watching(server, "classify, 16 labels x 16 long templates") as watch:
        response = _classify(server.url, RED, labels, templates)
    assert response.status_code == 200, response.text
    assert watch.slowest_livez_s < LIVEZ_S


def test_a_flood_is_shed_on_arrival_with_retry_after_and_the_rest_is_answered(server, hostile):
    serve = hostile["params"].serve
    rng = random.Random(2)
    batches = [[_random_words(rng, serve.max_text_chars) for _ in range(serve.max_texts)] for _ in range(FLOOD)]
    # The dispatcher's rate is measured on this one before the flood.
    assert httpx.post(f"{server.url}/encode_text", json={"texts": batches[0]}, timeout=60).status_code == 200

    def send(texts: list[str]) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/encode_text", json={"texts": texts}, timeout=120)
        return response, time.monotonic() - started

    name = f"{FLOOD} concurrent requests of {serve.max_texts} long texts"
    with watching(server, name) as watch, ThreadPoolExecutor(FLOOD) as pool:
        results = list(pool.map(send, batches))
    shed = [(r, s) for r, s in results if r.status_code == 503]
    answered = [r for r, _ in results if r.status_code == 200]
    print(f"{len(answered)} answered, {len(shed)} shed, slowest shed after {max(s for _, s in shed):.2f} s")
    assert len(shed) + len(answered) == len(results), [r.text for r, _ in results]
    assert shed and answered
    for response, _ in shed:
        assert int(response.headers["retry-after"]) >= 1
        message = response.json()["error"]
        # Refused on arrival, or dropped unstarted at the max latency when the estimate was low.
        refused = rf"busy: this request's {serve.max_texts} items (would wait about [\d.]+ s|waited serve\.batch)"
        assert re.search(refused, message), message
    assert watch.slowest_livez_s < LIVEZ_S
    _assert_classifies(server)


def test_a_flood_of_unbatched_calls_is_refused_on_arrival_past_those_allowed_to_wait(server, hostile):
    """classify runs in BentoML's thread pool: past the running and MAX_WAITING calls, a request answers 503 unread."""
    rng = random.Random(3)
    labels = [_random_words(rng, 8) for _ in range(8)]
    templates = ["{}" + _random_words(rng, hostile["params"].serve.max_text_chars - 20) for _ in range(8)]
    flood = 4 * (MAX_WAITING + usable_cores())  # the server runs one call per core it may use
    with watching(server, f"{flood} concurrent classify calls") as watch, ThreadPoolExecutor(flood) as pool:
        responses = list(pool.map(lambda _: _classify(server.url, RED, labels, templates), range(flood)))
    answered = [r for r in responses if r.status_code == 200]
    shed = [r for r in responses if r.status_code == 503]
    print(f"{len(answered)} answered, {len(shed)} refused")
    assert len(answered) + len(shed) == flood, [r.text for r in responses]
    assert answered and shed
    assert all(len(r.json()) == len(labels) for r in answered)
    for response in shed:
        assert int(response.headers["retry-after"]) >= 1
        assert "model calls are running or waiting, the most serve.max_waiting allows" in response.json()["error"]
    assert watch.slowest_livez_s < LIVEZ_S
    _assert_classifies(server)  # admitted again once the flood has passed


def test_a_client_error_is_logged_in_one_line_without_a_traceback(server):
    before = server.log.read_text()
    response = httpx.post(f"{server.url}/encode_image", files=[("images", ("x.png", b"not an image"))], timeout=30)
    assert response.status_code == 400
    line = "POST /encode_image answered 400: images[0] could not be decoded"
    # The worker process writes the log: wait for its line (and whatever came with it).
    _until(lambda: line in server.log.read_text()[len(before) :], "the 400 to be logged")
    added = server.log.read_text()[len(before) :]
    assert "Traceback" not in added and "ERROR" not in added


def test_with_tracing_on_a_request_joins_its_callers_trace(server):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    answer = httpx.post(f"{server.url}/encode_text", json={"texts": ["a"]}, headers=headers, timeout=30)
    assert answer.status_code == 200
    _until(lambda: f"trace={trace_id}" in server.log.read_text(), "the request's access-log line with its trace id")


def test_a_client_that_hangs_up_mid_upload_is_not_a_server_error(server):
    def answered(status_class: str) -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if _is_request_count(line, status_class))

    server_errors, client_errors = answered("5"), answered("4")
    port = int(server.url.rsplit(":", 1)[1])
    body = b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + RED[:30]
    head = b"POST /encode_image HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(head + b"Content-Length: 100000\r\n\r\n" + body)
            time.sleep(0.2)  # the client's pace: part of the body is read before it hangs up
    _until(lambda: answered("4") >= client_errors + 3, "the three hung-up uploads to be counted")
    assert answered("5") == server_errors
    _assert_classifies(server)


def _until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.05)


def _is_request_count(line: str, status_class: str) -> bool:
    return line.startswith("bentoml_service_request_total{") and f'http_response_code="{status_class}' in line


def test_a_second_server_on_the_same_machine_keeps_the_first_ones_metrics(server, hostile, packaged):
    def answered() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if _is_request_count(line, "2") and 'endpoint="/encode_text"' in line
        )

    for _ in range(3):
        assert httpx.post(f"{server.url}/encode_text", json={"texts": ["a"]}, timeout=30).status_code == 200
    counted = answered()
    assert counted >= 3
    with _launch(hostile, packaged["tmp"]) as second:
        assert httpx.post(f"{second.url}/encode_text", json={"texts": ["b"]}, timeout=30).status_code == 200
        assert answered() == counted
    assert answered() == counted
