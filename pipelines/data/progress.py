"""Progress on long work: tqdm's bar on a terminal, plain lines (at most one every ``every_s`` seconds, and one at the
end) when the output is a pipe or a log file, where a redrawn bar would pile up carriage returns."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO


class PlainProgress:
    """The part of tqdm's interface the commands use (``update``, ``write``, ``close``, iteration), as lines like
    ``train: 1,200/5,000 img (24%), 310 img/s``."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, file: TextIO | None = None, every_s: float = 30.0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.file, self.every_s = disable, file or sys.stderr, every_s
        self.n, self.start = 0, time.monotonic()
        self.last = self.start
        self.closed = False

    def line(self) -> str:
        rate = self.n / max(time.monotonic() - self.start, 1e-9)
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct}, {rate:,.0f} {self.unit}/s"

    def _print(self, text: str) -> None:
        if not self.disable:
            print(text, file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(self.line())

    def write(self, text: str) -> None:
        """A message, printed even when the progress itself is disabled (as tqdm's ``write``)."""
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        """The last line; call it when the work completed (a failure's own message then stands alone)."""
        if not self.closed:
            self.closed = True
            self._print(self.line())

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, file: TextIO | None = None):
    """tqdm on a terminal, ``PlainProgress`` elsewhere (same arguments)."""
    file = file or sys.stderr
    if not disable and file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file)
