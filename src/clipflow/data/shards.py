"""WebDataset shards: `{split}/{split}-{000000}.tar` with `{key}.png`, `{key}.txt`, `{key}.json`.

This is the layout img2dataset writes and open_clip's webdataset loader reads: each split has
its own folder with a `sizes.json` (shard file name -> sample count). Shards are written under
a temporary name and renamed when complete, so a crash never leaves a half-written shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class ShardRecord:
    """One sample as stored: the encoded image, its caption and its JSON metadata."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    meta: dict


class ShardWriter:
    """Writes records into numbered tar shards of at most `shard_size` samples each."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory = Path(directory)
        self.split = split
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def current_shard(self) -> str:
        return f"{self.split}-{len(self.sizes):06d}.tar"

    def write(self, record: ShardRecord) -> str:
        """Add a record; returns the name of the shard that holds it."""
        if self._tar is None:
            self._tmp = self.directory / f".{self.current_shard}.tmp"
            self._tar = tarfile.open(self._tmp, "w")  # noqa: SIM115 - stays open across add() calls, closed by close()
            self._count = 0
        shard = self.current_shard
        add_record(self._tar, record)
        self._count += 1
        if self._count == self.shard_size:
            self._commit()
        return shard

    def close(self) -> dict[str, int]:
        """Commit the last shard and write `sizes.json`; returns it."""
        if self._tar is not None:
            self._commit()
        tmp = self.directory / f".{SIZES_FILE}.tmp"
        tmp.write_text(json.dumps(self.sizes, indent=1, sort_keys=True))
        tmp.replace(self.directory / SIZES_FILE)
        return self.sizes

    def _commit(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        name = self.current_shard
        self._tmp.replace(self.directory / name)
        self.sizes[name] = self._count
        self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)


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


def split_shards(data_dir: Path, split: str) -> list[Path]:
    """The committed shards of a split, in order, as listed by its `sizes.json`."""
    sizes_file = Path(data_dir) / split / SIZES_FILE
    if not sizes_file.is_file():
        raise FileNotFoundError(f"no {SIZES_FILE} for split {split!r} under {data_dir}")
    return [sizes_file.parent / name for name in sorted(json.loads(sizes_file.read_text()))]


@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int
    size: int


class ShardIndex:
    """Random access to the samples of tar shards without unpacking them.

    Scans tar headers once (no payload is read) and remembers where each member lies, so a
    sampler can ask for any sample by position: training shuffles and resumes exactly, and
    memory holds offsets, not images.
    """

    def __init__(self, shards: Iterable[Path]):
        self.shards = [Path(s) for s in shards]
        self.keys: list[str] = []
        by_key: dict[str, dict[str, _Member]] = {}
        for shard_number, shard in enumerate(self.shards):
            with tarfile.open(shard, "r") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.rpartition(".")
                    if key not in by_key:
                        by_key[key] = {}
                        self.keys.append(key)
                    by_key[key][ext] = _Member(shard_number, info.offset_data, info.size)
        self._members: list[dict[str, _Member]] = [by_key[k] for k in self.keys]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

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
