"""The CSV tables the tools hand each other, in timm's formats: results (``python -m pipelines.evaluate``, timm's
``results-imagenet.csv`` columns) and benchmarks (``python -m pipelines.benchmark models``, timm's ``benchmark.py``
columns, with a side file ``OUT.csv.json`` naming the machine and settings). This module writes and reads them;
it imports no torch, so the light tools (compare, plot's CLI) stay light."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from pipelines.data.files import atomic_write

# timm's results-imagenet.csv columns, in its order.
RESULTS_COLUMNS = ("model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct",
                   "interpolation")
SIDE_SUFFIX = ".json"


def read_rows(paths: str | Iterable[str]) -> list[dict[str, str]]:
    """The rows of one CSV or of several, in order."""
    rows: list[dict[str, str]] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def append_rows(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows; the header is written only when the file is new or empty, and must match otherwise."""
    exists = os.path.isfile(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(columns):
            raise ValueError(f"{path} has columns {header}, not {list(columns)}: write to another file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if not exists:
            writer.writeheader()
        writer.writerows(rows)


def write_rows(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]],
               side: Mapping[str, Any] | None = None) -> None:
    """Replace ``path`` whole (columns not listed are dropped) and, given ``side``, its side file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if side is not None:
        with atomic_write(path + SIDE_SUFFIX) as tmp, open(tmp, "w") as f:
            json.dump(side, f, indent=1)


def merge(paths: Sequence[str], out: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of ``paths`` in one CSV ``out`` (which may be one of them)."""
    rows = read_rows(paths)
    write_rows(out, columns, rows)
    return rows


def read_side(path: str) -> dict[str, Any] | None:
    """A benchmark CSV's side file (machine, device, settings), or None where it was not written."""
    try:
        with open(path + SIDE_SUFFIX) as f:
            side = json.load(f)
    except (OSError, ValueError):
        return None
    return side if isinstance(side, dict) else None
