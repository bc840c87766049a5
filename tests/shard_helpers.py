"""Tiny real inputs for the data tests: JPEG bytes, shard splits written with the project's own writer, and
Fashion-MNIST's IDX files."""
from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
from PIL import Image

from pipelines.data import shards


def jpeg_bytes(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_split(root, split: str, lengths: list[int], *, label_is_shard: bool = True, corrupt=(),
                num_classes: int | None = None) -> list[str]:
    """Shards of 32x32 JPEGs, sample ``s:i`` of shard ``s`` labelled ``s`` (so a target tells its shard).
    ``corrupt``: (shard, sample) pairs whose JPEG bytes are garbage. Merges into ``root/_info.json``."""
    os.makedirs(root, exist_ok=True)
    names = []
    for s, n in enumerate(lengths):
        members = []
        for i in range(n):
            label = s if label_is_shard else i % 10
            image = b"\xff\xd8 not really a jpeg" if (s, i) in corrupt else jpeg_bytes(s * 100 + i)
            members += [(f"s{s:03d}_{i:03d}.cls", str(label).encode()), (f"s{s:03d}_{i:03d}.jpg", image)]
        names.append(shards.shard_name(split, s))
        shards.write_tar(os.path.join(root, names[-1]), members)
    classes = [str(c) for c in range(num_classes or len(lengths))]
    shards.update_info(str(root), split, {"name": split, "num_samples": sum(lengths), "filenames": names,
                                          "shard_lengths": lengths}, classes)
    return names


def write_idx(path, array: np.ndarray) -> None:
    """A gzipped IDX file (the Fashion-MNIST download's format) of a uint8 array."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_mnist_idx(src, n_train: int = 30, n_test: int = 10) -> None:
    """A tiny Fashion-MNIST download folder (random images, labels 0..9 in turn)."""
    rng = np.random.default_rng(0)
    src.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
