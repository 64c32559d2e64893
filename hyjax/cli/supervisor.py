"""Each process of a multi-process run trains in a child process that a light parent watches.

When a process of a multi-process run dies, a survivor inside a collective sees the collective fail
and the training command prints its one-line "lost contact" message (exit 3). A survivor elsewhere
(computing, or waiting on JAX's coordination service) never sees a Python exception: once the dead
process has been silent for the heartbeat timeout, or at once when the dead process is the coordinator,
JAX's distributed client ends it from C++ with SIGABRT, its own fatal message and a stack trace. The
parent passes the child's output through untouched and, when the child ends by SIGABRT, prints the same
one-line message and exits 3, so every survivor ends the same way.

The parent forwards SIGINT and SIGTERM (the child runs in its own process group, so a terminal's Ctrl-C
reaches it once, through the parent), and the child dies with the parent (Linux's parent-death signal),
so a scheduler that kills the parent leaves no training process behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

SUPERVISED = "HYJAX_SUPERVISED"  # set in the child's environment: the parent's process id
_PR_SET_PDEATHSIG = 1


def is_child() -> bool:
    """Whether this process is the supervised child of a `python -m hyjax.train` parent."""
    return bool(os.environ.get(SUPERVISED))


def die_with_parent() -> None:
    """In the child: asks Linux to SIGKILL this process when the parent dies, and exits at once if the
    parent is already gone (it died before the request took effect). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(os.environ[SUPERVISED]):
        os._exit(3)


def run(argv: list[str], aborted_message: str) -> int:
    """Runs `python -m hyjax.train *argv` as a child and returns its exit code, printing
    `aborted_message` on stderr and returning 3 when the child ends by SIGABRT (the distributed
    runtime ending it because another process died). Another signal `s` returns 128 + s, as a shell does."""
    child = subprocess.Popen([sys.executable, "-m", "hyjax.train", *argv], process_group=0,
                             env={**os.environ, SUPERVISED: str(os.getpid())})

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == -signal.SIGABRT:
        print(aborted_message, file=sys.stderr, flush=True)
        return 3
    return 128 - code if code < 0 else code
