"""Search served from the vector store: a real `milvus-lite server`, a real `bentoml serve`, embeddings on disk.

The artifact holds the packaged model's own embeddings of the gallery images, written in clip-retrieval's
layout; the exact answer of every query is a numpy product over the saved .npy files. The Bento is
packaged with an index that names an unreachable server and served with `CLIPFLOW_INDEX_URI` pointing at
the test's server, as a cluster deployment overrides it. Each test publishes the collection it needs
(publishing again is a no-op), so they pass in any order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import PIL.Image
import pytest

from clipflow import vectors
from clipflow.errors import ClipflowError
from clipflow.index import store
from clipflow.index.artifact import IMAGE_DIR, IndexManifest, Part, write_manifest, write_part
from tests.support.milvus import milvus_lite_server
from tests.support.processes import process_group
from tests.support.servers import free_port
from tests.support.serving_fixtures import MAX_K, SERVING, serve_bento

BUCKETS = ("a", "b", "c")
QUERIES = ["a red circle", "two blue squares", "a small green star"]
K = 5
CLIENTS = 16


def _write_artifact(folder: Path, keys: list[str], captions: list[str], embeddings: np.ndarray, data_version: str):
    """Two parts of the gallery's embeddings, with a `bucket` and a `row` metadata column to filter on."""
    half = len(keys) // 2
    for number, rows in enumerate((slice(0, half), slice(half, len(keys)))):
        row_numbers = np.arange(len(keys))[rows]
        metadata = pd.DataFrame(
            {
                "key": keys[rows],
                "image_path": [f"images/{key}.png" for key in keys[rows]],
                "caption": captions[rows],
                "bucket": [BUCKETS[row % len(BUCKETS)] for row in row_numbers],
                "row": row_numbers,
            }
        )
        write_part(folder, Part(number, embeddings[rows], None, metadata), pd.DataFrame(columns=["row", "key"]))
    manifest = IndexManifest(
        model="models:/clipflow-clip@champion",
        model_version="1",
        data_version=data_version,
        source="gallery",
        dim=embeddings.shape[1],
        input_rows=len(keys),
        rows=len(keys),
        quarantined=0,
        parts=2,
        text=False,
    )
    write_manifest(folder, manifest)


@pytest.fixture(scope="module")
def catalogue(packaged, tmp_path_factory):
    """Two artifacts of the same embeddings, the second under other keys and data version, so a swap shows."""
    import bentoml

    from clipflow.serve import gallery

    tmp = tmp_path_factory.mktemp("catalogue")
    items = gallery.load(Path(bentoml.models.get(packaged["result"].bento_model_tag).path))
    embeddings = items.embeddings.numpy()
    keys, captions = np.array(items.ids), np.array(items.captions)
    first, second = tmp / "first", tmp / "second"
    _write_artifact(first, keys, captions, embeddings, "data-1")
    _write_artifact(second, np.array([f"v2-{key}" for key in keys]), captions, embeddings, "data-2")
    return {"first": first, "second": second}


class RestartableMilvus:
    """The module's `milvus-lite server`, which a test may kill by PID and start again on the same port and folder."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir, self.stack = workdir, stack
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.server = self.stack.enter_context(milvus_lite_server(self.workdir, self.port))

    def kill(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        yield RestartableMilvus(tmp_path_factory.mktemp("milvus"), stack)


@pytest.fixture(scope="module")
def index_params(packaged, milvus):
    # keep_collections=1: the swap test restores the collection it swapped out.
    return dataclasses.replace(packaged["params"].index, uri=milvus.uri, keep_collections=1)


@pytest.fixture(scope="module")
def indexed_server(packaged, index_params, milvus):
    """A Bento packaged with an index at a server that is not there, served with CLIPFLOW_INDEX_URI set."""
    from clipflow.serve.package import package

    params = packaged["params"]
    model_uri = f"models:/{params.promote.model_name}@champion"
    unreachable = dataclasses.replace(index_params, uri="http://127.0.0.1:9")
    result = package(model_uri, params, SERVING, index=unreachable)
    assert result.index == {"uri": "http://127.0.0.1:9", "alias": index_params.alias}
    with serve_bento(result.bento_tag, packaged["tmp"], CLIPFLOW_INDEX_URI=milvus.uri) as url:
        yield url


def _saved(folder: Path) -> tuple[np.ndarray, list[str], pd.DataFrame]:
    """The artifact as clip-retrieval's consumers read it: the .npy files and the parquet files, in order."""
    embeddings = np.concatenate([np.load(p) for p in sorted((folder / IMAGE_DIR).glob("*.npy"))]).astype(np.float32)
    metadata = pd.concat([pd.read_parquet(p) for p in sorted((folder / "metadata").glob("*.parquet"))])
    return embeddings, list(metadata["key"]), metadata.reset_index(drop=True)


def _exact(folder: Path, query: np.ndarray, k: int, offset: int = 0, rows: np.ndarray | None = None):
    embeddings, keys, _ = _saved(folder)
    candidates = np.arange(len(keys)) if rows is None else rows
    scores = embeddings[candidates] @ query
    order = np.argsort(-scores, kind="stable")[offset : offset + k]
    return [keys[candidates[i]] for i in order], scores[order]


def _post(url: str, path: str, **request) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **request)


def _text_vector(url: str, text: str) -> np.ndarray:
    return np.array(_post(url, "/encode_text", json={"texts": [text]}).json()[0], dtype=np.float32)


def _search(url: str, text: str, k: int = K, **extra) -> list[dict]:
    response = _post(url, "/search", json={"text": text, "k": k, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def _assert_same(found: list[dict], keys: list[str], scores: np.ndarray) -> None:
    assert [item["id"] for item in found] == keys
    np.testing.assert_allclose([item["score"] for item in found], scores, atol=1e-3)


def test_search_answers_the_exact_top_k_of_the_saved_embeddings(indexed_server, catalogue, index_params):
    report = store.publish(catalogue["first"], index_params)
    assert report["rows"] == len(_saved(catalogue["first"])[1])
    for text in QUERIES:
        keys, scores = _exact(catalogue["first"], _text_vector(indexed_server, text), K)
        found = _search(indexed_server, text)
        _assert_same(found, keys, scores)
        assert all(item["image_path"] == f"images/{item['id']}.png" and item["caption"] for item in found)
        assert {"bucket", "row"} <= set(found[0]["metadata"])

    image = io.BytesIO()
    PIL.Image.effect_noise((64, 64), 60).convert("RGB").save(image, format="PNG")
    files = {"image": ("noise.png", image.getvalue(), "image/png")}
    vector = np.array(_post(indexed_server, "/encode_image", files={"images": files["image"]}).json()[0])
    found = _post(indexed_server, "/search_image", files=files, data={"k": str(K)}).json()
    _assert_same(found, *_exact(catalogue["first"], vector.astype(np.float32), K))

    info = _post(indexed_server, "/model_info", json={}).json()
    assert (info["index_alias"], info["index_collection"]) == (index_params.alias, report["collection"])


def test_a_filter_restricts_results_to_matching_rows(indexed_server, catalogue, index_params):
    store.publish(catalogue["first"], index_params)
    _, _, metadata = _saved(catalogue["first"])
    query = _text_vector(indexed_server, QUERIES[0])
    for wanted in ({"bucket": "a"}, {"bucket": ["a", "c"]}, {"bucket": "b", "row": [1, 4, 7, 10]}):
        mask = np.ones(len(metadata), dtype=bool)
        for field, values in wanted.items():
            mask &= metadata[field].isin(values if isinstance(values, list) else [values]).to_numpy()
        found = _search(indexed_server, QUERIES[0], filter=wanted)
        assert found and all(item["metadata"]["bucket"] in wanted["bucket"] for item in found)
        _assert_same(found, *_exact(catalogue["first"], query, K, rows=np.flatnonzero(mask)))

    refused = _post(indexed_server, "/search", json={"text": "x", "k": 1, "filter": {"bucket) or (1": "a"}})
    assert refused.status_code == 400 and "not a metadata field name" in refused.json()["error"]
    too_many = {f"f{i}": "x" for i in range(vectors.MAX_FILTER_FIELDS + 1)}
    refused = _post(indexed_server, "/search", json={"text": "x", "k": 1, "filter": too_many})
    assert refused.status_code == 400 and "at most" in refused.json()["error"]
    # A quote in a value is a character to match, not the end of the literal.
    assert _search(indexed_server, "x", filter={"bucket": 'a" or bucket != "'}) == []


def test_a_selective_filter_returns_every_matching_row_in_exact_order(milvus, index_params):
    # Milvus's HNSW search under a filter this selective answers with fewer rows than match
    # (benchmarks/results/bench_filtered_search.json); clipflow ranks such rows itself.
    rows, dim = 3000, 64
    rng = np.random.default_rng(7)
    embeddings = rng.standard_normal((rows, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    client = vectors.open_client(milvus.uri)
    collection = vectors.Collection.create(client, f"selective_{time.time_ns()}", dim, index_params)
    keys = [f"row-{row}" for row in range(rows)]
    collection.insert(keys, embeddings, [{"group": row % 750, "caption": f"item {row}"} for row in range(rows)])
    assert collection.count() == rows
    queries = embeddings[:3] + 0.1 * rng.standard_normal((3, dim), dtype=np.float32)
    members = np.flatnonzero(np.arange(rows) % 750 == 3)  # 4 rows

    for offset in (0, 1):
        found = collection.search(queries, 10, {"group": 3}, offset=offset)
        for query, hits in zip(queries, found, strict=True):
            scores = embeddings[members] @ query
            order = np.argsort(-scores, kind="stable")[offset:]
            assert [hit.key for hit in hits] == [keys[members[i]] for i in order]
            np.testing.assert_allclose([hit.score for hit in hits], scores[order], atol=1e-4)
            assert all(hit.fields["group"] == 3 and hit.fields["caption"].startswith("item ") for hit in hits)
    assert collection.search(queries[:1], 10, {"group": 10_000}) == [[]]

    # Past exact_filter_rows the index answers: still only matching rows, at most k.
    indexed = vectors.Collection(client, collection.name, dataclasses.replace(index_params, exact_filter_rows=2))
    for hits in indexed.search(queries, 3, {"group": [3, 4]}):
        assert len(hits) <= 3 and all(hit.fields["group"] in (3, 4) for hit in hits)


class CountingSearcher(store.Searcher):
    """The real searcher, noting how many queries each of its store calls carried."""

    def __init__(self, params) -> None:
        super().__init__(params)
        self.calls: list[int] = []

    def search_many(self, vectors, k, filter=None, offset=0):
        self.calls.append(len(vectors))
        return super().search_many(vectors, k, filter, offset)


def test_queries_waiting_together_share_store_calls_and_each_gets_its_own_answer(catalogue, index_params):
    import asyncio

    store.publish(catalogue["first"], index_params)
    embeddings, _, _ = _saved(catalogue["first"])
    rng = np.random.default_rng(3)
    queries = embeddings[:40] + 0.05 * rng.standard_normal(embeddings[:40].shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # Three kinds of query, which no store call may mix: a call has one k, one offset and one filter.
    shapes = [(K, 0, None), (3, 2, None), (K, 0, {"bucket": ["b", "c"]})]
    requests = [(query, *shapes[number % len(shapes)]) for number, query in enumerate(queries)]
    expected = [store.Searcher(index_params).search(query, k, f, offset) for query, k, offset, f in requests]

    counting = CountingSearcher(dataclasses.replace(index_params, search_batch_max=8))
    batcher = store.QueryBatcher(counting)

    async def together():
        searches = [batcher.search(query, k, f, offset) for query, k, offset, f in requests]
        bad = batcher.search(queries[0], K, {"bucket) or (1": "a"})
        return await asyncio.gather(*searches, bad, return_exceptions=True)

    *answers, refused = asyncio.run(together())
    assert [[row["id"] for row in rows] for rows in answers] == [[row["id"] for row in rows] for rows in expected]
    for rows, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose([row["score"] for row in rows], [row["score"] for row in want], atol=1e-5)
    assert isinstance(refused, vectors.FilterError)  # its own error; the others were answered
    assert sum(counting.calls) == len(requests)
    assert max(counting.calls) == 8 and len(counting.calls) < len(requests) / 4, counting.calls


def test_concurrent_searches_through_the_endpoint_each_get_their_own_top_k(indexed_server, catalogue, index_params):
    store.publish(catalogue["first"], index_params)
    texts = [
        f"{colour} {shape} number {number}"
        for colour in ("red", "blue")
        for shape in ("circle", "star")
        for number in range(4)
    ]
    expected = {text: _exact(catalogue["first"], _text_vector(indexed_server, text), K)[0] for text in texts}
    answers: dict[str, list[str]] = {}

    def client(text: str) -> None:
        answers[text] = [item["id"] for item in _search(indexed_server, text)]

    threads = [threading.Thread(target=client, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected


def test_offset_pages_through_the_exact_ranking(indexed_server, catalogue, index_params):
    store.publish(catalogue["first"], index_params)
    query = _text_vector(indexed_server, QUERIES[1])
    for offset in (0, 3, MAX_K - K):
        _assert_same(_search(indexed_server, QUERIES[1], offset=offset), *_exact(catalogue["first"], query, K, offset))
    refused = _post(indexed_server, "/search", json={"text": "x", "k": K, "offset": MAX_K - K + 1})
    assert refused.status_code == 400 and f"max_k - k = {MAX_K - K}" in refused.json()["error"]


def test_a_swap_under_load_fails_no_request_and_restore_goes_back(indexed_server, catalogue, index_params):
    first = store.publish(catalogue["first"], index_params)["collection"]
    statuses: list[int] = []
    answers: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{indexed_server}/search", json={"text": QUERIES[2], "k": 1})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    answers.append(response.json()[0]["id"])

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        swapped = store.publish(catalogue["second"], index_params)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert swapped["previous"] == first
    assert statuses and set(statuses) == {200}, {status: statuses.count(status) for status in set(statuses)}
    assert not answers[0].startswith("v2-") and answers[-1].startswith("v2-")
    assert _search(indexed_server, QUERIES[2], k=1)[0]["id"].startswith("v2-")

    restored = store.restore(index_params)
    assert (restored["collection"], restored["replaced"]) == (first, swapped["collection"])
    assert not _search(indexed_server, QUERIES[2], k=1)[0]["id"].startswith("v2-")
    assert _post(indexed_server, "/model_info", json={}).json()["index_collection"] == first


def test_old_collections_beyond_keep_collections_are_dropped(tmp_path, catalogue, index_params):
    params = dataclasses.replace(index_params, uri=str(tmp_path / "lite.db"), keep_collections=0)
    first = store.publish(catalogue["first"], params)
    second = store.publish(catalogue["second"], params)
    assert second["dropped"] == [first["collection"]]
    with pytest.raises(ClipflowError, match="which was dropped"):
        store.restore(params)


def test_a_locked_lite_folder_says_how_to_serve_it(tmp_path, index_params):
    folder = tmp_path / "held.db"
    holder = f"from pymilvus import MilvusClient; MilvusClient({str(folder)!r}); print('open', flush=True); input()"
    with process_group([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        assert process.stdout.readline().strip() == b"open"
        with pytest.raises(ClipflowError) as refused:
            vectors.open_client(str(folder))
    message = str(refused.value)
    assert "\n" not in message and f"milvus-lite server --data-dir {folder} --host 127.0.0.1" in message
    assert "index.uri=http://127.0.0.1:" in message


def test_an_unreachable_store_is_one_line_and_a_503(indexed_server, catalogue, index_params, milvus):
    started = time.monotonic()
    with pytest.raises(vectors.StoreUnavailable, match="cannot reach the Milvus server at http://127.0.0.1:9"):
        vectors.open_client("http://127.0.0.1:9", timeout_s=3)
    assert time.monotonic() - started < 10

    store.publish(catalogue["first"], index_params)
    milvus.kill()
    try:
        refused = _post(indexed_server, "/search", json={"text": QUERIES[0], "k": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"].startswith("the vector store did not answer while searching")
    finally:
        milvus.start()
    # The Bento keeps running while its store is away, and answers from it again once it is back.
    store.publish(catalogue["first"], index_params)
    assert (
        _search(indexed_server, QUERIES[0], k=1)[0]["id"]
        == _exact(catalogue["first"], _text_vector(indexed_server, QUERIES[0]), 1)[0][0]
    )


def test_filters_are_refused_where_no_index_is_packaged(server):
    refused = _post(server, "/search", json={"text": "a red circle", "k": 2, "filter": {"bucket": "a"}})
    assert refused.status_code == 400 and "package it with an index" in refused.json()["error"]
    paged = _post(server, "/search", json={"text": "a red circle", "k": 2, "offset": 2}).json()
    whole = _post(server, "/search", json={"text": "a red circle", "k": 4}).json()
    assert [item["id"] for item in paged] == [item["id"] for item in whole[2:]]
