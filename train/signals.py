"""Stop requests: SIGUSR1 and SIGTERM only set a flag; the training loop reads it at its next update boundary,
where every rank saves a checkpoint and the trainer exits 3.

SLURM (scancel, pre-emption, the time limit) and ``timeout`` send SIGTERM to every process of the job step,
DataLoader workers included. A worker that dies of it makes the main process raise before it can save, so the
workers never see the stop signals: they are blocked (``shielded``) while a loader forks its workers, and a
forked child keeps its parent's signal mask. A signal that arrives meanwhile stays pending and is handled when
the mask is restored.

Standard library only: ``python -m train`` installs the handlers before it imports torch (seconds of start-up
during which the default action, death with no checkpoint, would otherwise apply).
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_first: Optional[tuple[str, float]] = None  # (signal name, time.monotonic() when it arrived)

T = TypeVar("T")


def _handle(signum: int, frame) -> None:
    global _first
    if _first is None:
        _first = (signal.Signals(signum).name, time.monotonic())


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


def requested() -> bool:
    return _first is not None


def received() -> Optional[tuple[str, float]]:
    """The first stop signal of this process and when it arrived (``time.monotonic``), or None."""
    return _first


@contextmanager
def blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def shielded(iterable: Iterable[T]) -> Iterator[T]:
    """Iterates ``iterable`` with the stop signals blocked during its first step, where a DataLoader forks its
    workers (they inherit the mask and so ignore the stop signals for their whole life)."""
    it = iter(iterable)
    with blocked():
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it
