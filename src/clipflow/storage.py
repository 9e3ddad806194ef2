"""The one local/S3 layer: a store of files under a root, whole-tree copies, and reading one object with limits.

S3 goes through boto3, which takes `AWS_ENDPOINT_URL` (MinIO, SeaweedFS) and credentials from
the environment. A file is only ever made visible whole: locally by renaming a finished
temporary file, on S3 by a single upload, which S3 publishes atomically when it completes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clipflow.errors import ClipflowError

_S3_CLIENTS: dict[tuple[int, str | None], object] = {}


def s3_client():
    """One boto3 S3 client per process and endpoint (clients must not cross a fork)."""
    slot = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"))
    if slot not in _S3_CLIENTS:
        import boto3

        _S3_CLIENTS.clear()
        _S3_CLIENTS[slot] = boto3.client("s3")
    return _S3_CLIENTS[slot]


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ClipflowError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


class Store:
    """A flat namespace of files under a root: a local folder or an `s3://bucket/prefix`."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self.is_s3 = is_s3(self.root)
        if self.is_s3:
            self.bucket, self.prefix = split_s3(self.root)
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put_file(self, local: Path, name: str) -> None:
        """Publish a finished local file as `name`; the local file is consumed."""
        if self.is_s3:
            s3_client().upload_file(str(local), self.bucket, self._key(name))
            Path(local).unlink()
        else:
            target = Path(self.root) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)

    def put_bytes(self, payload: bytes, name: str) -> None:
        """Publish `payload` as `name`, durably: a local file is on disk before it takes the name."""
        if self.is_s3:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(name), Body=payload)
            return
        target = Path(self.root) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # mkstemp's 0600 would hide the file from other nodes' users
        os.replace(tmp.name, target)

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A folder for files on their way in: inside a local root, so that a rename publishes them."""
        if self.is_s3:
            with tempfile.TemporaryDirectory(prefix="clipflow-") as tmp:
                yield Path(tmp)
            return
        path = Path(self.root) / name
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def get_bytes(self, name: str) -> bytes:
        if self.is_s3:
            return s3_client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        return (Path(self.root) / name).read_bytes()

    def exists(self, name: str) -> bool:
        if not self.is_s3:
            return (Path(self.root) / name).is_file()
        import botocore.exceptions

        try:
            s3_client().head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def list(self, under: str = "") -> list[str]:
        """Names of the files under a sub-folder, relative to the root, sorted."""
        if not self.is_s3:
            base = Path(self.root) / under
            return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        names = []
        prefix = f"{self._key(under.rstrip('/'))}/" if under else (f"{self.prefix}/" if self.prefix else "")
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names += [item["Key"][len(self.prefix) :].lstrip("/") for item in page.get("Contents", [])]
        return sorted(names)

    def remove(self, name: str) -> None:
        """Remove one file, if it is there."""
        if self.is_s3:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(name))
        else:
            (Path(self.root) / name).unlink(missing_ok=True)

    def delete(self, under: str) -> None:
        """Remove a sub-folder and everything in it."""
        if not self.is_s3:
            shutil.rmtree(Path(self.root) / under, ignore_errors=True)
            return
        for name in self.list(under):
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(name))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def read_object(uri: str, what: str) -> bytes:
    """The bytes of one `s3://` object; `what` names it in the error when it is missing.

    Raises:
        ClipflowError: no such object.
    """
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise ClipflowError(f"{what} not found: {uri}") from None


def download_file(uri: str, target: Path) -> Path:
    """Copy one `s3://` object to `target`, which appears whole: every process of a node may fetch at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    s3_client().download_file(*split_s3(uri), str(tmp))
    os.replace(tmp, target)
    return target


def download_tree(uri: str, dest: str | Path) -> int:
    """Copy every object under the `s3://` folder `uri` into `dest`, keeping relative paths; returns the count.

    Raises:
        ClipflowError: nothing is stored under `uri`.
    """
    source = Store(uri)
    names = source.list()
    for name in names:
        download_file(source.uri(name), Path(dest) / name)
    if not names:
        raise ClipflowError(f"nothing stored under {uri}")
    return len(names)


def upload_tree(src: str | Path, uri: str) -> int:
    """Copy every file under the folder `src` to the `s3://` folder `uri`; returns the count."""
    target = Store(uri)
    files = [path for path in sorted(Path(src).rglob("*")) if path.is_file()]
    for path in files:
        s3_client().upload_file(str(path), *split_s3(target.uri(path.relative_to(src).as_posix())))
    return len(files)


class FetchError(Exception):
    """A source object could not be read; the message is the quarantine reason."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout_s: float
    retries: int


def fetch(uri: str, limits: FetchLimits) -> bytes:
    """The bytes of a local file, an `s3://` object or an `http(s)://` URL, at most `max_bytes`.

    Raises:
        FetchError: missing, too large, an unsupported scheme, or a network failure after retries.
    """
    scheme = urlparse(uri).scheme.lower()
    if scheme == "s3":
        return _fetch_s3(uri, limits)
    if scheme in {"http", "https"}:
        return _fetch_http(uri, limits)
    if scheme in {"", "file"} or len(scheme) == 1:  # a Windows drive letter is a path, not a scheme
        return _fetch_local(uri[7:] if scheme == "file" else uri, limits)
    raise FetchError(f"unsupported URI scheme {scheme!r}: only local paths, s3://, http:// and https://")


def _fetch_local(path: str, limits: FetchLimits) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limits.max_bytes:
            raise FetchError(f"file is {size} bytes, more than data.max_image_bytes={limits.max_bytes}")
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise FetchError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise FetchError(f"a directory, not a file: {path}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None


def _fetch_s3(uri: str, limits: FetchLimits) -> bytes:
    import botocore.exceptions

    bucket, key = split_s3(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] > limits.max_bytes:
            response["Body"].close()
            raise FetchError(
                f"S3 object is {response['ContentLength']} bytes, more than data.max_image_bytes={limits.max_bytes}"
            )
        return response["Body"].read()
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"NoSuchKey", "404", "NotFound"}:
            raise FetchError(f"S3 object not found: {uri}") from None
        if code == "NoSuchBucket":
            raise FetchError(f"S3 bucket not found: {uri}") from None
        raise FetchError(f"S3 error {code} reading {uri}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise FetchError(f"S3 unreachable reading {uri}: {exc}") from None


def _fetch_http(url: str, limits: FetchLimits) -> bytes:
    import httpx

    attempts = limits.retries + 1
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.2 * 2**attempt, 2.0))
        try:
            # httpx follows redirects only to http(s) URLs; a redirect loop ends after five hops.
            client = httpx.Client(timeout=limits.timeout_s, follow_redirects=True, max_redirects=5)
            with client, client.stream("GET", url) as response:
                if response.status_code >= 500:
                    problem = f"HTTP {response.status_code}"
                    continue
                if response.status_code != 200:
                    raise FetchError(f"HTTP {response.status_code} from {url}")
                declared = int(response.headers.get("content-length") or 0)
                if declared > limits.max_bytes:
                    raise FetchError(
                        f"HTTP body is {declared} bytes, more than data.max_image_bytes={limits.max_bytes}"
                    )
                body = bytearray()
                for piece in response.iter_bytes():
                    body += piece
                    if len(body) > limits.max_bytes:
                        raise FetchError(f"HTTP body exceeds data.max_image_bytes={limits.max_bytes}")
                return bytes(body)
        except httpx.TimeoutException:
            problem = f"timed out after {limits.timeout_s:g} s"
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects from {url}") from None
        except httpx.UnsupportedProtocol:
            raise FetchError(f"redirected to an unsupported scheme from {url}") from None
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
    raise FetchError(f"{problem} ({attempts} attempts) fetching {url}")
