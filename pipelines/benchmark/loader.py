"""``python -m pipelines.benchmark loader``: shard writing speed, then our shard loader vs torchvision ImageFolder.

Generates ImageNet-like JPEGs (about 500x375, about 100 KB: smooth noise plus fine texture, so the JPEG size and
decode cost are realistic), writes them as an ImageFolder tree and as shards, and measures train-loader
throughput at 224x224 with RandAugment: ``create_train_loader`` beside ``ImageFolder`` + ``DataLoader`` with
the same timm transform, the same images, the same worker count, rounds interleaved so both see the same
machine load. Each round is a full epoch including worker start-up. With ``--decode gpu`` a third loader runs
beside them: workers read bytes only and batches are decoded and augmented on the GPU (``data.decode: gpu``; on a
machine without one, on the CPU), RandAugment included (batched on the device). Reported for each: images/s, images
per worker CPU-second, and CPU cores used (worker + main process CPU time / wall time).
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from pipelines.data import loader as data, shards
from pipelines.benchmark.timing import machine_description, synchronize
from train.host import retain_freed_memory

CLASSES = 10


def synthetic_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """Smooth colour blobs (upsampled coarse noise) plus fine texture noise, like a photo to a JPEG encoder."""
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, 18, (height, width, 1)) * rng.uniform(0.5, 1.5, (1, 1, 3))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_images(root: str, num_images: int, seed: int = 0) -> int:
    """``root/<class>/<n>.JPEG``; returns the total bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(num_images):
        folder = os.path.join(root, f"n{i % CLASSES:08d}")
        os.makedirs(folder, exist_ok=True)
        jpeg = synthetic_jpeg(rng)
        with open(os.path.join(folder, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(jpeg)
        total += len(jpeg)
    return total


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _epoch(loader, device) -> tuple[int, float, float, float]:
    """(images, wall seconds, CPU seconds of the loader workers, CPU seconds of this process). Workers are
    joined at the end of an epoch (not persistent), so their CPU time shows in RUSAGE_CHILDREN: a figure the other
    jobs sharing the cores disturb much less than wall time. This process's share is the GPU path's decode
    (nvJPEG's host side, kernel launches) or the other paths' batch receiving."""
    start = time.perf_counter()
    cpu, own = _cpu_seconds(resource.RUSAGE_CHILDREN), _cpu_seconds(resource.RUSAGE_SELF)
    images = sum(len(batch[0]) for batch in loader)
    synchronize(device)
    return (images, time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu,
            _cpu_seconds(resource.RUSAGE_SELF) - own)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2, help="writer processes and loader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved epochs per loader")
    parser.add_argument("--dir", help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: also measure data.decode=gpu (decode on CUDA where present, else on the CPU)")
    args = parser.parse_args(argv)

    import torch
    from deepspeed.accelerator import get_accelerator
    from torchvision.datasets import ImageFolder

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        src, out = os.path.join(work, "images"), os.path.join(work, "shards")
        start = time.perf_counter()
        total_bytes = make_images(src, args.num_images)
        print(f"generated {args.num_images} JPEGs, {total_bytes / args.num_images / 1e3:.0f} KB each on average, "
              f"in {time.perf_counter() - start:.1f} s")

        result = shards.write_split(shards.imagefolder_source(src, "train"), out, shard_size=args.shard_size,
                                    workers=args.workers, progress=False)
        write_rate = result.written / result.seconds
        print(shards.summary(result))

        device = torch.device(get_accelerator().device_name())
        if device.type == "cpu":  # as the trainer's CPU ranks (train.distributed.init_distributed): the batch
            retain_freed_memory()  # finish's buffers are reused, not page-faulted in again every batch
        ours = data.create_train_loader(out, batch_size=args.batch_size, img_size=args.img_size,
                                        num_classes=CLASSES, num_workers=args.workers, label_smoothing=0.0,
                                        shuffle_buffer=200, device=device)
        transform = data.train_transform(args.img_size)  # the one create_train_loader builds by default
        folder = torch.utils.data.DataLoader(ImageFolder(src, transform=transform), batch_size=args.batch_size,
                                             shuffle=True, drop_last=True, num_workers=args.workers)
        loaders = {"shards (ours)": ours, "ImageFolder": folder}
        if args.decode == "gpu":
            loaders["shards, gpu decode"] = data.create_train_loader(
                out, batch_size=args.batch_size, img_size=args.img_size, num_classes=CLASSES,
                num_workers=args.workers, label_smoothing=0.0, shuffle_buffer=200, decode="gpu", device=device)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu_rates: dict[str, list[float]] = {name: [] for name in loaders}
        cores: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(args.rounds):
            for name in sorted(loaders, reverse=bool(epoch % 2)):  # alternate which goes first
                if hasattr(loaders[name], "set_epoch"):
                    loaders[name].set_epoch(epoch)
                images, seconds, cpu, own = _epoch(loaders[name], device)
                rates[name].append(images / seconds)
                cpu_rates[name].append(images / cpu)
                cores[name].append((cpu + own) / seconds)

    workers = max(1, args.workers)
    print(f"\n{'loader':18s} {'images/s':>9s} {'per worker':>11s} {'per CPU-s':>10s} {'cores':>6s}   "
          f"images/s by round   ({args.rounds} epochs of {args.num_images // args.batch_size * args.batch_size} "
          f"images, {args.img_size}px RandAugment, {workers} workers, medians; "
          f"per CPU-s: of the workers; cores: workers + this process; {machine_description(device)})")
    wall, cpu = {}, {}
    for name, values in rates.items():
        wall[name], cpu[name] = statistics.median(values), statistics.median(cpu_rates[name])
        print(f"{name:18s} {wall[name]:9.1f} {wall[name] / workers:11.1f} {cpu[name]:10.1f} "
              f"{statistics.median(cores[name]):6.2f}   " + " ".join(f"{v:.0f}" for v in values))
    ratio = cpu["shards (ours)"] / cpu["ImageFolder"]
    total = {name: statistics.median(n / c for n, c in zip(rates[name], cores[name])) for name in rates}
    writing = "met" if write_rate >= 1000 else "MISSED"
    print(f"\nsummary: writing {write_rate:,.0f} images/s (goal >= 1,000: {writing}); "
          f"loading {wall['shards (ours)'] / workers:.1f} vs {wall['ImageFolder'] / workers:.1f} images/s per worker "
          f"(wall), {cpu['shards (ours)']:.1f} vs {cpu['ImageFolder']:.1f} images per worker CPU-second: "
          f"{ratio:.2f}x ImageFolder (goal >= 1.3: {'met' if ratio >= 1.3 else 'MISSED'}); counting this process "
          f"too (here it normalizes and erases our batches, on a GPU machine the GPU does): "
          f"{total['shards (ours)']:.1f} vs {total['ImageFolder']:.1f} images per CPU-second, "
          f"{total['shards (ours)'] / total['ImageFolder']:.2f}x")
    if "shards, gpu decode" in wall:
        print(f"gpu decode: {wall['shards, gpu decode']:,.0f} images/s on {machine_description(device)} with "
              f"{workers} workers, {statistics.median(cores['shards, gpu decode']):.2f} CPU cores used "
              f"(goal on an H100/H200: >= 3,000 images/s with <= 4 workers)")
    return 0
