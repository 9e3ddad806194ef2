"""The one shard writer: ingest's output, written chunk by chunk so that a crashed run resumes.

A chunk is at most `data.shard_size` input rows. It commits its shards first (one per split it
holds, numbered per split), then its metadata part, and its record in `.ingest/` last, so a
re-run after a crash skips every committed chunk and redoes the rest. `finish` gathers the
records into `sizes.json`, `metadata.parquet` and `quarantine.parquet` and returns the counts
of the ingest report; nothing of `.ingest/` is left once the caller deletes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from clipflow.artifacts import METADATA_FILE, QUARANTINE_FILE, SIZES_FILE, sha256_file, version_of
from clipflow.data.shards import ShardRecord, add_record
from clipflow.storage import Store
from clipflow.validate.rows import reason_counts

STAGING = ".ingest"
QUARANTINE_COLUMNS = ["row", "key", "source", "reason"]


@dataclass(frozen=True)
class KeptSample:
    """One sample on its way into a shard: its split, what the shard stores, and its metadata row."""

    split: str
    record: ShardRecord
    row: dict[str, Any]  # metadata columns besides key, split, shard and caption


@dataclass(frozen=True)
class Totals:
    """What every committed chunk adds up to: the counts of the ingest report."""

    counts: dict[str, int]  # kept samples per split
    kept: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    data_version: str  # of everything written, see `clipflow.artifacts.data_version`


class ChunkWriter:
    """Writes the chunks of one ingest into a store, in order; `committed` tells a resumed run what to skip."""

    def __init__(self, store: Store, scratch: Path):
        self.store, self.scratch = store, scratch
        self.chunks = 0
        self._shards: Counter[str] = Counter()

    def committed(self) -> dict[str, Any] | None:
        """The record of the next chunk if an earlier run committed it; the writer then moves past it."""
        name = _record_name(self.chunks)
        if not self.store.exists(name):
            return None
        record = json.loads(self.store.get_bytes(name))
        self._shards.update(shard.partition("/")[0] for shard in record["sizes"])
        self.chunks += 1
        return record

    def write(
        self,
        samples: list[KeptSample],
        quarantined: list[dict[str, Any]],
        digests: dict[str, int] | None = None,
    ) -> None:
        """Commit the next chunk: shards, then metadata part, then its record.

        Args:
            samples: the kept samples, in row order.
            quarantined: one row per rejected input row (QUARANTINE_COLUMNS).
            digests: source sha256 -> input row of each kept sample, for a resumed run's duplicate check.
        """
        index = self.chunks
        splits = list(dict.fromkeys(sample.split for sample in samples))
        names = {split: f"{split}/{split}-{self._shards[split]:06d}.tar" for split in splits}
        sizes = dict.fromkeys(names.values(), 0)
        rows: list[dict[str, Any]] = []
        with contextlib.ExitStack() as open_tars:
            tars = {
                split: open_tars.enter_context(tarfile.open(self._local(name), "w")) for split, name in names.items()
            }
            for sample in samples:
                add_record(tars[sample.split], sample.record)
                sizes[names[sample.split]] += 1
                key, caption = sample.record.key, sample.record.caption
                rows.append(
                    {"key": key, "split": sample.split, "shard": names[sample.split], "caption": caption, **sample.row}
                )
        hashes = {}
        for name in names.values():
            hashes[name] = sha256_file(self._local(name))
            self.store.put_file(self._local(name), name)
        if rows:
            part = self.scratch / f".chunk-{index:06d}.parquet"
            pd.DataFrame(rows).to_parquet(part, index=False)
            self.store.put_file(part, _part_name(index))
        record = {
            "sizes": sizes,
            "hashes": hashes,
            "quarantine": quarantined,
            "digests": digests or {},
            "kept": len(rows),
        }
        self.store.put_bytes(json.dumps(record).encode(), _record_name(index))
        self._shards.update(splits)
        self.chunks += 1

    def finish(self) -> Totals:
        """Gather the chunk records into sizes.json, metadata.parquet and quarantine.parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = []
        for i in range(self.chunks):
            record = json.loads(self.store.get_bytes(_record_name(i)))
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
            self.store.put_bytes(payload, f"{split}/{SIZES_FILE}")

        # Parts are read one at a time: twice, first for a schema that fits them all.
        parts = [_part_name(i) for i, record in enumerate(records) if record["kept"]]
        schemas = [pq.read_schema(pa.BufferReader(self.store.get_bytes(part))) for part in parts]
        # With every row quarantined there is no part; the table still gets the columns validate reads.
        empty = pa.schema([(name, pa.string()) for name in ("key", "split", "shard", "caption", "sha256")])
        empty = empty.append(pa.field("width", pa.int64())).append(pa.field("height", pa.int64()))
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else empty
        local = self.scratch / f".{METADATA_FILE}.tmp"
        with pq.ParquetWriter(local, schema) as writer:
            for part in parts:
                table = pq.read_table(pa.BufferReader(self.store.get_bytes(part)))
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))
        hashes[METADATA_FILE] = sha256_file(local)
        self.store.put_file(local, METADATA_FILE)

        quarantine = pd.DataFrame(
            [row for record in records for row in record["quarantine"]], columns=QUARANTINE_COLUMNS
        ).astype({"row": "int64"})
        local = self.scratch / f".{QUARANTINE_FILE}.tmp"
        quarantine.to_parquet(local, index=False)
        hashes[QUARANTINE_FILE] = sha256_file(local)
        self.store.put_file(local, QUARANTINE_FILE)

        counts = {split: sum(split_sizes.values()) for split, split_sizes in sorted(sizes.items())}
        return Totals(
            counts=counts,
            kept=sum(counts.values()),
            quarantined=len(quarantine),
            quarantine_reasons=reason_counts(quarantine["reason"]),
            data_version=version_of(hashes),
        )

    def _local(self, name: str) -> Path:
        return self.scratch / f".{Path(name).name}.tmp"


def _record_name(index: int) -> str:
    return f"{STAGING}/chunk-{index:06d}.json"


def _part_name(index: int) -> str:
    return f"{STAGING}/chunk-{index:06d}.parquet"
