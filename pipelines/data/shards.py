"""Write WebDataset shards (``{split}-{index:06d}.tar`` + ``_info.json``) that timm's ``wds/`` reader reads.

    python -m pipelines.data.shards imagefolder SRC OUT [--split train] [--labels FILE --classes-from OUT_OR_INFO]
    python -m pipelines.data.shards fashion-mnist SRC OUT

A shard holds the original encoded bytes (``KEY.jpg`` / ``KEY.png`` / ``KEY.webp``) and ``KEY.cls`` (the integer
label as ascii). The sample order is a seeded shuffle of the sorted source listing, cut into shards of
``--shard-size`` samples: this plan is deterministic, so a re-run on a half-written ``OUT`` keeps every shard that
matches its plan, rewrites the rest, and gives a byte-identical result. Tar headers carry no time, user or
mode of the writer for the same reason. Each shard is written under a temporary name and renamed when
complete; ``_info.json`` is merged (other splits are kept) and replaced atomically under a lock. Each split
records its ``source`` (command and folder), so a folder that holds another dataset (another class list) is
named and refused before any file in it is touched.
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import io
import json
import multiprocessing as mp
import os
import random
import re
import struct
import sys
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from pipelines.data.files import TMP_SUFFIX, atomic_write, atomic_write_text
from pipelines.data.progress import progress as show_progress

# The shard folder format this module writes; pipelines.data.loader reads it by the same names.
INFO_NAME = "_info.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL format -> shard member extension (the keys timm's reader looks for: 'jpg;png;webp')
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "validation": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Item:
    """One planned sample: ``ref`` is what the source's loader reads (a path, or an index into an array)."""
    key: str
    ref: object
    label: int


@dataclass
class Source:
    """A split to write: planned items, class names, and how to turn a ref into (encoded bytes, member ext)."""
    split: str
    items: list[Item]
    classes: list[str]
    load: Callable[[object], tuple[bytes, str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing
    origin: str = ""  # command and source folder, recorded in _info.json to name the dataset a folder holds


@dataclass
class WriteResult:
    split: str
    shards: int
    samples: int
    written: int  # samples in the shards written by this run (the rest were kept from an earlier run)
    skipped: int
    kept_shards: int
    seconds: float
    info_path: str


# ----------------------------------------------------------------------------------------------------------
# pure helpers: the plan, names, tar bytes


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(items: Sequence[Item], shard_size: int, seed: int) -> list[list[Item]]:
    """Seeded shuffle of ``items`` (given in a deterministic order), cut into shards of ``shard_size``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def sample_key(index: int, name: str) -> str:
    """Unique, dot-free key (WebDataset splits a member name at its first dot): plan index + original stem."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` to ``path`` reproducibly (no time, owner or mode of the writer in the headers)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def tar_keys(path: str) -> list[str] | None:
    """Member names of a complete tar, or None when it is unreadable or truncated. Reads headers only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            with tarfile.open(fileobj=f, mode="r:") as tar:
                names = [m.name for m in tar.getmembers()]
                end = tar.offset
    except (OSError, tarfile.TarError, EOFError):
        return None
    # a complete archive ends with two zero blocks, padded to whole records
    expected = -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    return names if size == expected else None


def shard_is_complete(path: str, planned: Sequence[Item]) -> int | None:
    """Samples in an existing shard when it is complete and matches its plan (planned keys, in order, each
    with ``cls`` and one image; planned items may be missing: they were skipped as unreadable), else None."""
    names = tar_keys(path)
    if names is None or len(names) % 2:
        return None
    planned_keys = [item.key for item in planned]
    position = {key: i for i, key in enumerate(planned_keys)}
    last = -1
    for i in range(0, len(names), 2):
        key_a, ext_a = names[i].split(".", 1)
        key_b, ext_b = names[i + 1].split(".", 1)
        if key_a != key_b or key_a not in position or position[key_a] <= last:
            return None
        if ext_a != "cls" or ext_b not in FORMAT_EXT.values():
            return None
        last = position[key_a]
    return len(names) // 2


# ----------------------------------------------------------------------------------------------------------
# validating and loading images


def check_image(data: bytes) -> str:
    """Member extension for encoded image bytes; raises ValueError naming why they are not a usable image.

    PIL's ``verify()`` parses headers (and PNG chunk CRCs) without decoding; it does not notice a truncated
    JPEG, so a JPEG must also end with its end-of-image marker (allowing a little trailing padding)."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if fmt not in FORMAT_EXT:
        raise ValueError(f"unsupported image format {fmt} (shards hold JPEG, PNG or WEBP)")
    if fmt == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return FORMAT_EXT[fmt]


def load_file(path: object) -> tuple[bytes, str]:
    with open(str(path), "rb") as f:
        data = f.read()
    return data, check_image(data)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# sources


def load_class_list(path: str) -> list[str]:
    """Class list from an ``_info.json`` or a directory holding one."""
    info_path = os.path.join(path, INFO_NAME) if os.path.isdir(path) else path
    with open(info_path) as f:
        info = json.load(f)
    if "classes" not in info:
        raise ValueError(f"{info_path} has no 'classes' list")
    return list(info["classes"])


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def imagefolder_source(src: str, split: str, classes: list[str] | None = None,
                       labels_file: str | None = None) -> Source:
    """``SRC/<class>/<image>``, or a flat ``SRC/<image>`` with ``labels_file`` lines ``filename label-or-wnid``.

    ``classes`` fixes the label indices (the train split's list, so a validation split agrees); without it the
    sorted class folder names (or the sorted class names in the label file) are the classes."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} is not a directory")
    skipped: list[tuple[str, str]] = []
    entries: list[tuple[str, str]] = []  # (path, class name or integer label as text)
    if labels_file:
        table: dict[str, str] = {}
        with open(labels_file) as f:
            for line_no, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{labels_file}:{line_no}: want 'filename label-or-wnid', got {line.strip()!r}")
                table[parts[0]] = parts[1]
                table.setdefault(os.path.splitext(parts[0])[0], parts[1])
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if not os.path.isfile(path):
                continue
            label = table.get(name, table.get(os.path.splitext(name)[0]))
            if label is None:
                skipped.append((path, f"no label in {labels_file}"))
            else:
                entries.append((path, label))
    else:
        folders = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
        if not folders:
            raise ValueError(f"{src} has no class folders; for a flat folder give --labels FILE")
        for folder in folders:
            for name in sorted(os.listdir(os.path.join(src, folder))):
                path = os.path.join(src, folder, name)
                if os.path.isfile(path):
                    entries.append((path, folder))

    def is_index(label: str) -> bool:  # a label file may give integer indices instead of class names
        return bool(labels_file) and label.isdigit() and label not in index

    index = {name: i for i, name in enumerate(classes or [])}
    if classes is None:
        classes = sorted({label for _, label in entries if not is_index(label)})
        index = {name: i for i, name in enumerate(classes)}
    items: list[Item] = []
    for path, label in entries:
        if not _is_image_name(path):
            skipped.append((path, "not an image file name"))
            continue
        if label in index:
            value = index[label]
        elif is_index(label):
            value = int(label)
            if index and value >= len(index):
                raise ValueError(f"{path}: label {value} outside 0..{len(index) - 1}")
        else:
            raise ValueError(f"{path}: class {label!r} is not in the class list ({len(index)} classes)")
        items.append(Item(sample_key(len(items), path), path, value))
    if not classes:  # integer labels and no list given: name the classes by their index
        classes = [str(i) for i in range(max((it.label for it in items), default=-1) + 1)]
    return Source(split, items, list(classes), load_file, skipped, f"imagefolder {os.path.abspath(src)}")


def _find_idx(src: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{src} has neither {stem} nor {stem}.gz (Debian: apt-get install dataset-fashion-mnist)")


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png_from(images: np.ndarray, ref: object) -> tuple[bytes, str]:
    return png_bytes(np.ascontiguousarray(images[int(ref)])), "png"


def fashion_mnist_sources(src: str) -> list[Source]:
    sources = []
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        images = read_idx(_find_idx(src, images_stem))
        labels = read_idx(_find_idx(src, labels_stem))
        if len(images) != len(labels):
            raise ValueError(f"{src}: {len(images)} {split} images but {len(labels)} labels")
        items = [Item(sample_key(i, f"{split}_{i}"), i, int(label)) for i, label in enumerate(labels)]
        sources.append(Source(split, items, list(FASHION_MNIST_CLASSES), partial(_png_from, images),
                              origin=f"fashion-mnist {os.path.abspath(src)}"))
    return sources


# ----------------------------------------------------------------------------------------------------------
# writing


# The source's loader reaches writer processes by fork (set before the pool starts), not by pickling: it may
# hold a whole idx image array.
_LOAD: Callable[[object], tuple[bytes, str]] | None = None


def _set_loader(load: Callable[[object], tuple[bytes, str]]) -> None:
    global _LOAD
    _LOAD = load


def _write_shard(task: tuple) -> tuple[int, int, list[tuple[str, str]]]:
    """Write one planned shard to a temporary name, rename it; returns (index, samples, skipped)."""
    out, split, index, items = task
    load = _LOAD
    members: list[tuple[str, bytes]] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        try:
            data, ext = load(item.ref)
        except (OSError, ValueError) as exc:
            skipped.append((str(item.ref), str(exc)))
            continue
        members.append((f"{item.key}.cls", str(item.label).encode("ascii")))
        members.append((f"{item.key}.{ext}", data))
    final = os.path.join(out, shard_name(split, index))
    with atomic_write(final) as tmp:
        write_tar(tmp, members)
    return index, len(members) // 2, skipped


def _clean_stale(out: str, split: str, num_shards: int) -> None:
    """Remove this split's temporary files and shards beyond the plan (left by an earlier, larger plan)."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar({re.escape(TMP_SUFFIX)}\d*)?$")
    for name in os.listdir(out):
        match = pattern.match(name)
        if match and (match.group(2) or int(match.group(1)) >= num_shards):
            os.remove(os.path.join(out, name))


def read_folder_info(out: str, fix: str = "write into another folder") -> dict | None:
    """``OUT/_info.json`` parsed, or None when the folder holds none yet; ValueError ending with ``fix`` when
    it is unreadable (the one reader of the format: the loaders use it too)."""
    path = os.path.join(out, INFO_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); {fix}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a shard folder's _info.json; {fix}")
    return info


def describe_dataset(info: dict) -> str:
    """The dataset a folder holds, in a few words: where its splits came from, its classes, its splits."""
    splits = info.get("splits", {})
    origins = sorted({entry.get("source") for entry in splits.values() if entry.get("source")})
    classes = list(info.get("classes") or [])
    shown = ", ".join(map(str, classes[:3])) + (", ..." if len(classes) > 3 else "")
    parts = [f"{len(classes)} classes: {shown}",
             "splits " + ", ".join(f"{name} ({entry.get('num_samples', '?')} samples)"
                                   for name, entry in sorted(splits.items()))]
    return (f"{' and '.join(origins)} (" if origins else "another dataset (") + "; ".join(parts) + ")"


def check_target(out: str, sources: Sequence[Source], hint: str) -> None:
    """Refuse, before a file is touched, to write ``sources`` into a folder that holds another dataset (another
    class list): its shards would be overwritten and its ``_info.json`` could not describe both."""
    info = read_folder_info(out)
    if info is None or info.get("classes") is None:
        return
    for source in sources:
        if list(source.classes) != list(info["classes"]):
            raise ValueError(f"{out} holds {describe_dataset(info)}, not {source.origin} ({len(source.classes)} "
                             f"classes); nothing was written: {hint}")


def update_info(out: str, split: str, split_info: dict, classes: list[str]) -> str:
    """Merge one split into ``OUT/_info.json`` (other splits kept), atomically and under a file lock."""
    path = os.path.join(out, INFO_NAME)
    lock = os.open(out, os.O_RDONLY)  # flock on the folder itself: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info: dict = {}
        if os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
        if info.get("classes") not in (None, classes):
            raise ValueError(f"{path} holds a different class list ({len(info['classes'])} classes) than split "
                             f"{split!r} ({len(classes)}): another run wrote into {out} meanwhile")
        info["classes"] = classes
        info["num_classes"] = len(classes)
        info.setdefault("splits", {})[split] = split_info
        info["splits"] = dict(sorted(info["splits"].items()))
        atomic_write_text(path, json.dumps(info, indent=1) + "\n")
    finally:
        os.close(lock)
    return path


def write_split(source: Source, out: str, *, shard_size: int = 1000, workers: int | None = None, seed: int = 0,
                progress: bool = True, log: Callable[[str], None] = print) -> WriteResult:
    """Write ``source`` as shards under ``out`` (resuming a half-written run) and merge it into _info.json."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    plan = plan_shards(source.items, shard_size, seed)
    _clean_stale(out, source.split, len(plan))
    lengths = [0] * len(plan)
    todo = []
    for index, items in enumerate(plan):
        done = shard_is_complete(os.path.join(out, shard_name(source.split, index)), items)
        if done is None:
            todo.append((out, source.split, index, items))
        else:
            lengths[index] = done
    kept = len(plan) - len(todo)
    if kept:
        log(f"{source.split}: resuming, {kept} of {len(plan)} shards already complete")
    for path, reason in source.skipped:
        log(f"skipped {path}: {reason}")
    skipped = len(source.skipped) + sum(len(items) - lengths[i] for i, items in enumerate(plan) if lengths[i])
    bar = show_progress(total=sum(len(t[3]) for t in todo), unit="img", desc=source.split, disable=not progress)
    _set_loader(source.load)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(todo) > 1 else None
    try:
        results = pool.imap_unordered(_write_shard, todo) if pool else map(_write_shard, todo)
        for index, count, bad in results:
            lengths[index] = count
            skipped += len(bad)
            for path, reason in bad:
                bar.write(f"skipped {path}: {reason}")
            bar.update(len(plan[index]))
        bar.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    split_info = {
        "name": source.split,
        "num_samples": sum(lengths),
        "filenames": [shard_name(source.split, i) for i in range(len(plan))],
        "shard_lengths": lengths,
        "source": source.origin,
    }
    info_path = update_info(out, source.split, split_info, source.classes)
    written = sum(lengths[t[2]] for t in todo)
    return WriteResult(source.split, len(plan), sum(lengths), written, skipped, kept, time.perf_counter() - start,
                       info_path)


def summary(result: WriteResult) -> str:
    rate = result.written / result.seconds if result.seconds > 0 else float("inf")
    return (f"{result.split}: {result.shards} shards ({result.kept_shards} kept from an earlier run), "
            f"{result.samples} samples ({result.written} written), {result.skipped} skipped, "
            f"{result.seconds:.1f} s, {rate:,.0f} images/s, "
            f"info: {result.info_path}")


# ----------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="source folder")
    common.add_argument("out", help="output folder for shards and _info.json")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="writer processes (default: cpu count)")
    common.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle before sharding")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bar (or progress lines, when the output is not a terminal)")
    folder = sub.add_parser("imagefolder", parents=[common], help="SRC/<class>/<image> or flat SRC + --labels")
    folder.add_argument("--split", default="train", help="split name (default train)")
    folder.add_argument("--labels", help="label file for a flat folder: lines 'filename label-or-wnid'")
    folder.add_argument("--classes-from", help="OUT folder or _info.json whose class list fixes label indices "
                                               "(default: OUT/_info.json when it exists)")
    sub.add_parser("fashion-mnist", parents=[common],
                   help="Fashion-MNIST idx files (e.g. /usr/share/datasets/fashion-mnist)")
    return parser


def plan_sources(args: argparse.Namespace) -> list[Source]:
    """The splits to write, checked against what ``OUT`` already holds; nothing is written here."""
    other_folder = "write into another folder (or empty this one first)"
    if args.command == "fashion-mnist":
        sources = fashion_mnist_sources(args.src)
        check_target(args.out, sources, other_folder)
        return sources
    if args.classes_from is None and read_folder_info(args.out) is not None:
        try:  # the folder's own class list fixes the label indices (a validation split agrees with train)
            sources = [imagefolder_source(args.src, args.split, load_class_list(args.out), args.labels)]
        except ValueError as exc:
            raise ValueError(f"{exc}; {args.out} holds {describe_dataset(read_folder_info(args.out))}; nothing "
                             f"was written: {other_folder}") from None
        print(f"class list ({len(sources[0].classes)} classes) from {args.out}")
        return sources
    classes = load_class_list(args.classes_from) if args.classes_from else None
    if args.classes_from:
        print(f"class list ({len(classes)} classes) from {args.classes_from}")
    sources = [imagefolder_source(args.src, args.split, classes, args.labels)]
    check_target(args.out, sources, f"{other_folder}, or take its class list with --classes-from {args.out}"
                 if args.classes_from else other_folder)
    return sources


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sources = plan_sources(args)
    except (OSError, ValueError) as exc:  # a user's mistake: one line, exit 2, no file touched
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for source in sources:
        result = write_split(source, args.out, shard_size=args.shard_size, workers=args.workers, seed=args.seed,
                             progress=not args.no_progress)
        print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
