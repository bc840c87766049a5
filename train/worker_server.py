"""Imported by the DataLoader workers' fork server when it starts (``train.workers``), and nowhere else: it ties the
server, and every worker it forks, to its parent's life.

``PR_SET_PDEATHSIG``: the kernel sends SIGKILL to a process when its parent exits, however it exits. The server's
parent is the rank; a worker's is the server. Without it a rank killed by SIGKILL would leave the server and its
last workers waiting for each other for good (each worker holds the server's liveness pipe open, and waits for the
server to go). A process whose parent is already gone when it asks exits at once. Linux only (elsewhere this does
nothing: use ``data.worker_start=fork`` there).
"""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent exits; exit now if the parent ``parent`` is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "prctl"):
        return
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(0)


die_with_parent(os.getppid())  # the server (a rank that died before this line: the server sees its pipe close)
_server = os.getpid()
os.register_at_fork(after_in_child=lambda: die_with_parent(_server))  # each worker it forks
