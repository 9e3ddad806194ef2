"""`clipflow index`: embed every image (and caption) of a catalogue into the artifact of `clipflow.index.artifact`.

A catalogue is one of three sources, cut into parts that are embedded and written one at a time:

    an ingested data folder   one part per shard of `index.split` (or of every split); the rows are
                              trusted (ingest checked them) and read as `ShardPairs` reads them, and
                              the columns of metadata.parquet are joined by key
    WebDataset shards         one part per `.tar`, local or `s3://`, read by ingest's shard reader
    a manifest                CSV, Parquet or JSONL, `index.part_size` rows per part in row order

Rows of shards and manifests pass ingest's own fetch, checks and decode (`clipflow.data.ingest.check_row`),
so a row is embedded exactly as ingesting it and indexing the ingested folder would embed it, and a row
that fails is quarantined with its reason: input rows = rows + quarantined, part by part.

Parts go to `index.workers` processes on a CPU (each with `index.threads_per_worker` torch threads),
or one process per GPU; a process holds one part at a time. Each process writes its own parts
atomically, so a killed run leaves no part a reader takes for finished, and a re-run of the same
command skips the finished ones. `.index-run.json`, written before the first part, pins the source,
model and settings of the output: another model or source is refused, not mixed in.

The output is a local folder or an `s3://bucket/prefix` (`artifact.Location`): on Kubeflow the pods of a
`dsl.ParallelFor` share no disk, so each writes its parts under the same prefix and the last step finishes it.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import math
import os
import queue
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from itertools import islice, repeat
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from clipflow.artifacts import METADATA_FILE, IngestReport, sha256_file, version_of
from clipflow.data.chunks import QUARANTINE_COLUMNS
from clipflow.data.sources import SourceRow, is_shard_source, read_rows, shard_paths
from clipflow.errors import ClipflowError
from clipflow.index import artifact
from clipflow.params import IndexParams, Params, ValidateParams
from clipflow.progress import progress
from clipflow.storage import FetchLimits
from clipflow.validate.rows import reason_counts

RUN_FILE = ".index-run.json"
# Parts queued per process beyond the one it embeds: enough to never leave one idle, and a bound on
# how many manifest rows wait in memory.
QUEUED_PARTS_PER_WORKER = 1
POLL_S = 0.2
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class IndexRun:
    """What an output folder is being filled with (`.index-run.json`): a resumed run must agree on all of it."""

    source: str
    kind: str  # "ingested", "shards" or "manifest"
    model: str
    model_version: str
    data_version: str
    parts: int
    input_rows: int | None  # known before embedding for a manifest and an ingested folder
    text: bool
    split: str | None
    part_size: int | None  # a manifest's rows per part


@dataclass(frozen=True)
class _Catalogue:
    """A source cut into parts: `shards[n]` is part n's shard; a manifest's parts are runs of its rows."""

    source: str
    kind: str
    shards: list[str]
    parts: int
    data_version: str
    part_rows: list[int] | None = None  # each part's rows, where known before reading it (an ingested folder)
    input_rows: int | None = None
    metadata: str | None = None  # an ingested folder's metadata.parquet

    def rows_of(self, numbers: list[int]) -> int | None:
        return None if self.part_rows is None else sum(self.part_rows[number] for number in numbers)


@dataclass(frozen=True)
class _Task:
    number: int
    shard: str | None  # the shard to read, or None for `rows`
    rows: list[SourceRow] | None = None


@dataclass(frozen=True)
class _Setup:
    """What every embedding process needs, sent once when it starts."""

    checkpoint: str
    output: str
    catalogue: _Catalogue
    text: bool
    batch_size: int
    threads: int
    checks: ValidateParams
    limits: FetchLimits


@dataclass(frozen=True)
class _Embeddable:
    image: Any  # an RGB PIL image
    caption: str
    metadata: dict[str, Any]


def catalogue_version(source: str, params: Params) -> str:
    """The data version of a source: an ingested folder's own, or a digest of the shards' or manifest's content.

    Raises:
        ClipflowError: as `plan_parts`.
    """
    return _catalogue(source, params).data_version


def plan_parts(source: str, params: Params) -> list[int]:
    """The part numbers of a source (one per shard, or per `index.part_size` manifest rows), for a ParallelFor.

    Raises:
        ClipflowError: a source that is missing or cannot be read as a whole, or an unknown `index.split`.
    """
    return list(range(_catalogue(source, params).parts))


def embed_catalogue(
    source: str, model_reference: str, output: str, params: Params, parts: list[int] | None = None
) -> artifact.IndexManifest | None:
    """Embed a catalogue into the artifact folder `output`, resuming what an earlier run of the same left.

    Args:
        source: an ingested data folder, WebDataset shards (a `.tar`, a folder or an `s3://` prefix), or a
            CSV/Parquet/JSONL manifest (local, `s3://` or `http(s)://`).
        model_reference: a checkpoint path, or an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/3`).
        output: the artifact's location: a local folder or an `s3://bucket/prefix`.
        params: the whole params; `index` says how, `data` and `validate` how rows are read and checked.
        parts: only these parts (one pod's share); None embeds every part and writes index.json.

    Returns:
        The artifact's manifest, or None when `parts` named a share.

    Raises:
        ClipflowError: a missing or unreadable source, an unknown model, an output that is neither a folder
            nor an `s3://` prefix or that holds the embeddings of another model or source, a part number the
            source does not have, S3 refusing the output, or no row that passed the checks. Bad rows never
            raise: they are quarantined.
    """
    location = artifact.Location(output)
    catalogue = _catalogue(source, params)
    checkpoint, model_version = _resolve_model(model_reference, params)
    index = params.index
    run = IndexRun(
        source=catalogue.source,
        kind=catalogue.kind,
        model=model_reference,
        model_version=model_version,
        data_version=catalogue.data_version,
        parts=catalogue.parts,
        input_rows=catalogue.input_rows,
        text=index.text,
        split=index.split if catalogue.kind == "ingested" else None,
        part_size=index.part_size if catalogue.kind == "manifest" else None,
    )
    _start_or_resume(location, run)
    if parts is None:
        # Not for a share: other pods may be writing their parts into the same artifact right now.
        artifact.remove_unfinished(output)
    wanted = list(range(catalogue.parts)) if parts is None else sorted(set(parts))
    unknown = [number for number in wanted if not 0 <= number < catalogue.parts]
    if unknown:
        raise ClipflowError(f"{source} has parts 0 to {catalogue.parts - 1}, not {unknown}")
    finished = set(artifact.part_numbers(output))
    todo = [number for number in wanted if number not in finished]
    setup = _Setup(
        checkpoint=str(checkpoint),
        output=output,
        catalogue=catalogue,
        text=index.text,
        batch_size=index.batch_size,
        threads=index.threads_per_worker,
        checks=params.validate,
        limits=_limits(params),
    )
    if todo:
        tasks = _tasks(catalogue, params, set(todo))
        images = _images(_embed(tasks, setup, _devices(index)))
        for _ in progress(images, total=catalogue.rows_of(todo), desc="index images"):
            pass
    return finish(output) if parts is None else None


def finish(output: str) -> artifact.IndexManifest:
    """Write index.json once every part of the artifact at `output` is embedded; returns the manifest.

    Raises:
        ClipflowError: no run was started there, some parts are not embedded yet, the counts do not
            reconcile with the source's rows, or no row passed the checks.
    """
    location = artifact.Location(output)
    run = _read_run(location)
    if run is None:
        raise ClipflowError(f"no `clipflow index` run has written to {output}")
    finished = set(artifact.part_numbers(output))
    missing = [number for number in range(run.parts) if number not in finished]
    if missing:
        raise ClipflowError(
            f"{len(missing)} of the {run.parts} parts of {output} are not embedded yet (part {missing[0]} first)"
        )
    rows = quarantined = 0
    dim = None
    for number in range(run.parts):
        files = artifact.part_files(number)
        # The width is read from the first part with rows; from S3, only its embeddings are downloaded.
        needed = [files["metadata"], files["quarantine"]] + ([files["image"]] if dim is None else [])
        with location.local(needed) as folder:
            paths = artifact.part_paths(folder, number)
            kept = _parquet_rows(paths["metadata"])
            rows += kept
            quarantined += _parquet_rows(paths["quarantine"])
            if kept and dim is None:
                dim = int(np.load(paths["image"], mmap_mode="r", allow_pickle=False).shape[1])
    if dim is None:
        raise ClipflowError(
            f"no image of {run.source} passed the checks: all {quarantined} rows are quarantined"
            f" (see {output.rstrip('/')}/{artifact.QUARANTINE_DIR})"
        )
    if run.input_rows is not None and rows + quarantined != run.input_rows:
        raise ClipflowError(
            f"{output} holds {rows} rows and {quarantined} quarantined where {run.source} has {run.input_rows}"
        )
    manifest = artifact.IndexManifest(
        model=run.model,
        model_version=run.model_version,
        data_version=run.data_version,
        source=run.source,
        dim=dim,
        input_rows=rows + quarantined,
        rows=rows,
        quarantined=quarantined,
        parts=run.parts,
        text=run.text,
        extra={"quarantine_reasons": reason_counts(artifact.read_quarantine(output)["reason"]), "split": run.split},
    )
    artifact.write_manifest(output, manifest)
    return manifest


# --- the source and the model -------------------------------------------------------------------------


def _catalogue(source: str, params: Params) -> _Catalogue:
    if not urlparse(source).scheme and (Path(source) / "ingest.json").is_file():
        return _ingested(source, params.index)
    if not urlparse(source).scheme and not Path(source).exists():
        raise ClipflowError(f"source not found: {source} (an ingested data folder, shards or a manifest)")
    if is_shard_source(source):
        shards = shard_paths(source)
        if not shards:
            raise ClipflowError(f"no .tar shards under {source}")
        return _Catalogue(source, "shards", shards, len(shards), _digest(source, shards))
    rows = sum(1 for _ in _rows(source, params))
    if not rows:
        raise ClipflowError(f"manifest {source} has no rows")
    parts = math.ceil(rows / params.index.part_size)
    return _Catalogue(source, "manifest", [], parts, _digest(source, [source]), input_rows=rows)


def _ingested(source: str, index: IndexParams) -> _Catalogue:
    from clipflow.data.shards import split_sizes

    report = IngestReport.read(source)
    splits = [split for split, count in sorted(report.counts.items()) if count]
    if index.split is not None:
        if index.split not in report.counts:
            raise ClipflowError(f"index.split={index.split!r} is not a split of {source} (it has {splits})")
        splits = [index.split] if index.split in splits else []
    sizes = {shard: count for split in splits for shard, count in split_sizes(Path(source), split).items()}
    if not sizes:
        raise ClipflowError(f"{source} holds no images in {'split ' + index.split if index.split else 'any split'}")
    return _Catalogue(
        source=str(Path(source).resolve()),
        kind="ingested",
        shards=[str(shard.resolve()) for shard in sizes],
        parts=len(sizes),
        data_version=report.data_version,
        part_rows=list(sizes.values()),
        input_rows=sum(sizes.values()),
        metadata=str((Path(source) / METADATA_FILE).resolve()),
    )


def _digest(source: str, files: list[str]) -> str:
    """The data version of shards or a manifest: `version_of` the files' content, by path under the source.

    A remote source is not read twice for it: its version is a digest of its location.
    """
    if urlparse(source).scheme:
        return "uri-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    return version_of({Path(file).relative_to(base).as_posix(): sha256_file(file) for file in files})


def _limits(params: Params) -> FetchLimits:
    """How an image is fetched: ingest's limits (`data.max_image_bytes`, its timeout and retries)."""
    return FetchLimits(params.data.max_image_bytes, params.data.http_timeout_s, params.data.http_retries)


def _rows(source: str, params: Params) -> Iterator[SourceRow]:
    data = params.data
    return read_rows(source, data.image_column, data.caption_column, _limits(params), data.max_manifest_bytes)


def _resolve_model(reference: str, params: Params) -> tuple[Path, str]:
    """The local checkpoint of a model reference, and its version: the registry's, or the file's digest."""
    from clipflow.registry.models import is_model_uri, local_checkpoint, registered_version

    if not is_model_uri(reference):
        checkpoint = local_checkpoint(reference)
        return checkpoint, "sha256-" + sha256_file(checkpoint)[:16]
    from clipflow import tracking

    tracking.setup(params.tracking)
    version = registered_version(reference)
    return local_checkpoint(reference), reference if version is None else str(version.version)


# --- the run record and the parts ---------------------------------------------------------------------


def _read_run(location: artifact.Location) -> IndexRun | None:
    return IndexRun(**json.loads(location.read_text(RUN_FILE))) if location.exists(RUN_FILE) else None


def _start_or_resume(location: artifact.Location, run: IndexRun) -> None:
    """Pin the artifact's location to this run, or check that it already is."""
    earlier = _read_run(location)
    if earlier is None:
        # Pods of one run may start together: another's run file, landed or on its way in, is no stranger's.
        if not all(name == RUN_FILE or name.startswith(f".{RUN_FILE}.") for name in location.names()):
            raise ClipflowError(f"{location} is not empty and holds no `clipflow index` run: choose another --output")
        location.write_text(RUN_FILE, json.dumps(asdict(run), indent=2))
        # Of pods that wrote theirs together, the last one's pins the run; the others check against it.
        earlier = _read_run(location)
    # The model is compared by version: `models:/NAME@ALIAS` and `models:/NAME/3` may name the same one.
    earlier_values = asdict(earlier)
    changed = [name for name, value in asdict(run).items() if name != "model" and earlier_values.get(name) != value]
    if changed:
        raise ClipflowError(
            f"{location} holds embeddings of another run (its {', '.join(changed)} differ): "
            "choose another --output, or delete it to start over"
        )


def _tasks(catalogue: _Catalogue, params: Params, numbers: set[int]) -> Iterator[_Task]:
    """The parts `numbers` in order; a manifest is read once, and rows of parts not wanted are not kept."""
    if catalogue.kind != "manifest":
        yield from (_Task(number, catalogue.shards[number]) for number in sorted(numbers))
        return
    rows = _rows(catalogue.source, params)
    for number in range(catalogue.parts):
        part = list(islice(rows, params.index.part_size))
        if number in numbers:
            yield _Task(number, None, part)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# --- the processes ------------------------------------------------------------------------------------


def _devices(index: IndexParams) -> list[str]:
    gpus = _gpu_count()
    return [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"] * index.workers


def _gpu_count() -> int:
    # Without the device node a GPU's driver needs (NVIDIA's, AMD's ROCm, WSL's) torch finds no GPU, so a
    # CPU machine's parent process need not import torch (1.6 s) only to count none.
    if not any(Path(node).exists() for node in GPU_DEVICE_NODES):
        return 0
    import torch

    return torch.cuda.device_count()


def _images(batches: Iterator[int]) -> Iterator[None]:
    """One item per image embedded, so the progress bar counts images and shows images/s."""
    for count in batches:
        yield from repeat(None, count)


def _embed(tasks: Iterator[_Task], setup: _Setup, devices: list[str]) -> Iterator[int]:
    """Embed every task's part, in this process for one device, else in a process per device.

    Yields the images of each batch as it is embedded.
    """
    if len(devices) == 1:
        import torch

        threads = torch.get_num_threads()
        _configure(setup, devices[0], None, None)
        try:
            for task in tasks:
                yield from _embed_part(task)
        finally:
            torch.set_num_threads(threads)
            _WORKER.clear()
        return
    yield from _embed_in_processes(tasks, setup, devices)


def _embed_in_processes(tasks: Iterator[_Task], setup: _Setup, devices: list[str]) -> Iterator[int]:
    import multiprocessing

    # spawn: each process starts clean of this one's threads (torch's, pyarrow's, MLflow's).
    context = multiprocessing.get_context("spawn")
    slots, counts, stop = context.Queue(), context.Queue(), context.Event()
    for device in devices:
        slots.put(device)
    with ProcessPoolExecutor(
        len(devices), mp_context=context, initializer=_start_worker, initargs=(setup, slots, counts, stop)
    ) as pool:
        pending: set[Future] = set()
        tasks = iter(tasks)
        more = True
        try:
            while more or pending:
                while more and len(pending) < len(devices) * (1 + QUEUED_PARTS_PER_WORKER):
                    task = next(tasks, None)
                    if task is None:
                        more = False
                    else:
                        pending.add(pool.submit(_run_part, task))
                yield from _drain(counts, block=True)
                done, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a process's error (a bad checkpoint) is raised here, as it was raised
            yield from _drain(counts, block=False)
        except BaseException:
            stop.set()  # every process leaves its part at the next batch; the pool then shuts down
            for future in pending:
                future.cancel()
            raise


def _drain(counts: Any, block: bool) -> Iterator[int]:
    try:
        yield counts.get(timeout=POLL_S) if block else counts.get_nowait()
        while True:
            yield counts.get_nowait()
    except queue.Empty:
        return


_WORKER: dict[str, Any] = {}  # this process's setup, device and (from its first part) model


def _start_worker(setup: _Setup, slots: Any, counts: Any, stop: Any) -> None:
    """A pool process's start: it takes the next free device."""
    # A spawned process ends in a full interpreter shutdown, which tears torch down for over a second
    # while the parent waits. Every part is written before its future returns and multiprocessing has
    # flushed its queues before the interpreter exits, so this process can leave without the shutdown.
    atexit.register(os._exit, 0)
    _configure(setup, slots.get(), counts, stop)


def _configure(setup: _Setup, device: str, counts: Any, stop: Any) -> None:
    """The torch threads and device of an embedding process. The model loads with the first part, so that
    one that cannot load fails that part with its own error (a pool's initializer would only break the pool)."""
    import torch

    torch.set_num_threads(setup.threads)
    _WORKER.update(setup=setup, device=device, counts=counts, stop=stop)


def _run_part(task: _Task) -> int:
    """A part in a pool process: its batches' images go to the parent's progress bar."""
    embedded = 0
    for count in _embed_part(task):
        _WORKER["counts"].put(count)
        embedded += count
    return embedded


def _model() -> Any:
    if "model" not in _WORKER:
        from clipflow import model as clip_model
        from clipflow.data.ingest import configure_worker
        from clipflow.registry.models import load_model

        setup: _Setup = _WORKER["setup"]
        loaded = load_model(setup.checkpoint)
        loaded.model.to(_WORKER["device"])
        _WORKER["model"] = loaded
        _WORKER["dim"] = int(loaded.encode_text(["a"]).shape[1])
        # Images are checked and downscaled as ingest does, to the side this model's input has.
        configure_worker(setup.checks, setup.limits, clip_model.image_side(loaded.name))
    return _WORKER["model"]


def _embed_part(task: _Task) -> Iterator[int]:
    """Embed one part and write it; yields the images of each batch embedded."""
    import torch

    setup: _Setup = _WORKER["setup"]
    model = _model()
    device = _WORKER["device"]
    metadata: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    image_chunks: list[np.ndarray] = []
    text_chunks: list[np.ndarray] = []
    images: list[Any] = []
    captions: list[str] = []

    def flush() -> int:
        batch = torch.stack(images).to(device)  # (B, 3, H, W)
        image_chunks.append(model.encode_images(batch).cpu().numpy().astype(artifact.EMBEDDING_DTYPE))
        if setup.text:
            text_chunks.append(model.encode_text(captions).cpu().numpy().astype(artifact.EMBEDDING_DTYPE))
        count = len(images)
        images.clear()
        captions.clear()
        return count

    rows = _ingested_rows(task) if setup.catalogue.kind == "ingested" else _checked_rows(task)
    for row in rows:
        if isinstance(row, dict):
            quarantined.append(row)
            continue
        metadata.append(row.metadata)
        images.append(model.preprocess(row.image))
        captions.append(row.caption)
        if len(images) == setup.batch_size:
            if _WORKER["stop"] is not None and _WORKER["stop"].is_set():
                return
            yield flush()
    if images:
        yield flush()
    empty = np.zeros((0, _WORKER["dim"]), dtype=artifact.EMBEDDING_DTYPE)
    part = artifact.Part(
        number=task.number,
        image_embeddings=np.concatenate(image_chunks) if image_chunks else empty,
        text_embeddings=(np.concatenate(text_chunks) if text_chunks else empty) if setup.text else None,
        metadata=_frame(metadata, setup.catalogue.metadata),
    )
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS).astype({"row": "int64"})
    artifact.write_part(setup.output, part, quarantine)


def _frame(rows: list[dict[str, Any]], source_metadata: str | None) -> pd.DataFrame:
    """A part's metadata with the same column types in every part, whatever values it holds, so that
    the parts read as one table (`pd.read_parquet(folder)`): an ingested folder's types from its
    metadata.parquet, text for the columns of other sources (see `_plain`).

    clip-retrieval's columns come first, then the others in the order the source has them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = dict.fromkeys(artifact.METADATA_COLUMNS, pa.string())
    if source_metadata is not None:
        types.update((field.name, field.type) for field in pq.read_schema(source_metadata) if field.name not in types)
    for row in rows:
        types.update((name, pa.string()) for name in row if name not in types)
    columns = {
        name: pd.Series([row.get(name) for row in rows], dtype=pd.ArrowDtype(kind)) for name, kind in types.items()
    }
    return pd.DataFrame(columns)


def _ingested_rows(task: _Task) -> Iterator[_Embeddable]:
    """The samples of an ingested shard, read as `ShardPairs` reads them, with their metadata.parquet row."""
    from PIL import Image

    from clipflow.data.shards import ShardIndex, split_sizes

    shard = Path(task.shard)
    expected = split_sizes(shard.parent.parent, shard.parent.name)[shard]
    index = ShardIndex([shard])
    if len(index) != expected:
        raise ClipflowError(f"shard {shard} holds {len(index)} samples where sizes.json lists {expected}")
    name = f"{shard.parent.name}/{shard.name}"
    table = pd.read_parquet(
        _WORKER["setup"].catalogue.metadata, filters=[("shard", "==", name)], dtype_backend="pyarrow"
    )
    extra = table.drop(columns=["caption"]).set_index("key").to_dict("index")
    missing = sorted(set(index.keys) - set(extra))
    if missing:
        raise ClipflowError(f"{len(missing)} samples of {shard} have no row in {METADATA_FILE} ({missing[0]} first)")
    for i, key in enumerate(index.keys):
        image = Image.open(io.BytesIO(index.read(i, index.image_ext(i)))).convert("RGB")
        caption = index.read(i, "txt").decode()
        row = {"key": key, "image_path": f"{shard}#{key}", "caption": caption, **extra[key]}
        yield _Embeddable(image, caption, row)


def _checked_rows(task: _Task) -> Iterator[_Embeddable | dict[str, Any]]:
    """A manifest part's rows, or a shard's, through ingest's fetch and checks: embeddable, or quarantined."""
    from PIL import Image

    from clipflow.data.ingest import check_row

    setup: _Setup = _WORKER["setup"]
    # A shard's rows come from the reader ingest reads shards with (it ignores the manifest arguments).
    rows = task.rows if task.rows is not None else read_rows(task.shard, "", "", setup.limits, 0)
    for row in rows:
        outcome = check_row(row)
        if isinstance(outcome, str):
            yield {"row": row.row, "key": row.key, "source": row.source, "reason": outcome}
            continue
        # The pixels ingest would store: the checked image, downscaled and encoded as it writes them.
        image = Image.open(io.BytesIO(outcome.image.jpeg)).convert("RGB")
        extra = {
            (name if name not in artifact.METADATA_COLUMNS else f"source_{name}"): _plain(value)
            for name, value in row.extra.items()
        }
        yield _Embeddable(
            image, outcome.caption, {"key": row.key, "image_path": row.source, "caption": outcome.caption, **extra}
        )


def _plain(value: Any) -> Any:
    """A manifest value as one Parquet type holds it: text stays text, anything else becomes JSON text."""
    return value if isinstance(value, str) or value is None else json.dumps(value, default=str)
