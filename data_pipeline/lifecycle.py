"""Helper processes die with the process that started them.

A DataLoader worker (or a ``prepare`` encoder) whose parent is SIGKILLed gets no message: it
can stay blocked for hours writing into the dead parent's queue (the queue's pipe is full and its
read end is still open in the worker itself). ``die_with_parent`` in the child's initializer asks
Linux for SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``), and exits at once when the
parent is already gone (it died between the fork and the prctl call).

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, so start helper processes
from a thread that lives as long as they should (the trainer's main thread does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, *_: Any) -> None:
    """In a child process: be killed when ``parent_pid`` dies; exit now if it already has.

    Usable as a ``worker_init_fn`` (``functools.partial(die_with_parent, os.getpid())``; the
    worker id that DataLoader passes is ignored) or a pool initializer.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: fall back to the parent check only
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
