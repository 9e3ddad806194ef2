"""Rows from a source, streamed: manifests (CSV, Parquet, JSONL) and existing WebDataset shards.

Nothing here holds a whole source in memory: manifests are read a record or a record batch at
a time and tar shards as streams. A row that is already known to be bad (a JSONL line that is
not JSON, an unsafe tar member) still comes out, carrying its reason, so that input rows always
equal kept plus quarantined rows. A row is also bounded in length (`MAX_RECORD_CHARS`): a longer
one comes out as its reason, as does a shard that is not a regular file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from clipflow.errors import ClipflowError
from clipflow.storage import FetchError, FetchLimits, Store, fetch_file, open_stream

MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAMPLE_MEMBERS = {*IMAGE_EXTS, "txt", "json"}  # what a sample is made of; other members are never read
PARQUET_BATCH = 1024
# Far beyond any caption and its metadata: csv and line reading would otherwise hold a whole line in memory.
MAX_RECORD_CHARS = 1 << 24


@dataclass
class SourceRow:
    """One input row. `image` is a URI to fetch or the bytes themselves (from a shard)."""

    row: int
    key: str
    source: str
    image: str | bytes | None = None
    caption: object = None
    extra: dict = field(default_factory=dict)
    reject: str | None = None


def sample_key(identity: str) -> str:
    """A stable key safe for a tar member name; the hash split hashes it again."""
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def is_shard_source(source: str) -> bool:
    """A `.tar` file, or a folder or prefix with no manifest extension (taken to hold `.tar` shards)."""
    suffix = Path(urlparse(source).path).suffix.lower()
    return suffix == ".tar" or suffix not in MANIFEST_FORMATS


def read_rows(
    source: str,
    image_column: str,
    caption_column: str,
    limits: FetchLimits,
    max_manifest_bytes: int,
) -> Iterator[SourceRow]:
    """Stream the rows of a manifest or of shards.

    Args:
        source: a manifest or shards, local or `s3://` (a manifest also `http(s)://`).
        image_column, caption_column: the manifest's columns of image URIs and captions.
        limits: how an image is read; a remote manifest is read with its deadline and retries too.
        max_manifest_bytes: `data.max_manifest_bytes`, the size at which a remote manifest is refused.

    Raises:
        ClipflowError: a source that cannot be read as a whole (missing, unknown format,
            no image or caption column, no shards, a remote manifest too large or too slow).
    """
    if is_shard_source(source):
        yield from _shard_rows(source, limits)
        return
    manifest_limits = FetchLimits(max_manifest_bytes, limits.timeout_s, limits.retries, "data.max_manifest_bytes")
    yield from _manifest_rows(source, image_column, caption_column, manifest_limits)


def _manifest_rows(source: str, image_column: str, caption_column: str, limits: FetchLimits) -> Iterator[SourceRow]:
    kind = MANIFEST_FORMATS[Path(urlparse(source).path).suffix.lower()]
    with _local_copy(source, limits) as path:
        # A relative image path means "next to the manifest", wherever the manifest lives.
        base = source.rsplit("/", 1)[0] if urlparse(source).scheme else str(Path(source).resolve().parent)
        records = {"csv": _csv_records, "parquet": _parquet_records, "jsonl": _jsonl_records}[kind](path)
        columns = next(records)
        for name, role in ((image_column, "image"), (caption_column, "caption")):
            if name not in columns:
                raise ClipflowError(
                    f"manifest {source} has no {role} column {name!r} (data.{role}_column); its columns: {columns}"
                )
        for row, record in enumerate(records):
            if isinstance(record, str):
                yield SourceRow(row, sample_key(f"{source}#{row}"), f"{source}#{row}", reject=record)
                continue
            image = record.pop(image_column, None)
            caption = record.pop(caption_column, None)
            if not isinstance(image, str) or not image.strip():
                yield SourceRow(row, sample_key(f"{source}#{row}"), f"{source}#{row}", reject="image is missing")
                continue
            image = image.strip()
            if not urlparse(image).scheme and not Path(image).is_absolute():
                image = f"{base}/{image}"
            yield SourceRow(row, sample_key(image), image, image, caption, record)


@contextmanager
def _local_copy(source: str, limits: FetchLimits) -> Iterator[Path]:
    """The manifest as a local file: itself, or a temporary download of a remote one, streamed to disk."""
    if not urlparse(source).scheme:
        if not Path(source).exists():
            raise ClipflowError(f"manifest not found: {source}")
        if not Path(source).is_file():
            raise ClipflowError(f"manifest is not a regular file: {source}")
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="clipflow-manifest-") as tmp:
        try:
            path = fetch_file(source, Path(tmp) / Path(urlparse(source).path).name, limits)
        except FetchError as exc:
            raise ClipflowError(f"cannot read manifest {source}: {exc}") from None
        yield path


class _RecordTooLong(Exception):
    pass


class _BoundedLines:
    """The lines of a text file, one record at a time, cut off once a record passes `MAX_RECORD_CHARS`.

    After a cut the rest of that physical line is skipped: the next record starts on the next line.
    """

    def __init__(self, handle: TextIO):
        self.handle = handle
        self.used = 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline(MAX_RECORD_CHARS - self.used + 1)
        if not line:
            raise StopIteration
        self.used += len(line)
        if self.used > MAX_RECORD_CHARS:
            while line and line[-1] not in "\r\n":
                line = self.handle.readline(MAX_RECORD_CHARS)
            raise _RecordTooLong
        return line

    def records(self, reader: Iterator) -> Iterator:
        """`next(reader)` until it ends, each from a fresh budget; a record past it, or not valid CSV, as its reason."""
        while True:
            self.used = 0
            try:
                record = next(reader)
            except StopIteration:
                return
            except _RecordTooLong:
                record = f"row is longer than {MAX_RECORD_CHARS} characters"
            except csv.Error as exc:
                record = f"row is not valid CSV: {exc}"
            yield record


def _csv_records(path: Path) -> Iterator[list[str] | dict | str]:
    """First the column names, then one dict per row (values as text, a missing cell as None)."""
    csv.field_size_limit(MAX_RECORD_CHARS)  # a record is cut off first; csv's own default is far smaller
    # utf-8-sig: Excel starts its CSV files with a byte-order mark, which would stick to the first name.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        lines = _BoundedLines(handle)
        reader = csv.DictReader(lines)
        try:
            columns = list(reader.fieldnames or [])
        except _RecordTooLong:
            raise ClipflowError(f"manifest header is longer than {MAX_RECORD_CHARS} characters") from None
        yield columns
        for record in lines.records(reader):
            if isinstance(record, str):
                yield record
                continue
            extra = record.pop(None, None)
            if extra:
                yield f"row has {len(extra)} more fields than the header"
                continue
            yield {k: (v if v != "" else None) for k, v in record.items()}


def _parquet_records(path: Path) -> Iterator[list[str] | dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ClipflowError(f"cannot read Parquet manifest {path}: {exc}") from None
    yield list(parquet.schema_arrow.names)
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
        yield from batch.to_pylist()


def _jsonl_records(path: Path) -> Iterator[list[str] | dict | str]:
    """Column names come from the first valid object; later objects may add or omit keys."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        lines = _BoundedLines(handle)
        # map and filter, unlike a generator, go on after the bounded lines raise for a long one.
        records = lines.records(map(_json_object, filter(str.strip, lines)))
        pending: list[dict | str] = []
        columns: list[str] | None = None
        for record in records:
            pending.append(record)
            if isinstance(record, dict):
                columns = list(record)
                break
        yield columns or []
        yield from pending
        yield from records


def _json_object(line: str) -> dict | str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"line is not valid JSON: {exc.msg}"
    return record if isinstance(record, dict) else f"line is JSON {type(record).__name__}, not an object"


def shard_paths(source: str) -> list[str]:
    """The `.tar` shards of a source (a `.tar`, a folder or an `s3://` prefix), in order."""
    if source.startswith("s3://"):
        if source.endswith(".tar"):
            return [source]
        store = Store(source)
        return [store.uri(name) for name in store.list() if name.endswith(".tar")]
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ClipflowError(f"source not found: {source} (a manifest .csv/.parquet/.jsonl, a .tar or a folder of them)")
    return sorted(str(p) for p in path.rglob("*.tar"))


def _shard_rows(source: str, limits: FetchLimits) -> Iterator[SourceRow]:
    """Samples of WebDataset tars, grouped as webdataset groups them: by name up to the first dot.

    Members are read into memory one sample at a time and never extracted to disk; a member
    with an absolute or `..` name, a link or a device becomes a rejected row of its own.
    """
    shards = shard_paths(source)
    if not shards:
        raise ClipflowError(f"no .tar shards under {source}")
    counter = iter(range(sys.maxsize))
    for shard in shards:
        try:
            with open_stream(shard, limits.timeout_s) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                yield from _tar_samples(tar, shard, counter, limits)
        except (tarfile.TarError, FetchError) as exc:
            yield SourceRow(next(counter), sample_key(f"{shard}#error"), shard, reject=f"unreadable tar: {exc}")


def _tar_samples(tar: tarfile.TarFile, shard: str, counter: Iterator[int], limits: FetchLimits) -> Iterator[SourceRow]:
    current: str | None = None
    members: dict[str, bytes] = {}
    problem: str | None = None
    for info in tar:
        reason = _unsafe(info)
        if reason:
            yield SourceRow(next(counter), sample_key(f"{shard}#{info.name}"), f"{shard}#{info.name}", reject=reason)
            continue
        if not info.isfile():
            continue
        directory, _, base = info.name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if key != current:
            if current is not None:
                yield _sample_row(next(counter), shard, current, members, problem)
            current, members, problem = key, {}, None
        if ext.lower() not in SAMPLE_MEMBERS:
            continue
        if info.size > limits.max_bytes:
            problem = f"member {info.name} is {info.size} bytes, more than {limits.name}={limits.max_bytes}"
            continue
        handle = tar.extractfile(info)
        members[ext.lower()] = handle.read() if handle else b""
    if current is not None:
        yield _sample_row(next(counter), shard, current, members, problem)


def _unsafe(info: tarfile.TarInfo) -> str | None:
    name = info.name
    if name.startswith("/") or ".." in name.split("/"):
        return f"unsafe member name {name!r} (absolute or '..' path)"
    if info.issym() or info.islnk():
        return f"member {name!r} is a link, not a file"
    if not (info.isfile() or info.isdir()):
        return f"member {name!r} is not a regular file"
    return None


def _sample_row(row: int, shard: str, key: str, members: dict[str, bytes], problem: str | None) -> SourceRow:
    source = f"{shard}#{key}"
    result = SourceRow(row, sample_key(source), source)
    if problem:
        result.reject = problem
        return result
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image_ext is None:
        result.reject = f"sample has no image member ({'/'.join(IMAGE_EXTS)})"
        return result
    result.image = members[image_ext]
    caption = members.get("txt")
    result.caption = caption.decode("utf-8", errors="replace") if caption is not None else None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            result.reject = "sample's .json is not valid JSON"
            return result
        if isinstance(meta, dict):
            result.extra = {f"orig_{k}": v for k, v in meta.items()}
    return result
