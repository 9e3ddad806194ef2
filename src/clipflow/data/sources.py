"""Rows from a source, streamed: manifests (CSV, Parquet, JSONL) and existing WebDataset shards.

Nothing here holds a whole source in memory: manifests are read a record or a record batch at
a time and tar shards as streams. A row that is already known to be bad (a JSONL line that is
not JSON, an unsafe tar member) still comes out, carrying its reason, so that input rows always
equal kept plus quarantined rows.
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
from urllib.parse import urlparse

from clipflow.errors import ClipflowError
from clipflow.storage import FetchError, FetchLimits, Store, fetch, s3_client, split_s3

MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARQUET_BATCH = 1024


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


def read_rows(source: str, image_column: str, caption_column: str, limits: FetchLimits) -> Iterator[SourceRow]:
    """Stream the rows of a manifest or of shards.

    Raises:
        ClipflowError: a source that cannot be read as a whole (missing, unknown format,
            no image or caption column, no shards).
    """
    if is_shard_source(source):
        yield from _shard_rows(source, limits)
    else:
        yield from _manifest_rows(source, image_column, caption_column, limits)


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
    """The manifest as a local file: itself, or a temporary download of a remote one."""
    if not urlparse(source).scheme:
        if not Path(source).is_file():
            raise ClipflowError(f"manifest not found: {source}")
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="clipflow-manifest-") as tmp:
        path = Path(tmp) / Path(urlparse(source).path).name
        if source.startswith("s3://"):
            import botocore.exceptions

            try:
                s3_client().download_file(*split_s3(source), str(path))
            except botocore.exceptions.ClientError as exc:
                raise ClipflowError(f"cannot read manifest {source}: {exc}") from None
        else:
            # A remote manifest is not an image: it may be far larger than one.
            manifest_limits = FetchLimits(sys.maxsize, limits.timeout_s, limits.retries)
            try:
                path.write_bytes(fetch(source, manifest_limits))
            except FetchError as exc:
                raise ClipflowError(f"cannot read manifest {source}: {exc}") from None
        yield path


def _csv_records(path: Path) -> Iterator[list[str] | dict | str]:
    """First the column names, then one dict per row (values as text, a missing cell as None)."""
    csv.field_size_limit(1 << 26)
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        yield list(reader.fieldnames or [])
        for record in reader:
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
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = (line for line in handle if line.strip())
        pending: list[dict | str] = []
        columns: list[str] | None = None
        for line in lines:
            record = _json_object(line)
            pending.append(record)
            if isinstance(record, dict):
                columns = list(record)
                break
        yield columns or []
        yield from pending
        for line in lines:
            yield _json_object(line)


def _json_object(line: str) -> dict | str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"line is not valid JSON: {exc.msg}"
    return record if isinstance(record, dict) else f"line is JSON {type(record).__name__}, not an object"


def _shard_paths(source: str) -> list[str]:
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


@contextmanager
def _open_stream(uri: str):
    if uri.startswith("s3://"):
        body = s3_client().get_object(Bucket=split_s3(uri)[0], Key=split_s3(uri)[1])["Body"]
        try:
            yield body
        finally:
            body.close()
    else:
        with open(uri, "rb") as handle:
            yield handle


def _shard_rows(source: str, limits: FetchLimits) -> Iterator[SourceRow]:
    """Samples of WebDataset tars, grouped as webdataset groups them: by name up to the first dot.

    Members are read into memory one sample at a time and never extracted to disk; a member
    with an absolute or `..` name, a link or a device becomes a rejected row of its own.
    """
    shards = _shard_paths(source)
    if not shards:
        raise ClipflowError(f"no .tar shards under {source}")
    counter = iter(range(sys.maxsize))
    for shard in shards:
        with _open_stream(shard) as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    yield from _tar_samples(tar, shard, counter, limits)
            except tarfile.TarError as exc:
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
        if info.size > limits.max_bytes:
            problem = f"member {info.name} is {info.size} bytes, more than data.max_image_bytes={limits.max_bytes}"
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
