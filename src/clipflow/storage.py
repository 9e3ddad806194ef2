"""The one local/S3/HTTP layer: a store of files under a root, whole-tree copies, reading sources with limits.

S3 goes through boto3, which takes `AWS_ENDPOINT_URL` (MinIO, SeaweedFS) and credentials from
the environment. A file is only ever made visible whole: locally by renaming a finished
temporary file, on S3 by a single upload, which S3 publishes atomically when it completes.

Sources (images, manifests, shards) are untrusted: `fetch`, `fetch_file` and `open_stream` read
regular files only, and `fetch` and `fetch_file` stop one chunk past a byte cap and at a deadline.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from clipflow.errors import ClipflowError

_S3_CLIENTS: dict[tuple, object] = {}
# What boto3 reads from the environment to build a client: a client built from other values
# would sign with stale credentials or talk to another endpoint.
S3_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
)


def s3_client(timeout_s: float | None = None):
    """One boto3 S3 client per process, environment (endpoint, credentials) and timeout.

    Clients must not cross a fork, and one built before the credentials or the endpoint changed
    would keep using the old ones. `timeout_s` bounds connecting and each read, as
    `data.http_timeout_s` does for HTTP; None keeps botocore's 60 s, for the step's own outputs.
    """
    # Hashed, so that the cache's keys hold no secret.
    environment = tuple(hashlib.sha256(os.environ.get(name, "").encode()).hexdigest() for name in S3_CLIENT_ENV)
    slot = (os.getpid(), environment, timeout_s)
    if slot not in _S3_CLIENTS:
        import boto3
        from botocore.config import Config

        for stale in [other for other in _S3_CLIENTS if other[:2] != slot[:2]]:
            del _S3_CLIENTS[stale]
        config = Config(connect_timeout=timeout_s, read_timeout=timeout_s) if timeout_s else None
        # A session of its own: boto3's default session keeps the first credentials it resolved.
        _S3_CLIENTS[slot] = boto3.session.Session().client("s3", config=config)
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
    """How much of one source object to read, and for how long.

    `timeout_s` bounds connecting and each network read of one attempt. A source that sends a
    byte now and then never trips it, so the whole fetch also ends at `deadline_s`: the time that
    every attempt would take to time out in full, with the pauses between them.
    """

    max_bytes: int
    timeout_s: float
    retries: int
    name: str = "data.max_image_bytes"  # the parameter behind `max_bytes`, for the reasons that name it
    # The only hosts an http(s) fetch may reach, each redirect's too, and then nothing but http(s);
    # None: any source. For URLs a client names, which must not reach the server's own network.
    hosts: frozenset[str] | None = None

    def pause_s(self, attempt: int) -> float:
        """The pause before attempt number `attempt` (the first retry is 1): backing off, at most 2 s."""
        return min(0.2 * 2**attempt, 2.0)

    @property
    def deadline_s(self) -> float:
        return self.timeout_s * (self.retries + 1) + sum(self.pause_s(a) for a in range(1, self.retries + 1))


_CHUNK = 1 << 16
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # Windows has neither the flag nor named pipes among files

_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def fetch(uri: str, limits: FetchLimits) -> bytes:
    """The bytes of a local file, an `s3://` object or an `http(s)://` URL, at most `max_bytes`.

    Raises:
        FetchError: missing, not a regular file, too large, past the deadline, an unsupported
            scheme, or a network failure after retries.
    """
    buffer = io.BytesIO()
    _fetch_into(uri, limits, buffer)
    return buffer.getvalue()


def fetch_file(uri: str, target: Path, limits: FetchLimits) -> Path:
    """`fetch` into the file `target`, which appears only whole; for objects too large to hold in memory.

    Raises:
        FetchError: as `fetch`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as sink:
            _fetch_into(uri, limits, sink)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@contextmanager
def open_stream(uri: str, timeout_s: float | None = None) -> Iterator[BinaryIO]:
    """A local regular file or an `s3://` object as a stream to read front to back, such as a tar shard.

    Args:
        timeout_s: for S3, the most a connect or one read may wait.

    Raises:
        FetchError: missing, not a regular file, or S3 refused or unreachable, also while it
            is read (a dropped connection, a read that timed out).
    """
    if not is_s3(uri):
        with os.fdopen(_open_regular(uri)[0], "rb") as handle:
            yield handle
        return
    bucket, key = split_s3(uri)
    with _s3_problems(uri):
        body = s3_client(timeout_s).get_object(Bucket=bucket, Key=key)["Body"]
    with closing(body):
        yield _S3Stream(body, uri)


class _S3Stream:
    """An S3 object's body whose read errors are the FetchError a row is quarantined with."""

    def __init__(self, body, uri: str) -> None:
        self.body, self.uri = body, uri

    def read(self, size: int = -1) -> bytes:
        with _s3_problems(self.uri):
            return self.body.read(None if size < 0 else size)


def _fetch_into(uri: str, limits: FetchLimits, sink: BinaryIO) -> None:
    deadline = time.monotonic() + limits.deadline_s
    scheme = urlparse(uri).scheme.lower()
    if limits.hosts is not None and scheme not in {"http", "https"}:
        raise FetchError(f"only http:// and https:// URLs may be fetched here, not {scheme or 'local'!r} ones")
    if scheme == "s3":
        _fetch_s3(uri, limits, sink, deadline)
    elif scheme in {"http", "https"}:
        _fetch_http(uri, limits, sink, deadline)
    elif scheme in {"", "file"} or len(scheme) == 1:  # a Windows drive letter is a path, not a scheme
        _fetch_local(uri[7:] if scheme == "file" else uri, limits, sink, deadline)
    else:
        raise FetchError(f"unsupported URI scheme {scheme!r}: only local paths, s3://, http:// and https://")


def _drain(chunks: Iterable[bytes], sink: BinaryIO, limits: FetchLimits, deadline: float, what: str) -> None:
    """Copy `chunks` into `sink`, stopping one chunk past `max_bytes` or at the deadline, whatever size was declared."""
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limits.max_bytes:
            raise FetchError(f"{what} exceeds {limits.name}={limits.max_bytes}")
        if time.monotonic() > deadline:
            raise FetchError(f"{what} not complete after {limits.deadline_s:g} s (the deadline of one fetch)")
        sink.write(chunk)


def _open_regular(path: str) -> tuple[int, int]:
    """A read-only descriptor of the regular file at `path`, and its size.

    Raises:
        FetchError: missing, a directory, or anything else that is not a regular file: a device
            never ends and a named pipe waits for a writer, so neither is ever read.
    """
    try:
        _require_regular(os.stat(path), path)
        # Should a pipe take the file's place after the stat, opening it must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
        try:
            info = os.fstat(fd)
            _require_regular(info, path)
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size
    except FileNotFoundError:
        raise FetchError(f"file not found: {path}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None


def _require_regular(info: os.stat_result, path: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise FetchError(f"a directory, not a file: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise FetchError(f"not a regular file ({_NOT_REGULAR.get(stat.S_IFMT(info.st_mode), 'special')}): {path}")


def _fetch_local(path: str, limits: FetchLimits, sink: BinaryIO, deadline: float) -> None:
    fd, size = _open_regular(path)
    try:
        if size > limits.max_bytes:
            raise FetchError(f"file is {size} bytes, more than {limits.name}={limits.max_bytes}")
        # The size was a promise only: a file that grows after the stat is still cut off.
        _drain(iter(partial(os.read, fd, _CHUNK), b""), sink, limits, deadline, "file")
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


@contextmanager
def _s3_problems(uri: str) -> Iterator[None]:
    """botocore's errors as the FetchError a row is quarantined with."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"NoSuchKey", "404", "NotFound"}:
            raise FetchError(f"S3 object not found: {uri}") from None
        if code == "NoSuchBucket":
            raise FetchError(f"S3 bucket not found: {uri}") from None
        raise FetchError(f"S3 error {code} reading {uri}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise FetchError(f"S3 unreachable reading {uri}: {exc}") from None


def _fetch_s3(uri: str, limits: FetchLimits, sink: BinaryIO, deadline: float) -> None:
    bucket, key = split_s3(uri)
    with _s3_problems(uri):
        response = s3_client(limits.timeout_s).get_object(Bucket=bucket, Key=key)
        with closing(response["Body"]) as body:
            if response["ContentLength"] > limits.max_bytes:
                raise FetchError(
                    f"S3 object is {response['ContentLength']} bytes, more than {limits.name}={limits.max_bytes}"
                )
            _drain(body.iter_chunks(_CHUNK), sink, limits, deadline, "S3 object")


def _check_host(limits: FetchLimits, request) -> None:
    if limits.hosts is not None and request.url.host not in limits.hosts:
        raise FetchError(f"{request.url.host!r} is not a host that may be fetched from")


def _fetch_http(url: str, limits: FetchLimits, sink: BinaryIO, deadline: float) -> None:
    import httpx

    problem = ""
    attempt = 0
    while attempt <= limits.retries:
        if attempt:
            time.sleep(limits.pause_s(attempt))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        attempt += 1
        sink.seek(0)
        sink.truncate()
        try:
            # httpx follows redirects only to http(s) URLs; a redirect loop ends after five hops.
            client = httpx.Client(
                timeout=min(limits.timeout_s, remaining),
                follow_redirects=True,
                max_redirects=5,
                event_hooks={"request": [partial(_check_host, limits)]},  # called for every hop
            )
            # identity: a compressed body could inflate a thousandfold between two checks of its size.
            with client, client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code >= 500:
                    problem = f"HTTP {response.status_code}"
                    continue
                if response.status_code != 200:
                    raise FetchError(f"HTTP {response.status_code} from {url}")
                declared = int(response.headers.get("content-length") or 0)
                if declared > limits.max_bytes:
                    raise FetchError(f"HTTP body is {declared} bytes, more than {limits.name}={limits.max_bytes}")
                _drain(response.iter_bytes(), sink, limits, deadline, "HTTP body")
                return
        except httpx.TimeoutException:
            problem = f"timed out after {limits.timeout_s:g} s"
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects from {url}") from None
        except httpx.UnsupportedProtocol:
            raise FetchError(f"redirected to an unsupported scheme from {url}") from None
        except httpx.InvalidURL as exc:  # no HTTPError: a port that is no number, say
            raise FetchError(f"invalid URL {url[:200]}: {exc}") from None
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
    raise FetchError(f"{problem} ({attempt} attempts) fetching {url}")
