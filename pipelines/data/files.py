"""Files that are replaced whole: a reader, a crash or a full disk sees the old content or the new, never half of
one. The new content goes to a temporary name next to the file, is flushed to disk, then renamed over it."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """The temporary name to write ``path``'s new content to, with any writer (``open``, safetensors, tarfile).
    When the block ends, the file is synced and renamed over ``path``; when it raises, the file is removed and
    ``path`` keeps what it held."""
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)
