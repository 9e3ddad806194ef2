"""A real Milvus server for tests: `milvus-lite server` on 127.0.0.1, a free port and its own data folder."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import process_group
from tests.support.servers import free_port

MILVUS_LITE = Path(sys.executable).parent / "milvus-lite"
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class MilvusServer:
    uri: str  # what `index.uri` takes: http://127.0.0.1:PORT
    data_dir: Path
    pid: int


@contextlib.contextmanager
def milvus_lite_server(workdir: Path, port: int | None = None) -> Iterator[MilvusServer]:
    """Serve the Milvus Lite folder `workdir/milvus.db` (created when new) on `port` (default: a free one) until
    the block ends; the server (its process group) is killed by PID.

    Ready once its gRPC port accepts connections; fails with the server's log when it exits first.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    data_dir = workdir / "milvus.db"
    log_path = workdir / f"milvus-{port}.log"
    command = [str(MILVUS_LITE), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log, process_group(command, stdout=log, stderr=log) as process:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite server did not start (exit {process.poll()}):\n{log_path.read_text()}")
            time.sleep(0.2)
        yield MilvusServer(uri=f"http://127.0.0.1:{port}", data_dir=data_dir, pid=process.pid)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0
