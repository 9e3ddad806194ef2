"""A bounded load test: 16 concurrent clients, each through the whole endpoint mix twice, against the served Bento.

Every request's status is counted and checked against what that request should get (200, or 400
for the deliberately bad ones); the run must end with no 5xx, no timeout and no other surprise.
The load is a number of requests, not a duration, so a slow machine runs the same test; the
counts and the wall time go to `test-artifacts/load.json`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter

import httpx
from PIL import Image

from tests.support import REPO
from tests.support.serving_fixtures import serve_bento

CLIENTS = 16
ROUNDS = 2  # passes of each client through MIX


def _png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = _png("red"), _png("blue")
IMAGES = [("images", ("red.png", RED, "image/png")), ("images", ("blue.png", BLUE, "image/png"))]
CANDIDATES = [("candidates", file) for _, file in IMAGES]
# (name, expected status, keyword arguments of httpx.Client.post after the endpoint)
MIX = [
    ("encode_text", 200, "encode_text", {"json": {"texts": ["a red circle", "two blue squares"]}}),
    ("encode_image", 200, "encode_image", {"files": IMAGES}),
    ("encode_image_base64", 200, "encode_image_base64", {"json": {"images": [base64.b64encode(RED).decode()]}}),
    ("classify", 200, "classify", {"files": {"image": ("r.png", RED)}, "data": {"labels": '["red", "blue"]'}}),
    ("search", 200, "search", {"json": {"text": "a green star", "k": 5}}),
    ("search_image", 200, "search_image", {"files": {"image": ("b.png", BLUE)}, "data": {"k": "3"}}),
    ("rank", 200, "rank", {"files": CANDIDATES, "data": {"queries": '["a red circle"]'}}),
    ("bad-image", 400, "encode_image", {"files": [("images", ("x.png", RED[:50], "image/png"))]}),
    ("bad-k", 400, "search", {"json": {"text": "a", "k": 0}}),
    ("file-as-text", 400, "rank", {"files": CANDIDATES + [("queries", ("q.png", RED, "image/png"))]}),
]


def _client(url: str, worker: int, counts: Counter, lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for n in range(worker, worker + ROUNDS * len(MIX)):  # clients start at different points of the mix
            name, expected, endpoint, kwargs = MIX[n % len(MIX)]
            try:
                status = client.post(f"/{endpoint}", **kwargs).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                counts[(name, expected, status)] += 1


def test_sixteen_concurrent_clients_get_no_5xx(packaged):
    with serve_bento(packaged["result"].bento_tag, packaged["tmp"]) as url:
        counts: Counter = Counter()
        lock = threading.Lock()
        started = time.monotonic()
        threads = [threading.Thread(target=_client, args=(url, i, counts, lock), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        seconds = time.monotonic() - started
        assert not any(thread.is_alive() for thread in threads)
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200

    done = sum(counts.values())
    by_status = Counter()
    for (_, _, status), n in counts.items():
        by_status[str(status)] += n
    report = {
        "clients": CLIENTS,
        "seconds": round(seconds, 1),
        "requests": done,
        "by_status": dict(by_status),
        "by_endpoint": {f"{name} -> {status}": n for (name, _, status), n in sorted(counts.items(), key=str)},
    }
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts/load.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))

    server_errors = {key: n for key, n in counts.items() if not isinstance(key[2], int) or key[2] >= 500}
    assert server_errors == {}
    unexpected = {key: n for key, n in counts.items() if key[1] != key[2]}
    assert unexpected == {}
    per_endpoint: Counter = Counter()
    for (name, _, _), n in counts.items():
        per_endpoint[name] += n
    assert per_endpoint == {name: CLIENTS * ROUNDS for name, *_ in MIX}  # every request answered, none lost
