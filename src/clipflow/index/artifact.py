"""Catalogue embeddings on disk, in clip-retrieval's layout, so its consumers read ours.

    img_emb/img_emb_{N}.npy          float16 (rows, D), L2-normalised image embeddings of part N
    text_emb/text_emb_{N}.npy        float16 (rows, D), the captions' embeddings (when embedded)
    metadata/metadata_{N}.parquet    row i describes row i of both: key, image_path, caption, then the
                                     source's other columns
    quarantine/quarantine_{N}.parquet  the part's rejected input rows: row, key, source, reason
    index.json                       `IndexManifest`: model, model version, data version, width, counts, parts

Part numbers are zero-padded to `PART_DIGITS`, so a sorted listing is the part order (clip-retrieval's
readers and autofaiss sort the file names). A part is complete when its metadata file exists: every
file of a part is written under a temporary name and renamed, the metadata last, so a crash leaves
nothing a reader takes for a finished part, and a resumed run skips exactly the finished parts.
index.json is written once every part is, so its presence marks a complete artifact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clipflow.artifacts import JsonRecord
from clipflow.errors import ClipflowError

IMAGE_DIR = "img_emb"
TEXT_DIR = "text_emb"
METADATA_DIR = "metadata"
QUARANTINE_DIR = "quarantine"
MANIFEST_FILE = "index.json"
PART_DIGITS = 6
EMBEDDING_DTYPE = np.float16  # clip-retrieval's: half the bytes, and cosines stay within 1e-3
METADATA_COLUMNS = ("key", "image_path", "caption")


@dataclass(frozen=True)
class IndexManifest(JsonRecord):
    """What an embedding artifact holds and where it came from (index.json)."""

    model: str  # the model reference it was embedded with, as given
    model_version: str  # the registry version, or the checkpoint's digest for a file
    data_version: str  # the source's data version (an ingested folder's) or digest
    source: str
    dim: int
    input_rows: int
    rows: int  # embedded rows; input_rows = rows + quarantined
    quarantined: int
    parts: int
    text: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Part:
    """One part of an artifact: row i of `metadata` describes row i of the embeddings."""

    number: int
    image_embeddings: np.ndarray
    text_embeddings: np.ndarray | None
    metadata: pd.DataFrame


def part_name(number: int) -> str:
    return str(number).zfill(PART_DIGITS)


def part_paths(folder: Path, number: int) -> dict[str, Path]:
    name = part_name(number)
    return {
        "image": folder / IMAGE_DIR / f"img_emb_{name}.npy",
        "text": folder / TEXT_DIR / f"text_emb_{name}.npy",
        "metadata": folder / METADATA_DIR / f"metadata_{name}.parquet",
        "quarantine": folder / QUARANTINE_DIR / f"quarantine_{name}.parquet",
    }


def is_complete(folder: Path, number: int) -> bool:
    """Whether part `number` was written whole (its metadata, written last, exists)."""
    return part_paths(folder, number)["metadata"].is_file()


def write_part(folder: Path, part: Part, quarantine: pd.DataFrame) -> None:
    """Write one part atomically: every file under a temporary name, renamed into place, the metadata last."""
    rows = len(part.metadata)
    if part.image_embeddings.shape[0] != rows or (
        part.text_embeddings is not None and part.text_embeddings.shape[0] != rows
    ):
        raise ValueError(f"part {part.number}: embeddings and metadata disagree on the row count")
    paths = part_paths(folder, part.number)
    writes: list[tuple[Path, Any]] = [(paths["image"], part.image_embeddings)]
    if part.text_embeddings is not None:
        writes.append((paths["text"], part.text_embeddings))
    writes += [(paths["quarantine"], quarantine), (paths["metadata"], part.metadata)]
    for path, value in writes:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        if isinstance(value, pd.DataFrame):
            value.to_parquet(temporary, index=False)
        else:
            with temporary.open("wb") as file:
                np.save(file, np.ascontiguousarray(value, dtype=EMBEDDING_DTYPE))
        os.replace(temporary, path)


def remove_unfinished(folder: Path) -> int:
    """Delete what a crashed run left: temporary files, and files of parts whose metadata never landed."""
    removed = 0
    finished = {path.stem.removeprefix("metadata_") for path in (folder / METADATA_DIR).glob("metadata_*.parquet")}
    for directory, prefix in ((IMAGE_DIR, "img_emb_"), (TEXT_DIR, "text_emb_"), (QUARANTINE_DIR, "quarantine_")):
        for path in (folder / directory).glob("*"):
            if path.name.startswith(".") or path.stem.removeprefix(prefix) not in finished:
                path.unlink()
                removed += 1
    for path in (folder / METADATA_DIR).glob(".*.tmp"):
        path.unlink()
        removed += 1
    return removed


def write_manifest(folder: Path, manifest: IndexManifest) -> None:
    temporary = folder / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(manifest.to_json())
    os.replace(temporary, folder / MANIFEST_FILE)


def read_manifest(folder: str | Path) -> IndexManifest:
    """The manifest of a complete artifact.

    Raises:
        ClipflowError: the folder holds no index.json (not an artifact, or one whose run has not finished).
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ClipflowError(f"not a finished embedding artifact (no {MANIFEST_FILE}): {folder}")
    return IndexManifest.from_json(path.read_text())


def part_numbers(folder: str | Path) -> list[int]:
    """The finished parts, in order."""
    stems = (path.stem.removeprefix("metadata_") for path in (Path(folder) / METADATA_DIR).glob("metadata_*.parquet"))
    return sorted(int(stem) for stem in stems if stem.isdigit())


def read_parts(folder: str | Path, text: bool = False) -> Iterator[Part]:
    """Every finished part in order, one at a time (memory: one part), with its text embeddings when asked."""
    folder = Path(folder)
    for number in part_numbers(folder):
        paths = part_paths(folder, number)
        yield Part(
            number=number,
            image_embeddings=np.load(paths["image"], allow_pickle=False),
            text_embeddings=np.load(paths["text"], allow_pickle=False) if text else None,
            metadata=pd.read_parquet(paths["metadata"]),
        )


def read_quarantine(folder: str | Path) -> pd.DataFrame:
    """Every part's rejected rows in one table (row, key, source, reason)."""
    tables = [pd.read_parquet(path) for path in sorted((Path(folder) / QUARANTINE_DIR).glob("quarantine_*.parquet"))]
    tables = [table for table in tables if len(table)]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["row", "key", "source", "reason"])
