"""Train and eval loaders over the shards written by ``python -m pipelines.data.shards``.

Train (timm / open_clip pattern, made deterministic): each epoch the full shard list is shuffled with a seed
shared by all ranks (``seed``, ``epoch``), split by global worker id (``rank * num_workers + worker_id``), read
through a sample shuffle buffer, decoded, transformed and batched inside the loader workers. Every worker yields
a fixed number of batches (it re-reads its own shards when they run short), so every rank yields exactly
``floor(num_samples / (batch_size * world_size))`` batches and no rank waits at the end of an epoch.
``resampled=True`` draws shards with replacement instead, seeded by (seed, epoch, rank, worker).

Eval: shards are dealt to global workers in order, no shuffle, no padding: across any number of ranks and
workers every sample is read exactly once; each worker keeps its last partial batch.

Bad data is skipped and counted: a corrupt sample (bad image bytes, no image member), a tar read error (a member
cut short), a shard that ends before the sample count ``_info.json`` lists for it (cut at a member boundary,
where the tar reader sees a clean end), and a shard given up because not one of its samples decodes (a train
worker re-reads its shards to fill its quota: such a shard is read once, not again; a worker left with no
decodable shard fails with a one-line ``DataError``). The counts ride along with the batches to the main
process, so ``ShardLoader.stats`` is exact for this rank. Each worker logs its first ``WARN_LIMIT`` problems of
an epoch one by one, then one line saying the rest are only counted, so a bad shard cannot flood the log. A
missing ``_info.json``, split or shard, or too few shards for the readers fail (``DataError``) in
``create_*_loader``, before any worker starts; shards that do not end like a complete tar are named there in a
warning.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data.augment import DeviceRandAugment
from pipelines.data.decode import BatchFinish, DeviceDecoder, DraftCropDecoder
from pipelines.data.shards import FORMAT_EXT, INFO_NAME, read_folder_info

_logger = logging.getLogger(__name__)

IMAGE_KEYS = tuple(FORMAT_EXT.values())  # the members an image may be stored as, in the order they are looked for
TAR_END = 2 * 512  # a complete tar ends with two zero blocks (then zero padding to a whole record)
WARN_LIMIT = 10  # problems each worker logs one by one per epoch; the rest are counted
# A worker that sends no batch for this long is taken as stuck and the loader raises, so a run crashes (and
# resumes when restarted) instead of waiting forever. Seen: workers forked from the threaded trainer stuck in
# PyOS_AfterFork_Child (the trainer now starts them from a fork server: train/workers.py). Far above any batch's
# decode time, even on slow storage.
WORKER_TIMEOUT_S = 600
COUNT_KEYS = ("corrupt_skipped", "shard_read_errors", "short_samples", "shards_given_up")


class DataError(ValueError):
    """A shard folder that cannot be read as asked; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# pure math: who reads which shard, how many batches


def num_readers(world_size: int, num_workers: int) -> int:
    """Global number of shard readers; a loader with 0 workers still reads in its main process."""
    return world_size * max(1, num_workers)


def assign_shards(shards: Sequence[str], epoch: int, seed: int, rank: int, world_size: int, num_workers: int,
                  worker_id: int, *, shuffle: bool = True) -> list[str]:
    """The shards global worker ``rank * num_workers + worker_id`` reads this epoch.

    The permutation depends only on (seed, epoch), so all ranks agree on it and the readers' slices are
    disjoint and cover every shard once. With ``shuffle=False`` (eval) the order is the given one."""
    order = list(shards)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    workers = max(1, num_workers)
    return order[rank * workers + worker_id::num_readers(world_size, num_workers)]


def resample_shards(shards: Sequence[str], epoch: int, seed: int, rank: int, worker_id: int) -> Iterator[str]:
    """Endless draw with replacement, seeded by (seed, epoch, rank, worker): never by pid or time."""
    rng = random.Random(f"resample:{seed}:{epoch}:{rank}:{worker_id}")
    while True:
        yield shards[rng.randrange(len(shards))]


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Train batches per epoch on every rank (drop last): the same number on all ranks."""
    return num_samples // (batch_size * world_size)


def batches_per_worker(rank_batches: int, num_workers: int, worker_id: int) -> int:
    """This worker's share of its rank's batches: a DataLoader takes batches from its workers in turn."""
    workers = max(1, num_workers)
    return rank_batches // workers + (1 if worker_id < rank_batches % workers else 0)


def eval_batches(shard_lengths: dict[str, int], shards: Sequence[str], batch_size: int, rank: int,
                 world_size: int, num_workers: int) -> int:
    """Eval batches on ``rank``: each worker batches its own shards and keeps its last partial batch."""
    total = 0
    for worker_id in range(max(1, num_workers)):
        mine = assign_shards(shards, 0, 0, rank, world_size, num_workers, worker_id, shuffle=False)
        total += math.ceil(sum(shard_lengths[s] for s in mine) / batch_size)
    return total


def check_readers(data_dir: str, split: str, num_shards: int, world_size: int, num_workers: int) -> None:
    readers = num_readers(world_size, num_workers)
    if num_shards < readers:
        raise DataError(
            f"{data_dir} split {split!r} has {num_shards} shards but {world_size} ranks x {max(1, num_workers)} "
            f"workers = {readers} readers need at least {readers}: re-shard with a smaller --shard-size "
            f"(python -m pipelines.data.shards ... --shard-size N), lower data.num_workers, or draw shards with "
            f"replacement: --set data.resampled=true")


# ----------------------------------------------------------------------------------------------------------
# _info.json and start-up checks


def read_info(data_dir: str) -> dict:
    """The parsed ``_info.json`` of a shard folder."""
    try:
        info = read_folder_info(data_dir, fix=f"re-run python -m pipelines.data.shards on {data_dir}")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if info is None:
        raise DataError(
            f"{os.path.join(data_dir, INFO_NAME)} not found: {data_dir} holds no shards written by "
            f"pipelines.data.shards; "
            f"create them with 'python -m pipelines.data.shards imagefolder SRC {data_dir}' or "
            f"'python -m pipelines.data.shards fashion-mnist SRC {data_dir}'")
    return info


def tar_end_ok(f) -> bool:
    """Whether an open tar file ends like a complete archive (two zero blocks): one seek and one small read,
    so every shard of ImageNet is checked at start. A tar cut at a member boundary fails it; the tar reader
    would see a clean end there and read the shard short without a word."""
    size = os.fstat(f.fileno()).st_size
    if size < 512 + TAR_END or size % 512:
        return False
    f.seek(size - TAR_END)
    return not f.read(TAR_END).strip(b"\0")


def check_split(data_dir: str, split: str) -> int:
    """The number of shards of a split; fails (``DataError``) when the split, its ``_info.json`` or one of its
    shards is missing."""
    return len(_split_shards(data_dir, split, check_ends=False)[0])


def _split_shards(data_dir: str, split: str, *, check_ends: bool = True) -> tuple[list[str], dict[str, int], int]:
    """(shard paths, samples per shard path, samples in the split); every shard checked there and, with
    ``check_ends``, checked to end like a complete tar (a warning names those that do not)."""
    info = read_info(data_dir)
    splits = info.get("splits", {})
    if split not in splits:
        raise DataError(f"split {split!r} not in {os.path.join(data_dir, INFO_NAME)} (has {sorted(splits)}); "
                        f"write it with python -m pipelines.data.shards ... --split {split}")
    entry = splits[split]
    shards = [os.path.join(data_dir, name) for name in entry["filenames"]]
    if not shards:
        raise DataError(f"{data_dir} split {split!r} has no shards")
    cut = []
    for path in shards:
        try:
            with open(path, "rb") as f:
                if check_ends and not tar_end_ok(f):
                    cut.append(os.path.basename(path))
        except OSError as exc:
            raise DataError(f"shard {path} of split {split!r} is missing or unreadable ({exc.strerror}); re-run "
                            f"python -m pipelines.data.shards on {data_dir} to rewrite it") from None
    if cut:
        shown = ", ".join(cut[:3]) + (f" and {len(cut) - 3} more" if len(cut) > 3 else "")
        _logger.warning(f"{len(cut)} shard(s) of {data_dir} split {split!r} do not end like a complete tar (cut "
                        f"short): {shown}; their samples up to the cut are read and the missing ones counted as "
                        f"short_samples; re-run python -m pipelines.data.shards on {data_dir} to rewrite them")
    return shards, dict(zip(shards, entry["shard_lengths"])), int(entry["num_samples"])


def _mean_std(mean, std, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if mean is None:
        mean = IMAGENET_DEFAULT_MEAN if in_chans == 3 else (sum(IMAGENET_DEFAULT_MEAN) / 3,)
    if std is None:
        std = IMAGENET_DEFAULT_STD if in_chans == 3 else (sum(IMAGENET_DEFAULT_STD) / 3,)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    # timm's RandAugment fills with the mean: a 3-value fill on an 'L' image raises in PIL
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values for in_chans={in_chans}, got {mean} / {std}")
    return mean, std


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with 0 bits kept (a black image, as older Pillow gave): Pillow 13 rejects bits=0,
    which timm's 'PosterizeIncreasing' reaches whenever magnitude noise (mstd) lifts the level to its max."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, *, in_chans: int = 3, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                    re_prob: float = 0.25, hflip: float = 0.5, scale: tuple = (0.08, 1.0),
                    interpolation: str = "bicubic", mean=None, std=None):
    """timm's training transform (RandomResizedCrop, flip, RandAugment, normalize, random erasing)."""
    mean, std = _mean_std(mean, std, in_chans)
    transform = create_transform(img_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                 hflip=hflip, scale=scale, interpolation=interpolation, mean=mean, std=std)
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


# ----------------------------------------------------------------------------------------------------------
# the per-worker stream


def decode_full(data: bytes, mode: str) -> Image.Image:
    """The whole image, decoded and converted to ``mode``."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert(mode)


def concat_encoded(encoded: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of encoded images as one uint8 tensor and their lengths: one shared-memory block per batch."""
    flat = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
    return flat, torch.tensor([len(e) for e in encoded], dtype=torch.int64)


def stack_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, in a worker straight into shared memory (as DataLoader's default collate does): the
    batch then crosses to the main process without another copy."""
    out = None
    if get_worker_info() is not None:
        storage = images[0]._typed_storage()._new_shared(len(images) * images[0].numel())
        out = images[0].new(storage).resize_(len(images), *images[0].shape)
    return torch.stack(images, out=out)


def _encoded(data: bytes) -> bytes:
    return data


# data.decode=gpu: the workers pass the encoded bytes through, one block per batch
_BYTES_CODEC = dict(decode=_encoded, transform=_encoded, collate=concat_encoded)


def _check_decode(decode: str) -> None:
    if decode not in ("cpu", "gpu"):
        raise ValueError(f"data.decode must be 'cpu' or 'gpu', got {decode!r}")


class _ShardStream(IterableDataset):
    """Yields (images, targets, counts of bad data since the last yield, in ``COUNT_KEYS`` order) for one epoch."""

    def __init__(self, shards: list[str], shard_lengths: dict[str, int], *, train: bool, batch_size: int,
                 transform, image_mode: str, rank: int, world_size: int, num_workers: int, seed: int = 0,
                 rank_batches: int = 0, resampled: bool = False, shuffle_buffer: int = 0, decode=None,
                 collate=stack_batch):
        super().__init__()
        self.decode = decode or functools.partial(decode_full, mode=image_mode)
        self.collate = collate
        self.shards, self.shard_lengths = shards, shard_lengths
        self.train, self.batch_size, self.transform, self.image_mode = train, batch_size, transform, image_mode
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.rank_batches, self.resampled, self.shuffle_buffer = rank_batches, resampled, shuffle_buffer
        self.epoch = 0
        self._reset()

    def _reset(self) -> None:
        """Per worker and epoch: counts since the last batch, the warning budget, the shards already judged."""
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        self._warnings = 0
        self._judged: dict[str, bool] = {}  # shard -> holds a decodable sample (train: judged on its first read)

    def _warn(self, msg: str, *args) -> None:
        self._warnings += 1
        if self._warnings <= WARN_LIMIT:
            _logger.warning(msg, *args)
        if self._warnings == WARN_LIMIT:
            _logger.warning("%d data problems in this worker this epoch: further ones are counted (the epoch "
                            "line's data counts), not logged", WARN_LIMIT)

    def _handler(self, exc: Exception) -> bool:
        self._counts["shard_read_errors"] += 1
        self._warn("skipping unreadable shard data: %r", exc)
        return True

    def _decode(self, sample: dict) -> tuple[Any, int]:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_KEYS)}); has {sorted(sample)}")
        target = int(sample["cls"])
        return self.decode(data), target  # bad or truncated bytes raise here

    def _decoded(self, samples) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in samples:
            try:
                img, target = self._decode(sample)
            except Exception as exc:  # PIL raises many types for bad bytes
                self._counts["corrupt_skipped"] += 1
                self._warn("skipping corrupt sample %s in %s: %r", sample.get("__key__"), sample.get("__url__"), exc)
                continue
            yield self.transform(img), target  # a transform error is a bug, not bad data: it raises

    def _decodable(self, samples: list[dict]) -> bool:
        # the draft decoder draws its crop while decoding: this trial decode must not shift the draws
        state = random.getstate()
        try:
            for sample in samples:
                try:
                    self._decode(sample)
                    return True
                except Exception:  # counted and logged when the sample itself reaches _decoded
                    pass
            return False
        finally:
            random.setstate(state)

    def _train_shards(self, worker_id: int) -> Iterator[str]:
        if self.resampled:
            pool = self.shards
            candidates = resample_shards(pool, self.epoch, self.seed, self.rank, worker_id)
        else:  # own shards, re-read when they hold fewer samples than this worker's batch quota
            pool = assign_shards(self.shards, self.epoch, self.seed, self.rank, self.world_size, self.num_workers,
                                 worker_id)
            candidates = itertools.chain.from_iterable(itertools.repeat(pool))
        if not pool:
            raise DataError(f"train worker {worker_id} on rank {self.rank} has no shard to read")
        for url in candidates:
            if self._judged.get(url, True):
                yield url
            elif all(self._judged.get(u) is False for u in pool):
                raise DataError(f"no decodable sample in the shards of train worker {worker_id} on rank "
                                   f"{self.rank} ({', '.join(map(os.path.basename, pool))}): rewrite them with "
                                   f"python -m pipelines.data.shards")

    def __iter__(self):
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        self._reset()
        if self.train:
            if info is not None:  # augmentation randomness is per (seed, epoch, rank, worker), like the order
                state = random.Random(f"augment:{self.seed}:{self.epoch}:{self.rank}:{worker_id}").getrandbits(32)
                random.seed(state)
                np.random.seed(state)
                torch.manual_seed(state)
            quota = batches_per_worker(self.rank_batches, self.num_workers, worker_id)
            samples = self._read(self._train_shards(worker_id), judge=True)
            if self.shuffle_buffer > 1:  # shuffles encoded bytes: samples left in the buffer cost no decode
                rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker_id}")
                samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
            yield from self._batches(self._decoded(samples), quota)
        else:
            mine = assign_shards(self.shards, 0, 0, self.rank, self.world_size, self.num_workers, worker_id,
                                 shuffle=False)
            yield from self._batches(self._decoded(self._read(iter(mine), judge=False)), None)

    def _read(self, shard_iter, *, judge: bool) -> Iterator[dict]:
        """The samples of each shard in turn, each shard's count checked against ``_info.json``. With ``judge``,
        a shard read for the first time is held until one of its samples decodes (usually its first: one extra
        decode per shard); a shard with none is given up, never read again."""
        for url in shard_iter:
            read, held = 0, []
            for sample in wds.tarfile_to_samples(handler=self._handler)([{"url": url}]):
                read += 1
                if judge and url not in self._judged:
                    held.append(sample)
                    if not self._decodable(held[-1:]):
                        continue
                    self._judged[url] = True
                    yield from held
                    held = []
                    continue
                yield sample
            expected = self.shard_lengths.get(url)
            if expected is not None and read < expected:
                self._counts["short_samples"] += expected - read
                self._warn("shard %s ended after %d of its %d samples (_info.json shard_lengths): cut short; "
                           "rewrite it with python -m pipelines.data.shards", url, read, expected)
            if judge and url not in self._judged:
                self._judged[url] = False
                self._counts["shards_given_up"] += 1
                self._warn("giving up on shard %s: none of its %d samples decodes", url, read)
                yield from held  # counted and logged as corrupt, once

    def _batches(self, samples, quota: int | None):
        images: list[torch.Tensor] = []
        targets: list[int] = []
        produced = 0
        if quota == 0:
            return
        for image, target in samples:
            images.append(image)
            targets.append(target)
            if len(images) == self.batch_size:
                yield self._collate(images, targets)
                images, targets = [], []
                produced += 1
                if quota is not None and produced == quota:
                    return
        if images:  # eval keeps its last partial batch; a train stream is endless
            yield self._collate(images, targets)
        elif any(self._counts.values()):
            yield None, None, self._pop_counts()

    def _collate(self, images, targets):
        return self.collate(images), torch.tensor(targets, dtype=torch.int64), self._pop_counts()

    def _pop_counts(self) -> tuple[int, ...]:
        counts = tuple(self._counts[k] for k in COUNT_KEYS)
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        return counts


# ----------------------------------------------------------------------------------------------------------
# the loader


class ShardLoader:
    """Iterable of (images float32 (B, C, H, W), targets) for one rank; call ``set_epoch`` before each epoch.
    With a ``device_decoder`` (``decode="gpu"``) the workers send encoded bytes and the batches come out decoded
    and augmented on its device, corrupt images dropped (a batch may then be short); with a ``finish`` (the CPU
    train decode) the workers send uint8 batches, normalized and erased on ``device``. Eval batches come out as
    the workers made them, on the CPU (CPU decode).

    ``len(loader)``: batches per epoch on this rank (train: the same on every rank; eval: an upper bound that
    is exact unless corrupt samples are skipped). ``stats``: {"corrupt_skipped": samples dropped for bad bytes
    or missing members, "shard_read_errors": tar read errors (a truncated member ends its shard's reading),
    "short_samples": samples missing from shards that ended before their ``_info.json`` length,
    "shards_given_up": shards with no decodable sample, not re-read}, accumulated over the iterations of this
    loader and exact for this rank: the counts travel with the batches from the workers (sum them across ranks
    for a global count)."""

    def __init__(self, stream: _ShardStream, *, num_workers: int, num_batches: int, num_samples: int,
                 require_epoch: bool, mixup_fn=None, soft_target_fn=None,
                 device_decoder: DeviceDecoder | None = None, finish: BatchFinish | None = None,
                 device: torch.device | str | None = "cpu", multiprocessing_context=None):
        self._stream = stream
        self._context = multiprocessing_context if num_workers else None
        self._device_decoder = device_decoder
        self._finish, self._device = finish, torch.device(device if device is not None else "cpu")
        self._num_workers = num_workers
        self._num_batches = num_batches
        self._require_epoch = require_epoch
        self._epoch_set = False
        self._mixup_fn = mixup_fn
        self._soft_target_fn = soft_target_fn
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        self.num_samples = num_samples

    def set_epoch(self, epoch: int) -> None:
        self._stream.epoch = int(epoch)
        self._epoch_set = True

    @property
    def stats(self) -> dict:
        counts = dict(self._counts)
        if self._device_decoder is not None:
            counts["corrupt_skipped"] += self._device_decoder.corrupt
        return counts

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._require_epoch and not self._epoch_set:
            raise RuntimeError("call loader.set_epoch(epoch) before iterating a train ShardLoader")
        # a batch this loader moves to a CUDA device itself comes through page-locked memory, pinned on the
        # DataLoader's own thread, so the copy does not stall this one (timm's loaders pin likewise)
        pin = self._device.type == "cuda" and (self._finish is not None or self._device_decoder is not None)
        loader = DataLoader(self._stream, batch_size=None, num_workers=self._num_workers, pin_memory=pin,
                            persistent_workers=False, timeout=WORKER_TIMEOUT_S if self._num_workers else 0,
                            multiprocessing_context=self._context)
        batches = self._counted(loader)
        if self._device_decoder is not None:  # the workers' batches are (bytes, lengths), targets
            batches = self._device_decoder.decode_ahead(batches, epoch=self._stream.epoch)
        elif self._finish is not None:  # the workers' batches are uint8 (B, H, W, C)
            batches = self._finished(batches)
        for images, targets in batches:
            if self._device_decoder is not None:
                if self._mixup_fn is not None and len(images) % 2:  # corrupt images dropped: mixup pairs
                    images, targets = images[:-1], targets[:-1]
                if len(images) == 0:
                    continue
            if self._mixup_fn is not None:
                images, targets = self._mixup_fn(images, targets)
            elif self._soft_target_fn is not None:
                targets = self._soft_target_fn(targets)
            yield images, targets

    def _finished(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalize and erase each batch on the device; a batch's erasing draws depend on its position only."""
        for step, (images, targets) in enumerate(batches):
            yield (self._finish(images, epoch=self._stream.epoch, step=step, device=self._device),
                   targets.to(self._device, non_blocking=True))

    def _counted(self, loader) -> Iterator[tuple]:
        try:
            for images, targets, counts in loader:
                for key, count in zip(COUNT_KEYS, counts):
                    self._counts[key] += int(count)
                if images is not None:
                    yield images, targets
        except DataError as exc:
            lines = str(exc).strip().splitlines()
            if len(lines) == 1:
                raise
            # re-raised from a worker process with the worker's traceback in the message: keep its last line
            raise DataError(lines[-1].removeprefix(f"{DataError.__module__}.DataError: ")) from None


def _device_rand_augment(auto_augment: str | None, img_size: int, in_chans: int, mean, std
                         ) -> DeviceRandAugment | None:
    """timm's RandAugment of the CPU path's transform (same ops, magnitudes, fill), for the device decoder."""
    if not auto_augment:
        return None
    transform = train_transform(img_size, in_chans=in_chans, auto_augment=auto_augment, mean=mean, std=std)
    rand_augment = next((step for step in transform.transforms if isinstance(step, RandAugment)), None)
    if rand_augment is None:
        raise ValueError(f"data.decode=gpu runs RandAugment ('rand-...') on the device, not {auto_augment!r}: "
                         f"set data.auto_augment to a rand- policy or null, or data.decode=cpu")
    fill = next(iter(rand_augment.ops)).kwargs.get("fillcolor", (128,) * in_chans)
    return DeviceRandAugment(rand_augment, tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * in_chans)


def create_train_loader(data_dir: str, split: str = "train", *, batch_size: int, img_size: int, num_classes: int,
                        rank: int = 0, world_size: int = 1, num_workers: int = 2, seed: int = 0, in_chans: int = 3,
                        auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                        hflip: float = 0.5, scale: tuple = (0.08, 1.0), interpolation: str = "bicubic",
                        mean=None, std=None, mixup: float = 0.0, cutmix: float = 0.0,
                        label_smoothing: float = 0.1, resampled: bool = False,
                        shuffle_buffer: int = 2000, decode: str = "cpu",
                        device: torch.device | str = "cpu", multiprocessing_context=None) -> ShardLoader:
    """Training loader for ``rank`` of ``world_size``; fails here (not mid-epoch) on missing shards or too few.

    ``decode="cpu"``: workers decode (``pipelines.data.decode.DraftCropDecoder``) and augment, and batches are
    normalized and erased on ``device``; ``"gpu"``: workers read bytes, batches are decoded and augmented on
    ``device`` (``pipelines.data.decode.DeviceDecoder``). Either way the batches come out on ``device``.
    ``multiprocessing_context``: how the workers start, as ``DataLoader`` takes it (None: torch's default, a fork
    of this process; a process with other threads, e.g. a distributed trainer's, forks them from a fork server:
    ``train.workers``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    if (mixup > 0 or cutmix > 0) and batch_size % 2:
        raise DataError(f"mixup/cutmix mix a batch with its flipped self and need an even batch size, "
                         f"got {batch_size}")
    shards, lengths, num_samples = _split_shards(data_dir, split)
    classes = read_info(data_dir).get("classes")
    if classes is not None and len(classes) > num_classes:
        raise DataError(f"{data_dir} has {len(classes)} classes but num_classes={num_classes}")
    if not resampled:
        check_readers(data_dir, split, len(shards), world_size, num_workers)
    rank_batches = batches_per_rank(num_samples, batch_size, world_size)
    if rank_batches == 0:
        raise DataError(f"{data_dir} split {split!r} has {num_samples} samples, fewer than one batch of "
                         f"{batch_size} on each of {world_size} ranks")
    _check_decode(decode)
    image_mode = "L" if in_chans == 1 else "RGB"
    device_decoder = finish = None
    if decode == "gpu":
        mean, std = _mean_std(mean, std, in_chans)
        device_decoder = DeviceDecoder(device, train=True, img_size=img_size, in_chans=in_chans, mean=mean,
                                       std=std, seed=seed, rank=rank, scale=scale, hflip=hflip, re_prob=re_prob,
                                       interpolation=interpolation,
                                       rand_augment=_device_rand_augment(auto_augment, img_size, in_chans, mean, std))
        codec = _BYTES_CODEC
    else:
        draft = DraftCropDecoder(train_transform(img_size, in_chans=in_chans, auto_augment=auto_augment,
                                                 re_prob=re_prob, hflip=hflip, scale=scale,
                                                 interpolation=interpolation, mean=mean, std=std), image_mode,
                                 seed=seed, rank=rank)
        codec = dict(decode=draft.decode, transform=draft.transform)
        finish = draft.finish
    stream = _ShardStream(shards, lengths, train=True, batch_size=batch_size, image_mode=image_mode, rank=rank,
                          world_size=world_size, num_workers=num_workers, seed=seed, rank_batches=rank_batches,
                          resampled=resampled, shuffle_buffer=shuffle_buffer, **codec)
    mixup_fn = soft_target_fn = None
    if mixup > 0 or cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                         label_smoothing=label_smoothing, num_classes=num_classes)
    elif label_smoothing > 0:
        def soft_target_fn(targets: torch.Tensor) -> torch.Tensor:
            return mixup_target(targets, num_classes, smoothing=label_smoothing)
    return ShardLoader(stream, num_workers=num_workers, num_batches=rank_batches, num_samples=num_samples,
                       require_epoch=True, mixup_fn=mixup_fn, soft_target_fn=soft_target_fn,
                       device_decoder=device_decoder, finish=finish, device=device,
                       multiprocessing_context=multiprocessing_context)


def create_eval_loader(data_dir: str, split: str = "validation", *, batch_size: int, img_size: int,
                       crop_pct: float = 0.875, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                       in_chans: int = 3, interpolation: str = "bicubic", mean=None, std=None,
                       decode: str = "cpu", device: torch.device | str = "cpu",
                       multiprocessing_context=None) -> ShardLoader:
    """Eval loader: across all ranks and workers every sample exactly once, last partial batches kept.

    Fewer shards than readers is allowed here (no rank waits for another inside the loader); the readers
    without a shard yield nothing."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    shards, lengths, num_samples = _split_shards(data_dir, split)
    _check_decode(decode)
    mean, std = _mean_std(mean, std, in_chans)
    device_decoder = None
    if decode == "gpu":
        device_decoder = DeviceDecoder(device, train=False, img_size=img_size, in_chans=in_chans, mean=mean,
                                       std=std, interpolation=interpolation, crop_pct=crop_pct)
        codec = _BYTES_CODEC
    else:
        codec = dict(transform=create_transform(img_size, is_training=False, crop_pct=crop_pct,
                                                interpolation=interpolation, mean=mean, std=std))
    stream = _ShardStream(shards, lengths, train=False, batch_size=batch_size,
                          image_mode="L" if in_chans == 1 else "RGB", rank=rank, world_size=world_size,
                          num_workers=num_workers, **codec)
    num_batches = eval_batches(lengths, shards, batch_size, rank, world_size, num_workers)
    return ShardLoader(stream, num_workers=num_workers, num_batches=num_batches, num_samples=num_samples,
                       require_epoch=False, device_decoder=device_decoder, device=device,
                       multiprocessing_context=multiprocessing_context)
