"""The vector store: Milvus, as a Milvus Lite folder or a server, one collection per (model, data) behind an alias.

    index.uri = outputs/index/milvus.db      a Milvus Lite folder: one process opens it at a time
    index.uri = http://127.0.0.1:19530       a server: `milvus-lite server --data-dir ... --host 127.0.0.1`
                                             here, a Milvus cluster in production; every process shares it

`publish` loads an embedding artifact (`clipflow.index.artifact`) into a collection named after the
artifact's model and data versions, checks its row count against the artifact's, and points
`index.alias` at it in one `alter_alias` call, so a searcher of the alias sees the old collection or
the new one, never a half-filled one, and needs no restart. `restore` points it back.

The swap history lives in the store itself: a published collection keeps the name of the one it
replaced in its `clipflow.previous` property. A JSON file beside the data would not exist for a
server URL, while a property is as durable as the collection, is seen by every process that shares
the server, and disappears with the collection it describes.

`Searcher` reads the alias from threads; `QueryBatcher` from an event loop, one store call at a time
with every query that arrived meanwhile (the served `search` endpoints use it).

The client, the collection and the filters are `clipflow.vectors`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipflow.errors import ClipflowError
from clipflow.index.artifact import IndexManifest, read_manifest, read_parts
from clipflow.params import IndexParams
from clipflow.progress import progress
from clipflow.vectors import (
    CALL_TIMEOUT_S,
    KEY_FIELD,
    Collection,
    Filter,
    StoreUnavailable,
    filter_expression,
    open_client,
    store_error,
)

PREVIOUS_PROPERTY = "clipflow.previous"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")


def collection_name(manifest: IndexManifest) -> str:
    """The collection of an artifact: one per (model version, data version), a valid Milvus name.

    Readable versions, then a digest of both in full, so versions that differ only in characters Milvus
    refuses, or past the length kept, still get their own collections.
    """
    pair = f"{manifest.model_version}\0{manifest.data_version}"
    digest = hashlib.sha256(pair.encode()).hexdigest()[:12]
    readable = _UNSAFE_NAME_CHARS.sub("_", f"{manifest.model_version}_{manifest.data_version}").strip("_")[:120]
    return f"clipflow_{readable}_{digest}"


def publish(artifact_folder: str | Path, params: IndexParams) -> dict[str, Any]:
    """Load an embedding artifact into its collection and swap it in under `params.alias`.

    A collection of the same name that already holds every row is reused (publishing twice is a no-op
    past the swap); one that holds fewer, left by an interrupted publish, is refilled. The alias moves
    only once the row count matches the artifact's; then collections more than `params.keep_collections`
    swaps back are dropped (never the live one).

    Args:
        artifact_folder: the artifact: a local folder, or an `s3://` prefix, read one part at a time.
        params: the store, its alias and index.

    Returns:
        collection, alias, rows, previous (the collection the alias named before, or None), dropped,
        index_type, seconds.

    Raises:
        ClipflowError: the artifact is unfinished, the store refuses a step, or the counts disagree.
        StoreUnavailable: the server cannot be reached.
    """
    start = time.perf_counter()
    manifest = read_manifest(artifact_folder)
    name = collection_name(manifest)
    with _client(params.uri, f"publishing {name} under {params.alias}") as client:
        live = _alias_target(client, params.alias)
        collection = _filled(client, name, manifest, str(artifact_folder), params, live)
        client.load_collection(name, timeout=CALL_TIMEOUT_S)
        if live == name:
            previous = _previous(client, name)
        else:
            previous = live
            if live is not None:
                client.alter_collection_properties(name, {PREVIOUS_PROPERTY: live}, timeout=CALL_TIMEOUT_S)
                client.alter_alias(name, params.alias, timeout=CALL_TIMEOUT_S)
            else:
                client.create_alias(name, params.alias, timeout=CALL_TIMEOUT_S)
        dropped = _drop_beyond(client, name, params.keep_collections)
    return {
        "collection": collection.name,
        "alias": params.alias,
        "rows": manifest.rows,
        "previous": previous,
        "dropped": dropped,
        "index_type": params.index_type,
        "seconds": round(time.perf_counter() - start, 3),
    }


@contextlib.contextmanager
def _client(uri: str, doing: str) -> Iterator[Any]:
    """A client of the store for one operation `doing`: any failure of it as one line, the client closed after."""
    client = open_client(uri)
    try:
        yield client
    except ClipflowError:
        raise
    except Exception as exc:
        raise store_error(exc, doing) from None
    finally:
        client.close()


def _filled(
    client, name: str, manifest: IndexManifest, artifact: str, params: IndexParams, live: str | None
) -> Collection:
    """The collection `name` holding every row of the artifact at `artifact` (a folder or an `s3://` prefix,
    read one part at a time), created and filled unless it already does."""
    if client.has_collection(name, timeout=CALL_TIMEOUT_S):
        existing = Collection(client, name, params)
        rows = existing.count()
        if rows == manifest.rows:
            return existing
        if name == live:
            raise ClipflowError(
                f"the live collection {name} holds {rows} rows, its artifact {manifest.rows}: publish another"
            )
        client.drop_collection(name, timeout=CALL_TIMEOUT_S)
    collection = Collection.create(client, name, manifest.dim, params)
    for part in progress(read_parts(artifact), total=manifest.parts, desc=f"publish {name}"):
        records = part.metadata.to_dict("records")
        for first in range(0, len(records), params.insert_batch):
            batch = records[first : first + params.insert_batch]
            keys = [str(record[KEY_FIELD]) for record in batch]
            collection.insert(keys, part.image_embeddings[first : first + len(batch)], batch)
    rows = collection.count()
    if rows != manifest.rows:
        raise ClipflowError(
            f"collection {name} holds {rows} rows but {artifact} has {manifest.rows} (duplicate keys?): not swapped in"
        )
    return collection


def _alias_target(client, alias: str) -> str | None:
    if alias not in client.list_aliases(timeout=CALL_TIMEOUT_S)["aliases"]:
        return None
    return client.describe_alias(alias, timeout=CALL_TIMEOUT_S)["collection_name"]


def _previous(client, name: str) -> str | None:
    properties = client.describe_collection(name, timeout=CALL_TIMEOUT_S).get("properties", {})
    return properties.get(PREVIOUS_PROPERTY) or None


def _drop_beyond(client, live: str, keep: int) -> list[str]:
    """Drop the collections more than `keep` swaps behind `live` in its history; returns their names."""
    history, seen = [], {live}
    previous = _previous(client, live)
    while previous and previous not in seen and client.has_collection(previous, timeout=CALL_TIMEOUT_S):
        history.append(previous)
        seen.add(previous)
        previous = _previous(client, previous)
    for name in history[keep:]:
        client.drop_collection(name, timeout=CALL_TIMEOUT_S)
    return history[keep:]


def restore(params: IndexParams) -> dict[str, Any]:
    """Point `params.alias` back at the collection it named before the last swap.

    The collection swapped out is kept, so publishing its artifact again swaps it back without re-inserting.

    Returns:
        alias, collection (now live), replaced (the one it named).

    Raises:
        ClipflowError: the alias names no collection, or its previous one is unrecorded or dropped.
    """
    with _client(params.uri, f"restoring {params.alias}") as client:
        live = _alias_target(client, params.alias)
        if live is None:
            raise ClipflowError(f"nothing to restore: alias {params.alias} names no collection in {params.uri}")
        previous = _previous(client, live)
        if previous is None or not client.has_collection(previous, timeout=CALL_TIMEOUT_S):
            raise ClipflowError(
                f"nothing to restore: {live} (under {params.alias}) replaced "
                f"{'no collection' if previous is None else f'{previous}, which was dropped'} (index.keep_collections)"
            )
        client.load_collection(previous, timeout=CALL_TIMEOUT_S)
        client.alter_alias(previous, params.alias, timeout=CALL_TIMEOUT_S)
    return {"alias": params.alias, "collection": previous, "replaced": live}


class Searcher:
    """Searches whatever `params.alias` names at the time of each query, so a swap is seen at once.

    Connects on first use, and again after the store was unreachable; safe to share between threads.
    """

    def __init__(self, params: IndexParams) -> None:
        self.params = params
        self._collection: Collection | None = None
        self._lock = threading.Lock()

    def search(self, vector: np.ndarray, k: int, filter: Filter | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The `k` rows nearest a normalised query (D,), after `offset`: `search_many` of one query."""
        return self.search_many(vector[None, :], k, filter, offset)[0]

    def search_many(
        self, vectors: np.ndarray, k: int, filter: Filter | None = None, offset: int = 0
    ) -> list[list[dict[str, Any]]]:
        """For each normalised query (Q, D), in one store call, the `k` nearest rows after `offset`: dicts of id,
        caption, score, image_path and the row's other metadata fields.

        Raises:
            FilterError: a bad filter.
            StoreUnavailable: the store cannot be reached.
            ClipflowError: the alias names no collection.
        """
        try:
            found = self._alias().search(vectors, k, filter, offset)
        except StoreUnavailable:
            self._disconnect()
            raise
        return [[{**hit.fields, "id": hit.key, "score": hit.score} for hit in hits] for hits in found]

    def describe(self) -> dict[str, str | None]:
        """The alias searched and the collection it names now (None before the first publish)."""
        collection = self._alias()
        try:
            return {"alias": self.params.alias, "collection": _alias_target(collection.client, self.params.alias)}
        except Exception as exc:
            self._disconnect()
            raise store_error(exc, f"describing alias {self.params.alias}") from None

    def _disconnect(self) -> None:
        """Drop the connection to a store that stopped answering: the next query connects afresh."""
        with self._lock:
            collection, self._collection = self._collection, None
        if collection is not None:
            with contextlib.suppress(Exception):  # closing a dead channel may fail too
                collection.client.close()

    def _alias(self) -> Collection:
        with self._lock:
            if self._collection is None:
                self._collection = Collection(open_client(self.params.uri), self.params.alias, self.params)
            return self._collection


class QueryBatcher:
    """A `Searcher` for an event loop: one store call at a time, carrying every query that came meanwhile.

    A store call costs a fixed part besides its queries (Milvus Lite 3 builds each segment's row
    mask in a Python loop over all its rows, about a second at a million rows on two cores, once per
    call however many queries it carries: benchmarks/README.md, bench_index), so one query per call
    caps a server at the rate of that fixed part. Queries
    that arrive while a call is out wait for it and then go together, up to `params.search_batch_max`,
    grouped by (k, offset, filter), since a call has one of each. A lone query goes at once.
    """

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        # (k, offset, filter expression) -> the queries waiting with those: vector, filter, answer
        self._waiting: dict[tuple[int, int, str], list[tuple[np.ndarray, Filter | None, asyncio.Future]]] = {}
        self._caller: asyncio.Task | None = None

    @property
    def params(self) -> IndexParams:
        return self.searcher.params

    async def search(
        self, vector: np.ndarray, k: int, filter: Filter | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """`Searcher.search`, awaited: the same rows, the same errors."""
        expression = filter_expression(filter)  # a bad filter fails its own query, not the call it would join
        answer = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((k, offset, expression), []).append((vector, filter, answer))
        if self._caller is None:
            self._caller = asyncio.create_task(self._call_until_empty())
        return await answer

    async def _call_until_empty(self) -> None:
        try:
            while self._waiting:
                key, queued = next(iter(self._waiting.items()))
                batch, rest = queued[: self.params.search_batch_max], queued[self.params.search_batch_max :]
                del self._waiting[key]
                if rest:  # behind the other groups: one busy group does not starve them
                    self._waiting[key] = rest
                k, offset, _ = key
                await self._answer(batch, k, offset)
        finally:
            self._caller = None

    async def _answer(self, batch: list[tuple[np.ndarray, Filter | None, asyncio.Future]], k: int, offset: int) -> None:
        """One store call for `batch`, whose filters all have the same expression."""
        vectors = np.stack([vector for vector, _, _ in batch])
        filter = batch[0][1]
        try:
            found = await asyncio.to_thread(self.searcher.search_many, vectors, k, filter, offset)
        except Exception as exc:  # every query of the call gets the store's error
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, _, answer), rows in zip(batch, found, strict=True):
            if not answer.done():  # its client may have gone
                answer.set_result(rows)
