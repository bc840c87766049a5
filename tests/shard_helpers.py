"""Tiny real inputs for the data tests: JPEG bytes and shard splits written with the project's own writer."""
from __future__ import annotations

import io
import os

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
