"""How a rank's DataLoader workers start (``data.worker_start``), and why not by forking the rank.

A rank is a threaded process. Its collectives' C++ threads (gloo's ``pt_gloo_runloop``; NCCL's watchdog does the
same job, not observed here) release the tensors of a finished collective, and releasing one whose Python object
Python already dropped takes the GIL from that thread: CPython creates a thread state for it, under the runtime's
lock and without the GIL (seen with gdb: ``ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork ->
TensorImpl::decref_pyobject -> gil_scoped_acquire -> PyThreadState_New``). A ``fork()`` at that instant copies the
lock held, and CPython before 3.13 takes that lock in the child before resetting it (``PyOS_AfterFork_Child ->
_PyEval_ReInitThreads -> _PyThreadState_DeleteExcept``; fixed upstream by gh-116522): the new worker hangs for good
and the rank waits for it. On this project's 2-core machine one of 19 runs of 2 ranks x 8 epochs (32 worker forks a
run) hung so, at the fork of an epoch's eval loader.

``forkserver`` (the default): workers are forked from multiprocessing's fork server, a process with no thread but
its main one when it forks (numpy's OpenBLAS pool, started by the preload, is stopped by OpenBLAS's own fork
handler), started once per rank by this module with the data library preloaded, so a worker starts as fast as a
forked one (~0.1 s; the server itself takes seconds once). The server is started with the stop signals blocked, so
it and every worker it forks ignore SLURM's SIGTERM as forked workers do (``train.signals``), and
``train.worker_server`` ties both to their parent's life: a rank that dies, even by SIGKILL, leaves no process
behind.
``fork``: torch's default (what the stand-alone tools use: they have no such threads). ``spawn``: a fresh
interpreter per worker and epoch (seconds each).
"""
from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from typing import Optional

from train import signals

WORKER_STARTS = ("forkserver", "fork", "spawn")
# imported by the fork server when it starts: its own exit-with-parent first, then what a worker runs
FORKSERVER_PRELOAD = ["train.worker_server", "pipelines.data.loader"]


def context(start: str) -> Optional[BaseContext]:
    """The ``multiprocessing_context`` for ``DataLoader`` (None: torch's default, fork); starts the fork server."""
    if start not in WORKER_STARTS:
        raise ValueError(f"worker start must be one of {', '.join(WORKER_STARTS)}, got {start!r}")
    if start == "fork":
        return None
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        # Both helpers keep the mask they start with, and the workers inherit the server's. The resource tracker
        # first, on its own: starting it unblocks SIGTERM in this process (multiprocessing's bpo-33613 guard),
        # which would otherwise leave the server, started next, without the block.
        with signals.blocked():
            resource_tracker.ensure_running()
        with signals.blocked():
            forkserver.ensure_running()
    return ctx
