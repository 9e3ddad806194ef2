"""Catalogue embeddings in clip-retrieval's layout, in a folder or under an `s3://` prefix, so its consumers read ours.

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

Every function takes the artifact's location, a folder or an `s3://bucket/prefix`, and goes through
`Location`, the one place that tells them apart. On S3 a part is written in a local scratch folder just as
in a local artifact, then uploaded file by file, the metadata last; S3 publishes an upload whole, so there
too the metadata object marks a finished part. A reader downloads one part at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from clipflow.artifacts import JsonRecord
from clipflow.errors import ClipflowError
from clipflow.storage import Store, download_file

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


class Location:
    """Where an artifact lives, a local folder or an `s3://bucket/prefix`; files are named relative to it.

    Files are always written in a local folder (`staging`) and then made the artifact's (`publish`): a local
    artifact is its own staging folder, an S3 one uploads them from scratch. Reads go through a local folder
    too (`local`): the artifact's own, or a temporary copy of the files asked for.

    Raises:
        ClipflowError: a location with another scheme (`http://`, `gs://`).
    """

    def __init__(self, root: str | Path):
        self.root = str(root)
        scheme = urlparse(self.root).scheme
        # One letter is a Windows drive, not a scheme.
        if len(scheme) > 1 and scheme != "s3":
            raise ClipflowError(f"an embedding artifact is a local folder or an s3:// prefix, not {self.root}")
        self.store = Store(self.root) if scheme == "s3" else None

    def __str__(self) -> str:
        return self.root

    def exists(self, name: str) -> bool:
        if self.store is None:
            return (Path(self.root) / name).is_file()
        with self._s3(f"reading {name} of"):
            return self.store.exists(name)

    def names(self, under: str = "") -> list[str]:
        """The files under the sub-folder `under` (every file: ""), sorted, relative to the root; [] when absent."""
        if self.store is None:
            base = Path(self.root) / under
            return sorted(path.relative_to(self.root).as_posix() for path in base.rglob("*") if path.is_file())
        with self._s3("listing"):
            return self.store.list(under)

    def read_text(self, name: str) -> str:
        if self.store is None:
            return (Path(self.root) / name).read_text()
        with self._s3(f"reading {name} of"):
            return self.store.get_bytes(name).decode()

    def write_text(self, name: str, text: str) -> None:
        """Publish `text` as `name`, whole."""
        if self.store is None:
            Store(self.root).put_bytes(text.encode(), name)  # a local Store creates its folder: built only to write
            return
        with self._s3(f"writing {name} to"):
            self.store.put_bytes(text.encode(), name)

    def remove(self, name: str) -> None:
        if self.store is None:
            (Path(self.root) / name).unlink(missing_ok=True)
            return
        with self._s3(f"removing {name} from"):
            self.store.remove(name)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A local folder to write files in before `publish`: the artifact's own, or a scratch folder for S3."""
        if self.store is None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            yield Path(self.root)
            return
        with tempfile.TemporaryDirectory(prefix="clipflow-artifact-") as scratch:
            yield Path(scratch)

    def publish(self, staged: Path, names: list[str]) -> None:
        """Make the files `names` of a `staging` folder the artifact's, one at a time in this order."""
        if self.store is None:
            return  # staged in place: they already are
        for name in names:
            with self._s3(f"uploading {name} to"):
                self.store.put_file(staged / name, name)

    @contextmanager
    def local(self, names: list[str]) -> Iterator[Path]:
        """A local folder holding the files `names`: the artifact's own, or a temporary copy of those from S3."""
        if self.store is None:
            yield Path(self.root)
            return
        with tempfile.TemporaryDirectory(prefix="clipflow-artifact-") as scratch:
            for name in names:
                with self._s3(f"downloading {name} of"):
                    download_file(self.store.uri(name), Path(scratch) / name)
            yield Path(scratch)

    @contextmanager
    def _s3(self, doing: str) -> Iterator[None]:
        """An S3 failure as one line: a missing bucket, refused credentials, an unreachable endpoint."""
        import boto3.exceptions
        import botocore.exceptions

        try:
            yield
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code") or exc
            raise ClipflowError(f"S3 error {code} {doing} {self.root}") from None
        except (botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as exc:
            raise ClipflowError(f"S3 failed {doing} {self.root}: {exc}") from None


def part_name(number: int) -> str:
    return str(number).zfill(PART_DIGITS)


def part_files(number: int) -> dict[str, str]:
    """The names of part `number`'s files, relative to the artifact's root."""
    name = part_name(number)
    return {
        "image": f"{IMAGE_DIR}/img_emb_{name}.npy",
        "text": f"{TEXT_DIR}/text_emb_{name}.npy",
        "metadata": f"{METADATA_DIR}/metadata_{name}.parquet",
        "quarantine": f"{QUARANTINE_DIR}/quarantine_{name}.parquet",
    }


def part_paths(folder: Path, number: int) -> dict[str, Path]:
    return {kind: Path(folder) / name for kind, name in part_files(number).items()}


def write_part(location: str | Path, part: Part, quarantine: pd.DataFrame) -> None:
    """Write one part atomically: every file under a temporary name, renamed into place, the metadata last."""
    rows = len(part.metadata)
    if part.image_embeddings.shape[0] != rows or (
        part.text_embeddings is not None and part.text_embeddings.shape[0] != rows
    ):
        raise ValueError(f"part {part.number}: embeddings and metadata disagree on the row count")
    names = part_files(part.number)
    writes: list[tuple[str, Any]] = [(names["image"], part.image_embeddings)]
    if part.text_embeddings is not None:
        writes.append((names["text"], part.text_embeddings))
    writes += [(names["quarantine"], quarantine), (names["metadata"], part.metadata)]
    artifact = Location(location)
    with artifact.staging() as folder:
        for name, value in writes:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            if isinstance(value, pd.DataFrame):
                value.to_parquet(temporary, index=False)
            else:
                with temporary.open("wb") as file:
                    np.save(file, np.ascontiguousarray(value, dtype=EMBEDDING_DTYPE))
            os.replace(temporary, path)
        artifact.publish(folder, [name for name, _ in writes])


def remove_unfinished(location: str | Path) -> int:
    """Delete what a crashed run left: temporary files, and files of parts whose metadata never landed."""
    artifact = Location(location)
    finished = {part_name(number) for number in part_numbers(location)}
    leftovers = []
    for directory, prefix in ((IMAGE_DIR, "img_emb_"), (TEXT_DIR, "text_emb_"), (QUARANTINE_DIR, "quarantine_")):
        for name in artifact.names(directory):
            file_name = Path(name).name
            if file_name.startswith(".") or Path(file_name).stem.removeprefix(prefix) not in finished:
                leftovers.append(name)
    leftovers += [name for name in artifact.names(METADATA_DIR) if Path(name).name.startswith(".")]
    for name in leftovers:
        artifact.remove(name)
    return len(leftovers)


def write_manifest(location: str | Path, manifest: IndexManifest) -> None:
    Location(location).write_text(MANIFEST_FILE, manifest.to_json())


def read_manifest(location: str | Path) -> IndexManifest:
    """The manifest of a complete artifact.

    Raises:
        ClipflowError: the location holds no index.json (not an artifact, or one whose run has not finished).
    """
    artifact = Location(location)
    if not artifact.exists(MANIFEST_FILE):
        raise ClipflowError(f"not a finished embedding artifact (no {MANIFEST_FILE}): {location}")
    return IndexManifest.from_json(artifact.read_text(MANIFEST_FILE))


def part_numbers(location: str | Path) -> list[int]:
    """The finished parts, in order."""
    stems = (
        name.removeprefix(f"{METADATA_DIR}/metadata_").removesuffix(".parquet")
        for name in Location(location).names(METADATA_DIR)
        if name.endswith(".parquet")
    )
    return sorted(int(stem) for stem in stems if stem.isdigit())


def read_parts(location: str | Path, text: bool = False) -> Iterator[Part]:
    """Every finished part in order, one at a time (memory and, from S3, disk: one part), with its text
    embeddings when asked."""
    artifact = Location(location)
    for number in part_numbers(location):
        names = part_files(number)
        kinds = ["image", "metadata"] + (["text"] if text else [])
        with artifact.local([names[kind] for kind in kinds]) as folder:
            paths = part_paths(folder, number)
            part = Part(
                number=number,
                image_embeddings=np.load(paths["image"], allow_pickle=False),
                text_embeddings=np.load(paths["text"], allow_pickle=False) if text else None,
                metadata=pd.read_parquet(paths["metadata"]),
            )
        yield part


def read_quarantine(location: str | Path) -> pd.DataFrame:
    """Every part's rejected rows in one table (row, key, source, reason)."""
    artifact = Location(location)
    names = [
        name
        for name in artifact.names(QUARANTINE_DIR)
        if name.startswith(f"{QUARANTINE_DIR}/quarantine_") and name.endswith(".parquet")
    ]
    with artifact.local(names) as folder:
        tables = [pd.read_parquet(folder / name) for name in names]
    tables = [table for table in tables if len(table)]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["row", "key", "source", "reason"])
