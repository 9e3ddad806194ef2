"""Training processes end with the process that started them, even one killed outright.

`clipflow train` starts torchrun, and torchrun starts each worker in a session of its own, so
no signal to the launcher or its process group reaches them: a SIGKILLed launcher (an OOM
kill, a supervisor giving up) used to leave torchrun and its workers training to the end, for
nobody. Linux's parent-death signal has the kernel signal a process when its parent ends:
torchrun gets SIGTERM when the launcher ends, and stops its workers as it does on Ctrl-C; a
worker gets SIGKILL when torchrun ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Loaded up front: the child of a fork calls it before exec, where loading a library is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def end_with_parent(sig: signal.Signals, parent: int) -> None:
    """Have the kernel send `sig` to this process when its parent ends (on Linux; elsewhere a no-op).

    The kernel watches the parent's thread that started this process, so that thread must live
    as long as the parent does: `clipflow train` starts torchrun from its main thread, and
    torchrun starts its workers from its own.

    Args:
        sig: the signal to receive.
        parent: the parent's pid as this process knew it before asking: if the parent has
            already gone by then, `sig` comes at once.

    Raises:
        OSError: the kernel refused the request.
    """
    if _LIBC is None:
        return
    if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
