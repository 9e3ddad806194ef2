"""The vector store's client: Milvus, as a Milvus Lite folder or a server, and one collection of embeddings in it.

    uri = outputs/index/milvus.db      a Milvus Lite folder: one process opens it at a time
    uri = http://127.0.0.1:19530       a server: `milvus-lite server --data-dir ... --host 127.0.0.1`
                                       here, a Milvus cluster in production; every process shares it

A `Collection` holds `key`, `vector`, `caption`, `image_path` and every other metadata column as a
filterable dynamic field. Every failed call becomes one line: `StoreUnavailable` when the server is
gone, `NotPublished` for a collection or alias that does not exist, `FilterError` for a filter outside
the rules, else a `ClipflowError` with what Milvus said.

Filters are mappings of field to value (or list of values), never expression text from a client:
field names must be identifiers, values are literals this module quotes, and the sizes are bounded.

Ground floor for the rooms that search embeddings: `clipflow.index` (catalogues behind an alias) and
`clipflow.data.curate` (near-duplicates at ingest).
"""

from __future__ import annotations

import fcntl
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipflow.errors import ClipflowError
from clipflow.params import MILVUS_SERVER_SCHEMES, IndexParams

CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0  # one search or insert; past it the store counts as down
LITE_SUFFIX = ".db"  # pymilvus opens a path as Milvus Lite only when it ends so
LOCK_FILE = "LOCK"  # Milvus Lite's advisory lock inside its folder
METRIC = "IP"  # embeddings are L2-normalised: inner product is cosine
KEY_FIELD, VECTOR_FIELD = "key", "vector"
TEXT_FIELDS = ("caption", "image_path")
MAX_KEY_CHARS = 512
MAX_TEXT_CHARS = 65_535  # Milvus's longest VARCHAR
MAX_FILTER_FIELDS = 8
MAX_FILTER_VALUES = 100
MAX_FILTER_VALUE_CHARS = 256
FILTER_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Milvus answers this code when it cannot reach the server, 100 for a missing collection and 101 for
# one not loaded.
CONNECT_FAILED = 2
COLLECTION_NOT_FOUND = 100
NOT_LOADED = 101

FilterValue = str | int | float | bool
Filter = Mapping[str, FilterValue | Sequence[FilterValue]]


class StoreUnavailable(ClipflowError):
    """The Milvus server cannot be reached, or did not answer in time."""


class NotPublished(ClipflowError):
    """The alias names no collection yet: nothing was published under it."""


class FilterError(ClipflowError):
    """A search filter outside the rules: unknown-looking field names, odd values, too large."""


@dataclass(frozen=True)
class Hit:
    key: str
    score: float  # cosine similarity to the query
    fields: dict[str, Any]  # caption, image_path and the artifact's other metadata columns


def open_client(uri: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A `pymilvus.MilvusClient` for a Milvus server URL or a Milvus Lite folder (a path ending in .db).

    Raises:
        StoreUnavailable: the server does not answer within `timeout_s`.
        ClipflowError: the folder is open in another process (the message says how to serve it), or the
            uri is neither a URL nor a .db path.
    """
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    # Each failed call makes pymilvus (through its own stderr handler) and Milvus Lite (through Python's
    # last-resort one) print a traceback; this module turns every failure into one line instead.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("milvus_lite").addHandler(logging.NullHandler())
    if uri.startswith(MILVUS_SERVER_SCHEMES):
        try:
            # Dedicated: a shared connection stays broken for every client of the process once the server is gone.
            return MilvusClient(uri=uri, timeout=timeout_s, dedicated=True)
        except Exception as exc:  # grpc's and pymilvus's connection errors share no base class
            raise StoreUnavailable(
                f"cannot reach the Milvus server at {uri} within {timeout_s:g} s ({_reason(exc)}): start it, "
                f"or set index.uri to a Milvus Lite folder (a path ending in {LITE_SUFFIX})"
            ) from None
    folder = Path(uri)
    if folder.suffix != LITE_SUFFIX:
        raise ClipflowError(
            f"index.uri must be a Milvus server URL (http://host:19530) or a Milvus Lite folder ending in "
            f"{LITE_SUFFIX}, got {uri!r}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=str(folder))
    except MilvusException as exc:
        if _locked(folder):
            raise ClipflowError(
                f"the Milvus Lite folder {folder} is open in another process, and only one may open it: to share "
                f"it, serve it once that process ends (`milvus-lite server --data-dir {folder} --host 127.0.0.1 "
                f"--port 19530`) and set index.uri=http://127.0.0.1:19530"
            ) from None
        raise ClipflowError(f"cannot open the Milvus Lite folder {folder}: {_reason(exc)}") from None


def _locked(folder: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on `folder`."""
    if not (folder / LOCK_FILE).is_file():
        return False
    with (folder / LOCK_FILE).open("rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
    return False


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())


def _is_unavailable(exc: BaseException) -> bool:
    import grpc

    return isinstance(exc, grpc.RpcError) or getattr(exc, "code", None) == CONNECT_FAILED


def store_error(exc: Exception, doing: str) -> ClipflowError:
    """One line for a failed store call: StoreUnavailable when the server is gone, else what Milvus said."""
    if _is_unavailable(exc):
        return StoreUnavailable(f"the vector store did not answer while {doing}: {_reason(exc)}")
    return ClipflowError(f"the vector store refused {doing}: {_reason(exc)}")


class Collection:
    """One Milvus collection of catalogue embeddings: `key`, `vector`, `caption`, `image_path`, and dynamic
    fields for every other metadata column, all filterable."""

    def __init__(self, client, name: str, params: IndexParams) -> None:
        """Wrap an existing collection (or alias) `name`; `create` makes a new one."""
        self.client = client
        self.name = name
        self.params = params

    @classmethod
    def create(cls, client, name: str, dim: int, params: IndexParams) -> Collection:
        """Create the collection with a `params.index_type` index (`params.build_params`, inner product) on `vector`."""
        from pymilvus import DataType

        schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field(KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_KEY_CHARS)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        for text_field in TEXT_FIELDS:
            schema.add_field(text_field, DataType.VARCHAR, max_length=MAX_TEXT_CHARS)
        index = client.prepare_index_params()
        index.add_index(VECTOR_FIELD, index_type=params.index_type, metric_type=METRIC, params=params.build_params)
        try:
            client.create_collection(name, schema=schema, index_params=index)
        except Exception as exc:
            raise store_error(exc, f"creating collection {name}") from None
        return cls(client, name, params)

    def insert(self, keys: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows: `keys[i]` names row i of `vectors` (N, D), `fields[i]` holds its caption, image_path and
        other metadata (a missing caption or image_path is stored empty; None and NaN values are left out)."""
        if not len(keys) == len(vectors) == len(fields):
            raise ValueError(f"{len(keys)} keys, {len(vectors)} vectors and {len(fields)} field rows")
        rows = []
        for key, vector, row_fields in zip(keys, np.asarray(vectors, dtype=np.float32), fields, strict=True):
            if not 0 < len(key) <= MAX_KEY_CHARS:
                raise ClipflowError(f"index: key {key[:80]!r} must be 1 to {MAX_KEY_CHARS} characters")
            row = {name: _storable(value) for name, value in row_fields.items() if name != VECTOR_FIELD}
            row = {name: value for name, value in row.items() if value is not None}
            row.update({text_field: str(row.get(text_field, ""))[:MAX_TEXT_CHARS] for text_field in TEXT_FIELDS})
            rows.append({**row, KEY_FIELD: key, VECTOR_FIELD: vector})
        try:
            self.client.insert(self.name, rows, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            raise store_error(exc, f"inserting into {self.name}") from None

    def count(self) -> int:
        """The collection's rows, flushed first."""
        try:
            self.client.flush(self.name, timeout=CALL_TIMEOUT_S)
            found = self.client.query(self.name, filter="", output_fields=["count(*)"], timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            raise store_error(exc, f"counting {self.name}") from None
        return int(found[0]["count(*)"])

    def search(self, vectors: np.ndarray, k: int, filter: Filter | None = None, offset: int = 0) -> list[list[Hit]]:
        """The `k` nearest rows to each query (Q, D), best first, after skipping `offset` better ones.

        A filter matching at most `params.exact_filter_rows` rows is answered exactly, from those rows:
        a graph index searched under a selective filter misses matching rows, and answers with fewer
        than match (benchmarks/bench_filtered_search.py).

        Raises:
            FilterError: the filter breaks a rule of `filter_expression`.
            NotPublished: no collection or alias of that name exists.
            StoreUnavailable: the server did not answer.
        """
        expression = filter_expression(filter)
        queries = np.asarray(vectors, dtype=np.float32)
        if expression and self.params.index_type != "FLAT":
            counting = {"filter": expression, "output_fields": ["count(*)"]}
            matches = int(self._call("counting filtered rows of", self.client.query, **counting)[0]["count(*)"])
            if matches <= self.params.exact_filter_rows:
                return self._exact_search(queries, k, expression, matches, offset)
        search_params = dict(self.params.search_params)
        if self.params.index_type == "HNSW":  # HNSW returns at most ef candidates
            search_params["ef"] = max(search_params.get("ef", 0), k + offset)
        found = self._call(
            "searching",
            self.client.search,
            data=list(queries),
            limit=k,
            offset=offset,
            filter=expression,
            output_fields=[*TEXT_FIELDS, "$meta"],
            search_params={"metric_type": METRIC, "params": search_params},
        )
        return [[_hit(hit) for hit in row] for row in found]

    def _exact_search(self, queries: np.ndarray, k: int, expression: str, matches: int, offset: int) -> list[list[Hit]]:
        """Rank every row matching `expression` (there are `matches`) by inner product with each query."""
        if matches == 0:
            return [[] for _ in queries]
        rows = self._call(
            "reading filtered rows of",
            self.client.query,
            filter=expression,
            output_fields=[VECTOR_FIELD, *TEXT_FIELDS, "$meta"],
            limit=matches,
        )
        keys = [row.pop(KEY_FIELD) for row in rows]
        candidates = np.asarray([row.pop(VECTOR_FIELD) for row in rows], dtype=np.float32)
        scores = queries @ candidates.T
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, offset : offset + k]
        return [
            [Hit(key=keys[index], score=float(query_scores[index]), fields=rows[index]) for index in order]
            for query_scores, order in zip(scores, ranked, strict=True)
        ]

    def _call(self, doing: str, method, **request) -> Any:
        """`method(self.name, **request)`, loading the collection once if Milvus answers it is not loaded
        (after a restart collections come back released)."""
        try:
            try:
                return method(self.name, **request, timeout=CALL_TIMEOUT_S)
            except Exception as exc:
                if getattr(exc, "code", None) != NOT_LOADED:
                    raise
                self.client.load_collection(self.name, timeout=CALL_TIMEOUT_S)
                return method(self.name, **request, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if getattr(exc, "code", None) == COLLECTION_NOT_FOUND:
                raise NotPublished(f"no collection is published under {self.name}: run `clipflow index`") from None
            raise store_error(exc, f"{doing} {self.name}") from None


def _hit(hit: Mapping[str, Any]) -> Hit:
    entity = dict(hit["entity"])
    entity.pop(KEY_FIELD, None)
    return Hit(key=hit[KEY_FIELD], score=float(hit["distance"]), fields=entity)


def _storable(value: Any) -> Any:
    """A metadata value as Milvus's JSON holds it: numpy scalars as Python ones, NaN as absent, others as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value if isinstance(value, str | bool | int | float) else str(value)


def filter_expression(filter: Filter | None) -> str:
    """A Milvus boolean expression for a field -> value (`==`) or field -> list of values (`in`) mapping.

    At most MAX_FILTER_FIELDS fields, each an identifier (not `vector`); at most MAX_FILTER_VALUES values
    per field, each a string (at most MAX_FILTER_VALUE_CHARS, no control characters), a finite number or
    a bool. Returns "" for no filter.

    Raises:
        FilterError: a rule above is broken.
    """
    if not filter:
        return ""
    if len(filter) > MAX_FILTER_FIELDS:
        raise FilterError(f"filter: {len(filter)} fields, at most {MAX_FILTER_FIELDS}")
    terms = []
    for name, wanted in filter.items():
        if not isinstance(name, str) or not FILTER_FIELD.fullmatch(name) or name == VECTOR_FIELD:
            raise FilterError(f"filter: field {str(name)[:80]!r} is not a metadata field name (letters, digits, _)")
        if isinstance(wanted, list | tuple):
            if not 0 < len(wanted) <= MAX_FILTER_VALUES:
                raise FilterError(f"filter: {name} needs 1 to {MAX_FILTER_VALUES} values, got {len(wanted)}")
            terms.append(f"{name} in [{', '.join(_literal(name, value) for value in wanted)}]")
        else:
            terms.append(f"{name} == {_literal(name, wanted)}")
    return " and ".join(terms)


def _literal(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        if len(value) > MAX_FILTER_VALUE_CHARS:
            raise FilterError(f"filter: a value of {name} is {len(value)} characters, at most {MAX_FILTER_VALUE_CHARS}")
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise FilterError(f"filter: a value of {name} holds a control character")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise FilterError(f"filter: {name} takes strings, finite numbers or booleans, got {str(value)[:80]!r}")
