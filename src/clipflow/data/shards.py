"""WebDataset shards: `{split}/{split}-{000000}.tar` with `{key}.png`, `{key}.txt`, `{key}.json`.

This is the layout img2dataset writes and open_clip's webdataset loader reads: each split has
its own folder with a `sizes.json` (shard file name -> sample count). Shards are written under
a temporary name and renamed when complete, so a crash never leaves a half-written shard.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from clipflow.artifacts import SIZES_FILE
from clipflow.errors import ClipflowError


@dataclass(frozen=True)
class ShardRecord:
    """One sample as stored: the encoded image, its caption and its JSON metadata."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    meta: dict


def add_record(tar: tarfile.TarFile, record: ShardRecord) -> None:
    """Append one sample's three members to an open tar."""
    _add(tar, f"{record.key}.{record.image_ext}", record.image)
    _add(tar, f"{record.key}.txt", record.caption.encode())
    _add(tar, f"{record.key}.json", json.dumps(record.meta, sort_keys=True).encode())


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def split_sizes(data_dir: Path, split: str) -> dict[Path, int]:
    """The committed shards of a split, in order, with their sample counts, as its `sizes.json` lists them."""
    sizes_file = Path(data_dir) / split / SIZES_FILE
    if not sizes_file.is_file():
        raise FileNotFoundError(f"no {SIZES_FILE} for split {split!r} under {data_dir}")
    sizes = json.loads(sizes_file.read_text())
    return {sizes_file.parent / name: sizes[name] for name in sorted(sizes)}


def split_shards(data_dir: Path, split: str) -> list[Path]:
    """The committed shards of a split, in order, as listed by its `sizes.json`."""
    return list(split_sizes(data_dir, split))


class _Member(NamedTuple):
    shard: int
    offset: int
    size: int


TAR_BLOCK = 512
_END_BLOCK = bytes(TAR_BLOCK)
_FILE_TYPES = (b"0", b"\0")
_DIRECTORY_TYPE = b"5"


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, offset of the data, size) of each regular file in a tar, in the archive's order.

    A plain ustar archive (what ingest's `ChunkWriter`, webdataset and GNU tar write for short ASCII
    names) is walked header by header in a memory map: tarfile, which builds a TarInfo per
    member, took 1.8 s per training process for the 76,800 headers of 25,600 samples. Anything
    else (pax or GNU long-name headers, links, a bad checksum, a missing end) goes to tarfile,
    which reads it or raises `tarfile.ReadError`.
    """
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size >= TAR_BLOCK:
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
                members = _ustar_members(view)
            if members is not None:
                return members
    with tarfile.open(path, "r") as tar:
        return [(info.name, info.offset_data, info.size) for info in tar if info.isfile()]


def _ustar_members(view: mmap.mmap) -> list[tuple[str, int, int]] | None:
    """The members of a plain ustar archive, or None at the first header this walk does not handle."""
    members = []
    headers, checksums = [], []
    position, end = 0, len(view)
    while position + TAR_BLOCK <= end:
        header = view[position : position + TAR_BLOCK]
        if header == _END_BLOCK:
            return members if _checksums_match(view, headers, checksums) else None
        size = _octal(header[124:136])
        checksum = _octal(header[148:156])
        if header[257:262] != b"ustar" or size is None or checksum is None:
            return None
        headers.append(position)
        checksums.append(checksum)
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        # tarfile's rules: an untyped member named with a trailing slash is an old-style directory,
        # and a non-empty prefix field holds the start of a long name.
        if kind in _FILE_TYPES and not (kind == b"\0" and name.endswith(b"/")):
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
            members.append((name.decode("utf-8", "surrogateescape"), position + TAR_BLOCK, size))
        elif kind not in (_DIRECTORY_TYPE, b"\0"):
            return None
        position += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return None


def _checksums_match(view: mmap.mmap, headers: list[int], checksums: list[int]) -> bool:
    """Each header's checksum: the sum of its bytes with the checksum field read as 8 spaces.

    Summed for all headers at once: a Python sum per header cost more than the walk itself.
    """
    blocks = np.frombuffer(view, dtype=np.uint8, count=len(view) // TAR_BLOCK * TAR_BLOCK).reshape(-1, TAR_BLOCK)
    header_blocks = blocks[np.asarray(headers, dtype=np.int64) // TAR_BLOCK]  # headers start on block bounds
    computed = header_blocks.sum(1, dtype=np.int64) - header_blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * ord(" ")
    return bool(np.array_equal(computed, np.asarray(checksums, dtype=np.int64)))


def _octal(field: bytes) -> int | None:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:  # base-256 sizes of huge members, or garbage
        return None


class ShardIndex:
    """Random access to the samples of tar shards without unpacking them.

    Scans tar headers once (no payload is read) and remembers where each member lies, so a
    sampler can ask for any sample by position: training shuffles and resumes exactly, and
    memory holds offsets, not images.
    """

    def __init__(self, shards: Iterable[Path]):
        self.shards = [Path(s) for s in shards]
        self.keys: list[str] = []
        self.samples_per_shard: list[int] = []
        by_key: dict[str, dict[str, _Member]] = {}
        for shard_number, shard in enumerate(self.shards):
            found_before = len(self.keys)
            for name, offset, size in tar_members(shard):
                key, _, ext = name.rpartition(".")
                if key not in by_key:
                    by_key[key] = {}
                    self.keys.append(key)
                by_key[key][ext] = _Member(shard_number, offset, size)
            self.samples_per_shard.append(len(self.keys) - found_before)
        self._members: list[dict[str, _Member]] = [by_key[k] for k in self.keys]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def of_split(cls, data_dir: Path, split: str) -> ShardIndex:
        """The index of a split's shards, each holding as many samples as `sizes.json` says it does.

        tarfile ends a listing at a damaged header without an error: a shard that lost samples
        that way is refused instead of trained or evaluated on short.
        """
        sizes = split_sizes(data_dir, split)
        index = cls(sizes)
        for shard, found in zip(index.shards, index.samples_per_shard, strict=True):
            if found != sizes[shard]:
                raise ClipflowError(
                    f"shard {shard} holds {found} samples where {SIZES_FILE} lists {sizes[shard]}:"
                    " it is damaged or was replaced"
                )
        return index

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int, ext: str) -> bytes:
        member = self._members[index].get(ext)
        if member is None:
            raise KeyError(f"sample {self.keys[index]} has no .{ext}")
        handle = self._handle(member.shard)
        handle.seek(member.offset)
        return handle.read(member.size)

    def image_ext(self, index: int) -> str:
        for ext in ("png", "jpg", "jpeg", "webp"):
            if ext in self._members[index]:
                return ext
        raise KeyError(f"sample {self.keys[index]} has no image")

    def _handle(self, shard: int):
        # File handles must not be shared across a fork (DataLoader workers).
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - a per-process cache of readers
        return self._handles[shard]
