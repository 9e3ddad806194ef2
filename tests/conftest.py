import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clipflow.params import load_params

# The packaged Bento that the serving, page and load tests share.
pytest_plugins = ["tests.serving_fixtures"]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def small_params():
    """The `test` profile of the repository's params.yaml."""
    return load_params(REPO / "params.yaml", profile="test")


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
