"""The ingest step: turn a source into WebDataset shards per split plus a metadata table.

Output layout (a data directory):

    {split}/{split}-000000.tar ...   the shards
    {split}/sizes.json               shard name -> samples
    metadata.parquet                 one row per sample: key, split, shard, caption, sha256, ...
    ingest.json                      counts per split and the data version
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from clipflow.data import builtin
from clipflow.data.shards import ShardRecord, ShardWriter
from clipflow.errors import ClipflowError
from clipflow.params import DataParams
from clipflow.progress import progress

METADATA_FILE = "metadata.parquet"
SUMMARY_FILE = "ingest.json"


def ingest(source: str, output: str | Path, params: DataParams) -> dict[str, Any]:
    """Run the ingest step and return its summary (also written to `ingest.json`).

    Args:
        source: `builtin` for the generated dataset.
        output: the data directory to (re)create.
        params: the `data` section of params.yaml.

    Raises:
        ClipflowError: an unsupported source or invalid data parameters.
    """
    if source != "builtin":
        raise ClipflowError(f"unsupported source {source!r}: this version ingests only 'builtin'")
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
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
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


def data_version(data_dir: Path) -> str:
    """A content hash of every file in the data directory except this step's own summary.

    Two directories with the same version hold byte-identical data, so a model's
    `data_version` tag pins exactly what it was trained on.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(data_dir).rglob("*") if p.is_file() and p.name != SUMMARY_FILE):
        digest.update(path.relative_to(data_dir).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def read_summary(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / SUMMARY_FILE
    if not path.is_file():
        raise ClipflowError(f"not an ingested data directory (no {SUMMARY_FILE}): {data_dir}")
    return json.loads(path.read_text())
