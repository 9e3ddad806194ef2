"""Real servers for tests, bound to 127.0.0.1 and always stopped: SeaweedFS (S3), MLflow, `bentoml serve`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
S3_ACCESS_KEY = "clipflow-test"
S3_SECRET_KEY = "clipflow-test-secret"  # a throwaway credential of a server that lives for one test session


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What boto3, MLflow and DVC need to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
        )


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[S3Server]:
    """`weed server` with its S3 gateway; every port pinned to 127.0.0.1, telemetry off."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    identity = {"name": "clipflow", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    command = [str(BIN / "weed"), "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, port in ports.items():
        command += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    command += ["-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    # Room for what one test session stores: 16 volumes of 64 MB filled up with the models it logs
    # to MLflow, and the next upload failed ("No writable volumes") while MLflow's client retried.
    command += ["-master.volumeSizeLimitMB=64", "-volume.max=100"]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    with _running(command, workdir / "weed.log", os.environ.copy(), stop_grace_s=5) as process:
        server = S3Server(endpoint)
        _wait(lambda: _s3_ready(server), process, workdir / "weed.log", "SeaweedFS S3")
        yield server


@contextlib.contextmanager
def mlflow_server(
    workdir: Path, s3: S3Server | None = None, bucket: str = "mlflow", store: Path | None = None
) -> Iterator[str]:
    """`mlflow server` on a sqlite store; yields its URL.

    Args:
        workdir: the server's folder (its log; the store and local artifacts by default).
        s3: where new artifacts go (a bucket); None: `workdir/artifacts`.
        bucket: the bucket, created on `s3`.
        store: an existing sqlite file to serve, as after `make run` (default: a fresh `workdir/mlflow.db`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    artifacts = str(workdir / "artifacts")
    if s3 is not None:
        s3.client().create_bucket(Bucket=bucket)
        env |= s3.env
        artifacts = f"s3://{bucket}/artifacts"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store or workdir / 'mlflow.db'}"]
    command += ["--artifacts-destination", artifacts]
    url = f"http://127.0.0.1:{port}"
    with _running(command, workdir / "mlflow.log", env, stop_grace_s=10) as process:
        _wait(lambda: _http_ok(f"{url}/health"), process, workdir / "mlflow.log", "mlflow server")
        yield url


@contextlib.contextmanager
def _running(command: list[str], log_path: Path, env: dict[str, str], stop_grace_s: float):
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        # SeaweedFS ignores SIGTERM for seconds and mlflow forks workers: stop the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=stop_grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _wait(ready, process: subprocess.Popen, log_path: Path, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {process.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _s3_ready(server: S3Server) -> bool:
    import botocore.exceptions

    try:
        server.client().list_buckets()
        return True
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free port of 127.0.0.1 from a thread; yields the URL; always shuts down."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


READY_TIMEOUT_S = 180  # bentoml serve imports torch in the CLI and the worker: slow on a busy two-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(command: list[str], port: int, env: dict[str, str], cwd: Path) -> Iterator[str]:
    """Run a `bentoml serve` command until /readyz answers; yield its URL; always stop it.

    Fails the test with the server's log when it exits or is not ready in time.
    """
    log_path = cwd / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while not _ready(url):
            if process.poll() is not None or time.monotonic() - start > READY_TIMEOUT_S:
                pytest.fail(f"bentoml serve not ready (exit {process.poll()}):\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        _stop(process)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server, then SIGKILL its process group (circus workers included) if it lingers."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
