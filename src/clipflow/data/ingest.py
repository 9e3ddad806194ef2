"""The ingest step: turn a source into WebDataset shards per split plus a metadata table.

Output layout (a data directory, local or `s3://bucket/prefix`):

    {split}/{split}-000000.tar ...   the shards
    {split}/sizes.json               shard name -> samples
    metadata.parquet                 one row per kept sample: key, split, shard, caption, sha256, ...
    quarantine.parquet               one row per rejected input row: row, key, source, reason
    ingest.json                      counts per split, input/kept/quarantined rows, the data version

Sources other than `builtin` (manifests and shards, see `clipflow.data.sources`) stream through
in chunks of `data.shard_size` input rows. Workers fetch, check, decode and resize a chunk's
images; the main process drops duplicates, assigns each row a split by a hash of its key and
writes one shard per split and chunk. A chunk commits its shards first and its record in
`.ingest/` last, so a re-run after a crash skips every committed chunk and redoes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from clipflow.artifacts import (
    INGEST_REPORT,
    METADATA_FILE,
    QUARANTINE_FILE,
    SIZES_FILE,
    data_version,
    git_revision,
    sha256_file,
    version_of,
)
from clipflow.data import builtin
from clipflow.data.shards import ShardRecord, ShardWriter, add_record
from clipflow.data.sources import SourceRow, read_rows
from clipflow.errors import ClipflowError
from clipflow.params import DataParams, ValidateParams
from clipflow.progress import progress
from clipflow.storage import FetchError, FetchLimits, Store, fetch
from clipflow.validate.rows import CheckedImage, Rejected, check_caption, check_image, reason_counts

STAGING = ".ingest"
SOURCE_SCHEMES = {"", "s3", "http", "https"}


def ingest(source: str, output: str | Path, params: DataParams, checks: ValidateParams | None = None) -> dict[str, Any]:
    """Run the ingest step and return its summary (also written to `ingest.json`).

    Args:
        source: `builtin` for the generated dataset; a manifest (`.csv`, `.parquet`, `.jsonl`;
            local, `s3://` or `http(s)://`); or WebDataset shards (a `.tar`, a folder or an
            `s3://` prefix of them).
        output: the data directory to (re)create: a local folder or `s3://bucket/prefix`.
            An unfinished run of the same source and params into it is resumed.
        params: the `data` section of params.yaml.
        checks: the `validate` section, whose per-row checks every non-builtin row must pass.

    Raises:
        ClipflowError: an unsupported or unreadable source (a missing column, no shards),
            or invalid data parameters. Bad rows never raise: they are quarantined.
    """
    if source != "builtin":
        scheme = urlparse(source).scheme.lower()
        if scheme not in SOURCE_SCHEMES and len(scheme) != 1:  # a drive letter is a path
            raise ClipflowError(f"unsupported source {source!r}: use builtin, a local path, s3:// or http(s)://")
        if checks is None:
            raise ClipflowError(f"ingesting {source!r} needs the validate params for its per-row checks")
        return _ingest_source(source, str(output), params, checks)
    if str(output).startswith("s3://"):
        raise ClipflowError("the builtin source writes a local folder; copy it to S3 with `dvc push`")
    _check_builtin_params(params)
    started = time.perf_counter()
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)

    rows: list[dict[str, Any]] = []
    for split in builtin.SPLITS:
        total = builtin.split_size(params, split)
        with ShardWriter(output / split, split, params.shard_size) as writer:
            for sample in progress(builtin.generate(params, split), total=total, desc=f"ingest {split}"):
                rows.append(_write_sample(writer, sample))

    metadata = pd.DataFrame(rows)
    metadata.to_parquet(output / METADATA_FILE, index=False)
    summary = {
        "source": source,
        "output": str(output.resolve()),
        "counts": metadata["split"].value_counts().sort_index().to_dict(),
        "rows": len(metadata),
        "data_version": data_version(output),
        "git_revision": git_revision(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output / INGEST_REPORT).write_text(json.dumps(summary, indent=2))
    return summary


def _write_sample(writer: ShardWriter, sample: builtin.Sample) -> dict[str, Any]:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    image = buffer.getvalue()
    meta = {
        "sha256": hashlib.sha256(image).hexdigest(),
        "width": sample.image.width,
        "height": sample.image.height,
        "source": f"builtin:{sample.key}",
        **sample.facts,
    }
    shard = writer.write(ShardRecord(sample.key, image, "png", sample.caption, meta))
    row = {"key": sample.key, "split": sample.split, "shard": f"{sample.split}/{shard}", "caption": sample.caption}
    # Parquet needs one type per column: candidate lists travel as JSON text.
    return {**row, **{k: json.dumps(v) if isinstance(v, list) else v for k, v in meta.items()}}


def _check_builtin_params(params: DataParams) -> None:
    unknown_colors = sorted(set(params.colors) - set(builtin.RGB))
    if unknown_colors:
        raise ClipflowError(f"data.colors has colours the renderer lacks: {unknown_colors}")
    unknown_shapes = sorted(set(params.shapes) - set(builtin.SHAPES))
    if unknown_shapes:
        raise ClipflowError(f"data.shapes has shapes the renderer lacks: {unknown_shapes}")
    if not builtin.compositions(params, "train"):
        raise ClipflowError("data.heldout leaves no composition for training")
    unknown_textures = sorted(set(params.backgrounds) - set(builtin.TEXTURES))
    if unknown_textures or not params.backgrounds:
        raise ClipflowError(
            f"data.backgrounds must name textures of {list(builtin.TEXTURES)}, got {params.backgrounds}"
        )


@dataclass(frozen=True)
class _Checked:
    """A row that passed every check, as a worker hands it back."""

    caption: str
    image: CheckedImage
    source_sha256: str


_WORKER: dict[str, Any] = {}


def _configure_worker(checks: ValidateParams, limits: FetchLimits, short_side: int) -> None:
    _WORKER.update(checks=checks, limits=limits, short_side=short_side)


def _check_row(row: SourceRow) -> _Checked | str:
    """Fetch and check one row: the checked image, or the reason it is quarantined."""
    if row.reject:
        return row.reject
    try:
        caption = check_caption(row.caption, _WORKER["checks"])
        payload = row.image if isinstance(row.image, bytes) else fetch(row.image, _WORKER["limits"])
        image = check_image(payload, _WORKER["checks"], _WORKER["short_side"])
    except (Rejected, FetchError) as exc:
        return str(exc)
    return _Checked(caption, image, hashlib.sha256(payload).hexdigest())


def _ingest_source(source: str, output: str, params: DataParams, checks: ValidateParams) -> dict[str, Any]:
    started = time.perf_counter()
    fractions = params.split_fractions
    limits = FetchLimits(params.max_image_bytes, params.http_timeout_s, params.http_retries)
    rows = read_rows(source, params.image_column, params.caption_column, limits)
    # The first row comes before the output is touched: a missing source or column must not
    # cost the user the data already in the output folder.
    rows = chain(list(islice(rows, 1)), rows)
    store = Store(output)
    _start_or_resume(store, _fingerprint(source, params, checks))

    # Raw digests, not hex text: this map is the one thing that grows with the input (~100 bytes a row).
    seen: dict[bytes, int] = {}
    chunks = 0
    with store.scratch(f"{STAGING}/tmp") as scratch, _pool(params, checks, limits) as check:
        for index, chunk in enumerate(progress(_batched(rows, params.shard_size), desc="ingest chunks")):
            chunks = index + 1
            record_name = f"{STAGING}/chunk-{index:06d}.json"
            if store.exists(record_name):
                digests = json.loads(store.get_bytes(record_name))["digests"]
                seen.update((bytes.fromhex(digest), row) for digest, row in digests.items())
                continue
            _ingest_chunk(store, scratch, index, chunk, check(chunk), seen, fractions)
        summary = _finish(store, scratch, source, chunks)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    store.put_bytes(json.dumps(summary, indent=2).encode(), INGEST_REPORT)
    store.delete(STAGING)
    return summary


def _split_of(key: str, fractions: dict[str, float]) -> str:
    """The split of a key: the same key always lands in the same split, whatever else is ingested."""
    point = int(hashlib.sha256(f"split/{key}".encode()).hexdigest()[:15], 16) / 16**15
    edge = 0.0
    for split, fraction in fractions.items():
        edge += fraction
        if point < edge:
            return split
    return next(reversed(fractions))


def _fingerprint(source: str, params: DataParams, checks: ValidateParams) -> str:
    """What a resumed run must share with the crashed one: the source's content and every knob."""
    identity = sha256_file(Path(source)) if Path(source).is_file() else source
    # The worker count changes how fast, not what: a resume may use more or fewer.
    data = {k: v for k, v in vars(params).items() if k != "workers"}
    knobs = json.dumps([identity, data, vars(checks)], sort_keys=True, default=str)
    return hashlib.sha256(knobs.encode()).hexdigest()


def _start_or_resume(store: Store, fingerprint: str) -> None:
    state = f"{STAGING}/state.json"
    if store.exists(state) and json.loads(store.get_bytes(state))["fingerprint"] == fingerprint:
        return
    if store.is_s3:
        store.delete("")
    else:
        shutil.rmtree(store.root)
        Path(store.root).mkdir(parents=True)
    store.put_bytes(json.dumps({"fingerprint": fingerprint}).encode(), state)


def _batched(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


class _pool:
    """`check(chunk)` over a process pool of `data.workers` (0 or 1: in this process), in row order."""

    def __init__(self, params: DataParams, checks: ValidateParams, limits: FetchLimits):
        self.args = (checks, limits, params.image_size)
        self.workers = params.workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing

            # fork, before any manifest is read: no pyarrow threads to inherit yet, and unlike spawn
            # it works whatever the main module is; boto3 clients are made per process anyway.
            context = multiprocessing.get_context("fork")
            self.pool = context.Pool(self.workers, initializer=_configure_worker, initargs=self.args)
        else:
            _configure_worker(*self.args)
        return self.check

    def check(self, chunk: list[SourceRow]) -> Iterator[_Checked | str]:
        if self.pool is None:
            return map(_check_row, chunk)
        return self.pool.imap(_check_row, chunk, chunksize=8)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _ingest_chunk(
    store: Store,
    scratch: Path,
    index: int,
    chunk: list[SourceRow],
    outcomes: Iterator[_Checked | str],
    seen: dict[bytes, int],
    fractions: dict[str, float],
) -> None:
    """Write one chunk: its shards (one per split), then its metadata part, then its record."""
    tars: dict[str, tarfile.TarFile] = {}
    sizes: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    digests: dict[str, int] = {}
    with contextlib.ExitStack() as open_tars:
        for row, outcome in zip(chunk, outcomes, strict=True):
            if isinstance(outcome, _Checked):
                first = seen.get(bytes.fromhex(outcome.source_sha256))
                if first is not None:
                    outcome = f"duplicate image: same bytes as input row {first}"
            if isinstance(outcome, str):
                quarantined.append({"row": row.row, "key": row.key, "source": row.source, "reason": outcome})
                continue
            seen[bytes.fromhex(outcome.source_sha256)] = digests[outcome.source_sha256] = row.row
            split = _split_of(row.key, fractions)
            shard = f"{split}/{split}-{index:06d}.tar"
            if split not in tars:
                tars[split] = open_tars.enter_context(tarfile.open(scratch / f".{split}-{index:06d}.tar.tmp", "w"))
                sizes[shard] = 0
            sizes[shard] += 1
            image = outcome.image
            meta = {
                "sha256": hashlib.sha256(image.jpeg).hexdigest(),
                "width": image.width,
                "height": image.height,
                "source": row.source,
                "source_row": row.row,
                "source_sha256": outcome.source_sha256,
                "source_format": image.source_format,
                "source_mode": image.source_mode,
                "source_width": image.source_width,
                "source_height": image.source_height,
            }
            extra = {
                (k if k not in meta and k not in {"key", "split", "shard", "caption"} else f"manifest_{k}"): v
                for k, v in row.extra.items()
            }
            add_record(
                tars[split], ShardRecord(row.key, image.jpeg, "jpg", outcome.caption, {**meta, **_jsonable(extra)})
            )
            text_extra = {
                k: v if isinstance(v, str) or v is None else json.dumps(v, default=str) for k, v in extra.items()
            }
            kept.append(
                {"key": row.key, "split": split, "shard": shard, "caption": outcome.caption, **meta, **text_extra}
            )

    hashes = {}
    for split in tars:
        local = scratch / f".{split}-{index:06d}.tar.tmp"
        name = f"{split}/{split}-{index:06d}.tar"
        hashes[name] = sha256_file(local)
        store.put_file(local, name)
    if kept:
        part = scratch / f".chunk-{index:06d}.parquet"
        pd.DataFrame(kept).to_parquet(part, index=False)
        store.put_file(part, f"{STAGING}/chunk-{index:06d}.parquet")
    record = {"sizes": sizes, "hashes": hashes, "quarantine": quarantined, "digests": digests, "kept": len(kept)}
    store.put_bytes(json.dumps(record).encode(), f"{STAGING}/chunk-{index:06d}.json")


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Manifest values as JSON can hold them (Parquet gives dates, decimals and bytes)."""
    return json.loads(json.dumps(values, default=str))


def _finish(store: Store, scratch: Path, source: str, chunks: int) -> dict[str, Any]:
    """Gather the chunk records into sizes.json, metadata.parquet and quarantine.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for i in range(chunks):
        record = json.loads(store.get_bytes(f"{STAGING}/chunk-{i:06d}.json"))
        del record["digests"]  # only a resumed run needs them
        records.append(record)
    hashes: dict[str, str] = {}
    sizes: dict[str, dict[str, int]] = {}
    for record in records:
        hashes.update(record["hashes"])
        for shard, count in record["sizes"].items():
            split, _, name = shard.partition("/")
            sizes.setdefault(split, {})[name] = count
    for split, split_sizes in sizes.items():
        payload = json.dumps(split_sizes, indent=1, sort_keys=True).encode()
        hashes[f"{split}/{SIZES_FILE}"] = hashlib.sha256(payload).hexdigest()
        store.put_bytes(payload, f"{split}/{SIZES_FILE}")

    # Parts are read one at a time: twice, first for a schema that fits them all.
    parts = [f"{STAGING}/chunk-{i:06d}.parquet" for i, record in enumerate(records) if record["kept"]]
    schemas = [pq.read_schema(pa.BufferReader(store.get_bytes(part))) for part in parts]
    # With every row quarantined there is no part; the table still gets the columns validate reads.
    empty = pa.schema([(name, pa.string()) for name in ("key", "split", "shard", "caption", "sha256")])
    empty = empty.append(pa.field("width", pa.int64())).append(pa.field("height", pa.int64()))
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else empty
    local = scratch / f".{METADATA_FILE}.tmp"
    with pq.ParquetWriter(local, schema) as writer:
        for part in parts:
            table = pq.read_table(pa.BufferReader(store.get_bytes(part)))
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
            writer.write_table(table.select(schema.names).cast(schema))
    hashes[METADATA_FILE] = sha256_file(local)
    store.put_file(local, METADATA_FILE)

    quarantine = pd.DataFrame(
        [row for record in records for row in record["quarantine"]], columns=["row", "key", "source", "reason"]
    ).astype({"row": "int64"})
    local = scratch / f".{QUARANTINE_FILE}.tmp"
    quarantine.to_parquet(local, index=False)
    hashes[QUARANTINE_FILE] = sha256_file(local)
    store.put_file(local, QUARANTINE_FILE)

    counts = {split: sum(split_sizes.values()) for split, split_sizes in sorted(sizes.items())}
    kept = sum(counts.values())
    return {
        "source": source,
        "output": store.root if store.is_s3 else str(Path(store.root).resolve()),
        "counts": counts,
        "rows": kept,
        "input_rows": kept + len(quarantine),
        "kept": kept,
        "quarantined": len(quarantine),
        "quarantine_reasons": reason_counts(quarantine["reason"]),
        "data_version": version_of(hashes),
        "git_revision": git_revision(),
    }
