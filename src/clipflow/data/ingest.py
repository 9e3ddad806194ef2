"""The ingest step: turn a source into WebDataset shards per split plus a metadata table.

Output layout (a data directory, local or `s3://bucket/prefix`): see `clipflow.artifacts`.

Every source streams through `clipflow.data.chunks` in chunks of `data.shard_size` rows. For a
manifest or shards (see `clipflow.data.sources`), workers fetch, check, decode and resize a
chunk's images; the main process drops duplicates, quarantines what the curation model rejects
when `validate` names one (`clipflow.data.curate`), and assigns each row a split by a hash of its
key. The built-in dataset (`clipflow.data.builtin`) is rendered split by split. Either way a
re-run after a crash skips every committed chunk and redoes the rest, and the report has one
schema: rows in, rows kept per split, rows quarantined and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clipflow.artifacts import INGEST_REPORT, IngestReport, git_revision, sha256_file
from clipflow.data import builtin
from clipflow.data.chunks import STAGING, ChunkWriter, KeptSample, Totals
from clipflow.data.curate import DUPLICATE_REASON, SCORE_REASON, CurationModel, Curator, Pair, load_curation_model
from clipflow.data.shards import ShardRecord
from clipflow.data.sources import SourceRow, read_rows
from clipflow.errors import ClipflowError
from clipflow.params import DataParams, TrackingParams, ValidateParams
from clipflow.progress import progress
from clipflow.storage import FetchError, FetchLimits, Store, fetch
from clipflow.validate.rows import CheckedImage, Rejected, check_caption, check_image

SOURCE_SCHEMES = {"", "s3", "http", "https"}


def ingest(
    source: str,
    output: str | Path,
    params: DataParams,
    checks: ValidateParams | None = None,
    tracking: TrackingParams | None = None,
) -> IngestReport:
    """Run the ingest step and return its report (also written to `ingest.json`).

    Args:
        source: `builtin` for the generated dataset; a manifest (`.csv`, `.parquet`, `.jsonl`;
            local, `s3://` or `http(s)://`); or WebDataset shards (a `.tar`, a folder or an
            `s3://` prefix of them).
        output: the data directory to (re)create: a local folder or `s3://bucket/prefix`.
            An unfinished run of the same source and params into it is resumed.
        params: the `data` section of params.yaml.
        checks: the `validate` section, whose per-row checks every non-builtin row must pass, and
            which curates those rows with a model when `checks.curates` (see `clipflow.data.curate`;
            the built-in dataset is neither checked nor curated).
        tracking: where a `models:/` curation model is looked up (None: MLflow's current tracking URI).

    Raises:
        ClipflowError: an unsupported or unreadable source (a missing column, no shards), a curation
            model that does not load, or invalid data parameters. Bad rows never raise: they are quarantined.
    """
    params.check()  # at params load too; params built in code reach here unchecked
    if source != "builtin":
        scheme = urlparse(source).scheme.lower()
        if scheme not in SOURCE_SCHEMES and len(scheme) != 1:  # a drive letter is a path
            raise ClipflowError(f"unsupported source {source!r}: use builtin, a local path, s3:// or http(s)://")
        if checks is None:
            raise ClipflowError(f"ingesting {source!r} needs the validate params for its per-row checks")
        return _ingest_source(source, str(output), params, checks, tracking)
    if checks is not None and checks.curates:
        # Its captions describe the scene they were rendered from: a score filter would only drop the model's mistakes.
        raise ClipflowError(
            "validate.clip_score_min and validate.near_duplicate_cosine curate manifest and shard sources, "
            "not the built-in dataset: unset them, or ingest your own data"
        )
    _check_builtin_params(params)
    return _ingest_builtin(str(output), params)


def _ingest_builtin(output: str, params: DataParams) -> IngestReport:
    """The generated dataset, split by split, through the same chunks as every other source."""
    started = time.perf_counter()
    store = Store(output)
    _start_or_resume(store, _fingerprint("builtin", params))
    with store.scratch(f"{STAGING}/tmp") as scratch:
        chunks = ChunkWriter(store, scratch)
        for split in builtin.SPLITS:
            total = builtin.split_size(params, split)
            samples = progress(builtin.generate(params, split), total=total, desc=f"ingest {split}")
            for chunk in _batched(samples, params.shard_size):
                # A committed chunk is rendered again, as the generator must pass it, but not encoded or written.
                if chunks.committed() is None:
                    chunks.write([_builtin_sample(sample) for sample in chunk], quarantined=[])
        totals = chunks.finish()
    return _report("builtin", store, totals, started)


def _builtin_sample(sample: builtin.Sample) -> KeptSample:
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
    # Parquet needs one type per column: candidate lists travel as JSON text.
    row = {k: json.dumps(v) if isinstance(v, list) else v for k, v in meta.items()}
    return KeptSample(sample.split, ShardRecord(sample.key, image, "png", sample.caption, meta), row)


def _report(
    source: str, store: Store, totals: Totals, started: float, curation: dict[str, Any] | None = None
) -> IngestReport:
    """The ingest report of every source, written last: its presence means the data is complete."""
    report = IngestReport(
        source=source,
        output=store.root if store.is_s3 else str(Path(store.root).resolve()),
        counts=totals.counts,
        input_rows=totals.kept + totals.quarantined,
        kept=totals.kept,
        quarantined=totals.quarantined,
        quarantine_reasons=totals.quarantine_reasons,
        data_version=totals.data_version,
        git_revision=git_revision(),
        seconds=round(time.perf_counter() - started, 2),
        curation=curation,
    )
    store.put_bytes(report.to_json().encode(), INGEST_REPORT)
    store.delete(STAGING)
    return report


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


def configure_worker(checks: ValidateParams, limits: FetchLimits, short_side: int) -> None:
    """Set the checks and limits `check_row` applies in this process (a pool's initializer, or in line)."""
    _WORKER.update(checks=checks, limits=limits, short_side=short_side)


def check_row(row: SourceRow) -> _Checked | str:
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


def _ingest_source(
    source: str, output: str, params: DataParams, checks: ValidateParams, tracking: TrackingParams | None
) -> IngestReport:
    started = time.perf_counter()
    # Before any row: a curation model that does not load must cost nothing, and resuming needs its identity.
    # The check workers forked later inherit none of torch's threads' work: they never run torch.
    curation_model = load_curation_model(checks, tracking)
    curation = curation_model.settings(checks) if curation_model else None
    limits = FetchLimits(params.max_image_bytes, params.http_timeout_s, params.http_retries)
    rows = read_rows(source, params.image_column, params.caption_column, limits, params.max_manifest_bytes)
    # The first row comes before the output is touched: a missing source or column must not
    # cost the user the data already in the output folder.
    rows = chain(list(islice(rows, 1)), rows)
    store = Store(output)
    _start_or_resume(store, _fingerprint(source, params, checks, curation))

    # Raw digests, not hex text: this map is the one thing that grows with the input (~100 bytes a row).
    seen: dict[bytes, int] = {}
    with (
        store.scratch(f"{STAGING}/tmp") as scratch,
        _pool(params, checks, limits) as check,
        _curator(curation_model, checks, store, scratch) as curator,
    ):
        chunks = ChunkWriter(store, scratch)
        for chunk in progress(_batched(rows, params.shard_size), desc="ingest chunks"):
            record = chunks.committed()
            if record is not None:
                seen.update((bytes.fromhex(digest), row) for digest, row in record["digests"].items())
                if curator is not None:
                    curator.resume()
                continue
            _ingest_chunk(chunks, chunk, check(chunk), seen, params.split_fractions, curator)
        totals = chunks.finish()
    if curation is not None:
        curated = {kind: totals.quarantine_reasons.get(kind, 0) for kind in (SCORE_REASON, DUPLICATE_REASON)}
        curation = {**curation, "quarantined": curated}
    return _report(source, store, totals, started, curation)


def _curator(
    model: CurationModel | None, checks: ValidateParams, store: Store, scratch: Path
) -> contextlib.AbstractContextManager[Curator | None]:
    return contextlib.nullcontext() if model is None else Curator(model, checks, store, scratch)


def _split_of(key: str, fractions: dict[str, float]) -> str:
    """The split of a key: the same key always lands in the same split, whatever else is ingested."""
    point = int(hashlib.sha256(f"split/{key}".encode()).hexdigest()[:15], 16) / 16**15
    edge = 0.0
    for split, fraction in fractions.items():
        edge += fraction
        if point < edge:
            return split
    return next(reversed(fractions))


def _fingerprint(
    source: str, params: DataParams, checks: ValidateParams | None = None, curation: dict[str, Any] | None = None
) -> str:
    """What a resumed run must share with the crashed one: the source's content and every knob."""
    identity = sha256_file(Path(source)) if Path(source).is_file() else source
    # The worker count changes how fast, not what: a resume may use more or fewer.
    data = {k: v for k, v in vars(params).items() if k != "workers"}
    # The curation's model by its weights: the same models:/NAME@ALIAS may name other weights on a resume.
    knobs = json.dumps([identity, data, vars(checks) if checks else None, curation], sort_keys=True, default=str)
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
            self.pool = context.Pool(self.workers, initializer=configure_worker, initargs=self.args)
        else:
            configure_worker(*self.args)
        return self.check

    def check(self, chunk: list[SourceRow]) -> Iterator[_Checked | str]:
        if self.pool is None:
            return map(check_row, chunk)
        return self.pool.imap(check_row, chunk, chunksize=8)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _ingest_chunk(
    chunks: ChunkWriter,
    chunk: list[SourceRow],
    outcomes: Iterator[_Checked | str],
    seen: dict[bytes, int],
    fractions: dict[str, float],
    curator: Curator | None = None,
) -> None:
    """Sort one chunk's checked rows into kept samples (each in the split of its key) and quarantined rows."""
    kept: list[KeptSample] = []
    quarantined: list[dict[str, Any]] = []
    digests: dict[str, int] = {}
    outcomes = list(outcomes)
    curated: dict[int, str | None] = {}
    if curator is not None:
        checked = [(row, passed) for row, passed in zip(chunk, outcomes, strict=True) if isinstance(passed, _Checked)]
        verdicts = curator.curate([Pair(row.key, passed.image.jpeg, passed.caption) for row, passed in checked])
        curated = {row.row: verdict for (row, _), verdict in zip(checked, verdicts, strict=True)}
    for row, outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, _Checked):
            first = seen.get(bytes.fromhex(outcome.source_sha256))
            if first is not None:
                outcome = f"duplicate image: same bytes as input row {first}"
            elif curated.get(row.row) is not None:
                outcome = curated[row.row]
        if isinstance(outcome, str):
            quarantined.append({"row": row.row, "key": row.key, "source": row.source, "reason": outcome})
            continue
        seen[bytes.fromhex(outcome.source_sha256)] = digests[outcome.source_sha256] = row.row
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
        text_extra = {k: v if isinstance(v, str) or v is None else json.dumps(v, default=str) for k, v in extra.items()}
        record = ShardRecord(row.key, image.jpeg, "jpg", outcome.caption, {**meta, **_jsonable(extra)})
        kept.append(KeptSample(_split_of(row.key, fractions), record, {**meta, **text_extra}))
    chunks.write(kept, quarantined, digests)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Manifest values as JSON can hold them (Parquet gives dates, decimals and bytes)."""
    return json.loads(json.dumps(values, default=str))
