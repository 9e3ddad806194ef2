"""Subprocesses that a test starts and always stops, with everything they started themselves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def process_group(command: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """`command` in a session of its own; on leaving, whatever is left of its process group is killed.

    A test that fails, or a launcher that dies, must not leave torchrun workers or ingest workers
    running into the next test: killing only the top process would.
    """
    process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group has ended already
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
