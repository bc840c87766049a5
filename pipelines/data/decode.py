"""Image decoding for the shard loaders: a CPU train decode that does less work, and a batch decoder for the
training device (``data.decode: gpu``).

**CPU (``DraftCropDecoder``)**: timm's train transform starts with ``RandomResizedCropAndInterpolation``, which
crops a box of the fully decoded image and resizes it to the output size. Here the box is chosen first, from the
size in the JPEG header, with timm's own ``get_params`` (the same ``random`` draws in the same order, so the same
seed gives the same boxes, the same flips and the same RandAugment draws as timm's transform on a full decode),
then the JPEG is decoded with Pillow's ``draft`` at the smallest DCT scale (1/2, 1/4, 1/8) at which the box still
covers the output size, and the box, mapped onto the reduced image, is resized to the output size. A JPEG that
needs its full scale is decoded by torchvision's libjpeg-turbo decoder straight into a tensor (the same pixels as
Pillow's decode, without Pillow's copies). Flip and RandAugment run in the worker (RandAugment's shear and translate
vectorized, ``pipelines.data.axis_affine``: Pillow's bytes, about half its time at bicubic), which sends the batch
as uint8 (a quarter of float32's bytes through shared memory); ToTensor + Normalize and random erasing run on the
stacked batch on the training device (``BatchFinish``, as timm's prefetcher does). What changes numerically, and
nothing else:

- at a DCT scale s > 1, libjpeg's scaled IDCT (each 8x8 block decoded straight to 8/s x 8/s pixels, a box-like
  low-pass) replaces a full decode followed by the antialiased resize's own low-pass over those s x s pixels; the
  box's edges are rounded to the reduced image's pixel grid (at most s/2 original pixels, less than half an output
  pixel). At 224 px this needs a box of at least 448 x 448, so it applies to large images and large crops only
  (never to a 500 x 375 image). On the loader benchmark's textured synthetic photos the output then differs from
  timm's by 1-4 levels (of 255) on average, 1-2.5 after an 8 x 8 average.
- random erasing draws its boxes per batch from (seed, epoch, rank, step) with torch's generator (the same
  distributions as timm's, tests/test_decode.py), not per image from Python's ``random``; the worker's ``random``
  stream is then timm's transform without erasing.
- the resize is torch's antialiased bilinear/bicubic on uint8 (Pillow's kernels, in vectorized integer
  arithmetic, about 5x faster than Pillow's on one core): at full scale the output differs from timm's by about
  0.01 level on average. Other interpolations fall back to Pillow's.

**Device (``DeviceDecoder``)**: workers only read bytes and labels; a batch is decoded on the training device with
``torchvision.io.decode_jpeg(list_of_tensors, device=...)`` (nvJPEG on CUDA, libjpeg-turbo on CPU, so the tests
run it without a GPU), then random resized crop (timm's distributions), horizontal flip, normalization and random
erasing (timm's ``const`` mode) run batched on the device. Every random draw comes from a generator seeded by
(seed, epoch, rank, batch index): a batch is the same whatever happened before it, so exact resume holds. Images
that fail to decode are dropped from the batch and counted. The draws are torch's, not Python's ``random``: the
same distributions as timm's (tests/test_decode.py checks them), not the CPU path's sample-for-sample values; the
resize is float antialiased bilinear/bicubic, and nvJPEG's IDCT and chroma upsampling are not libjpeg's (a few
levels apart). ``decode_ahead`` decodes one batch ahead on a side CUDA
stream, overlapping the training step. RandAugment runs batched on the device too, each image with its own ops and
magnitudes (``pipelines.data.augment.DeviceRandAugment``: Pillow's arithmetic, within a level of the CPU path's,
bilinear geometric ops), after the flip and before normalization, as in timm's transform.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy, ToTensor
from torchvision import transforms as tv_transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resized_crop
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipelines.data.axis_affine import image_from_planes, vectorized_shifts

DCT_SCALES = (8, 4, 2, 1)  # the reductions Pillow's draft asks libjpeg for
_TORCH_RESIZE = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}
_JPEG_MAGIC = b"\xff\xd8"


# ----------------------------------------------------------------------------------------------------------
# pure geometry


def draft_scale(box_w: int, box_h: int, out_w: int, out_h: int) -> int:
    """The largest DCT reduction at which a ``box_w`` x ``box_h`` crop still has at least the output's pixels
    (1 when the crop is smaller than the output: it is upsampled from a full decode)."""
    return next((s for s in DCT_SCALES if box_w >= s * out_w and box_h >= s * out_h), 1)


def reduced_box(box: tuple[int, int, int, int], scale: int, reduced_size: tuple[int, int]) -> tuple[int, ...]:
    """(left, top, right, bottom) of an original-pixel box on an image reduced ``scale`` times, rounded to its
    pixel grid and kept non-empty and inside it."""
    if scale == 1:
        return box
    w, h = reduced_size
    left, top = min(round(box[0] / scale), w - 1), min(round(box[1] / scale), h - 1)
    return left, top, max(left + 1, min(round(box[2] / scale), w)), max(top + 1, min(round(box[3] / scale), h))


# ----------------------------------------------------------------------------------------------------------
# CPU: draft decode + timm's transform


@dataclass
class Drafted:
    """An image decoded at a DCT reduction, with timm's box in original pixels."""
    pixels: torch.Tensor  # uint8 (C, H, W), the image reduced ``scale`` times
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the original image's pixels
    scale: int
    interpolation: int


class DraftCropDecoder:
    """timm's train transform with the crop chosen before decoding, split where the image stops being bytes:
    ``decode(bytes)`` (raises on bad bytes, and then leaves ``random``'s state as it found it, so a skipped sample
    shifts no later draw), then ``transform(decoded)``: crop, flip, RandAugment, as a uint8 (H, W, C) tensor (what
    a worker sends: a quarter of float32's bytes). ``finish`` (a ``BatchFinish``) does the rest, Normalize and
    random erasing, on a stacked batch on the training device."""

    def __init__(self, transform: tv_transforms.Compose, image_mode: str, *, seed: int = 0, rank: int = 0):
        crop, *rest = transform.transforms
        if not isinstance(crop, RandomResizedCropAndInterpolation):
            raise TypeError(f"the transform must start with timm's RandomResizedCropAndInterpolation, got {crop!r}")
        self.crop, self.image_mode = crop, image_mode
        self.read_mode = ImageReadMode.GRAY if image_mode == "L" else ImageReadMode.RGB
        self.rest: list = []
        mean = std = erasing = None
        for step in rest:
            if isinstance(step, (MaybeToTensor, ToTensor, tv_transforms.ToTensor)):
                continue
            if isinstance(step, tv_transforms.Normalize):
                mean, std = torch.as_tensor(step.mean).tolist(), torch.as_tensor(step.std).tolist()
            elif isinstance(step, RandomErasing):
                erasing = step
            elif isinstance(step, ToNumpy):
                raise TypeError("a transform without normalization (ToNumpy) has no draft decode")
            elif mean is not None:
                raise TypeError(f"{step!r} after Normalize: only random erasing runs on the batch")
            else:
                self.rest.append(vectorized_shifts(step))
        if mean is None:
            raise TypeError("the transform has no Normalize step")
        self.finish = BatchFinish(mean, std, erasing, seed=seed, rank=rank)

    def decode(self, data: bytes) -> Drafted:
        state = random.getstate()
        try:
            img = Image.open(io.BytesIO(data))
            top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
            interpolation = self.crop.interpolation
            if isinstance(interpolation, (tuple, list)):
                interpolation = random.choice(interpolation)
            out_h, out_w = self.crop.size
            box = (left, top, left + w, top + h)
            scale, full_w = 1, img.size[0]
            if img.format == "JPEG":
                wanted = draft_scale(w, h, out_w, out_h)
                if wanted == 1 and (img.mode == self.image_mode or img.mode == "L"):
                    # torchvision's libjpeg-turbo decode: the same pixels as Pillow's, straight into a tensor
                    # (faster by Pillow's copies); an RGB JPEG to 'L' goes through Pillow's own conversion
                    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    return Drafted(decode_jpeg(encoded, mode=self.read_mode), box, 1, interpolation)
                drafted = img.draft(img.mode, (full_w // wanted, img.size[1] // wanted)) if wanted > 1 else None
                if drafted is not None:
                    scale = round(full_w / drafted[1][2])
            img.load()  # decodes: bad or truncated bytes raise here
            if img.mode != self.image_mode:
                img = img.convert(self.image_mode)
        except Exception:
            random.setstate(state)
            raise
        return Drafted(_pixels(img).permute(2, 0, 1), box, scale, interpolation)

    def transform(self, drafted: Drafted) -> torch.Tensor:
        out_h, out_w = self.crop.size
        box = reduced_box(drafted.box, drafted.scale, (drafted.pixels.shape[2], drafted.pixels.shape[1]))
        img = resize_box(drafted.pixels, self.image_mode, box, (out_w, out_h), drafted.interpolation)
        for step in self.rest:
            img = step(img)
        return _pixels(img)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(self.decode(data))


def _pixels(img: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8; ``np.array`` rather than ``np.asarray``: Pillow's buffer is read-only, torch wants it
    writable."""
    pixels = torch.from_numpy(np.array(img))
    return pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels


def to_pil(pixels: torch.Tensor, mode: str) -> Image.Image:
    """A uint8 (C, H, W) tensor as a Pillow image (``axis_affine.image_from_planes``)."""
    return image_from_planes(pixels.contiguous().numpy(), mode)


def resize_box(pixels: torch.Tensor, mode: str, box: tuple[int, int, int, int], size: tuple[int, int],
               interpolation: InterpolationMode) -> Image.Image:
    """timm's crop + resize of ``box`` (left, top, right, bottom) of a uint8 (C, H, W) image to ``size`` (w, h),
    with torch's uint8 antialiased kernels where they exist."""
    left, top, right, bottom = box
    resample = _TORCH_RESIZE.get(interpolation)
    if resample is None:
        return resized_crop(to_pil(pixels, mode), top, left, bottom - top, right - left, [size[1], size[0]],
                            interpolation)
    region = pixels[None, :, top:bottom, left:right]
    out = F.interpolate(region, size=(size[1], size[0]), mode=resample, antialias=True, align_corners=False)
    return to_pil(out[0], mode)


def normalize_(images: torch.Tensor, mean255: torch.Tensor, std255: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize of float pixels in 0..255, in place: (x - 255 mean) / (255 std)."""
    return images.sub_(mean255).div_(std255)


def erase_(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """timm's const-mode random erasing of normalized (B, C, H, W) images, in place: zero inside each image's
    (top, left, h, w) box (h = 0: none). One fill per erased image (a quarter of them at timm's 0.25): cheaper
    than a whole-batch mask on the CPU, a few small kernels on a GPU."""
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        if h > 0 and w > 0:
            images[k, :, top:top + h, left:left + w] = 0.0
    return images


class BatchFinish:
    """The end of timm's train transform (Normalize, then RandomErasing in const mode with one box) on a batch, on
    the training device: ``finish(images, epoch=, step=, device=)`` takes the workers' uint8 (B, H, W, C) batch and
    returns float32 (B, C, H, W) on ``device``. The erasing boxes follow timm's distributions (the device decoder's
    ``erasing_boxes``) but are drawn per batch from (seed, epoch, rank, step) rather than per image from Python's
    ``random`` in a worker: a batch is the same whatever happened before it, so exact resume holds."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], erasing=None, *, seed: int = 0, rank: int = 0):
        self.mean255 = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.re_prob, self.seed, self.rank = 0.0, seed, rank
        if erasing is not None and erasing.probability > 0:
            if erasing.mode not in ("", "const") or erasing.min_count != 1 or erasing.max_count != 1 \
                    or erasing.num_splits:
                raise TypeError(f"batch random erasing is timm's const mode with one box, got mode="
                                f"{erasing.mode!r}, count=({erasing.min_count}, {erasing.max_count}), "
                                f"num_splits={erasing.num_splits}")
            self.re_prob = erasing.probability
            self.area, self.log_ratio = (erasing.min_area, erasing.max_area), tuple(erasing.log_aspect_ratio)

    def __call__(self, images: torch.Tensor, *, epoch: int = 0, step: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        pixels = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, self.rank, step)) if self.re_prob else None
        return self.apply_(out, gen)

    def apply_(self, out: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Normalize float (B, C, H, W) pixels 0..255 in place, then erase with boxes drawn from ``gen``."""
        if self.mean255.device != out.device:
            self.mean255, self.std255 = self.mean255.to(out.device), self.std255.to(out.device)
        normalize_(out, self.mean255, self.std255)
        if self.re_prob > 0:
            erase_(out, erasing_boxes(len(out), out.shape[2], out.shape[3], self.re_prob, gen, self.area,
                                      self.log_ratio))
        return out


# ----------------------------------------------------------------------------------------------------------
# device: batched decode and augmentation on the training device


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The seed of one batch's augmentation generator: a function of its position only."""
    return random.Random(f"device-augment:{seed}:{epoch}:{rank}:{step}").getrandbits(63)


def random_resized_boxes(sizes: torch.Tensor, scale: Sequence[float], ratio: Sequence[float],
                         gen: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` for a batch: (B, 4) (top, left, h, w) from (B, 2)
    (h, w) sizes. Scale uniform in ``scale`` x area, aspect ratio log-uniform in ``ratio``, the first of
    ``attempts`` draws that fits, else timm's central fallback; the offset uniform over the valid positions."""
    n = sizes.shape[0]
    img_h, img_w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = img_h * img_w
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                   generator=gen)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w <= img_w) & (h <= img_h)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    img_h, img_w = img_h.squeeze(1), img_w.squeeze(1)
    # timm's fallback: the whole image, clamped to the ratio range
    in_ratio = img_w / img_h
    fb_w = torch.where(in_ratio > max(ratio), torch.round(img_h * max(ratio)), img_w)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(img_w / min(ratio)), img_h)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    u = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    top = torch.where(found, torch.floor(u[:, 0] * (img_h - h + 1)), torch.floor((img_h - h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (img_w - w + 1)), torch.floor((img_w - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


def erasing_boxes(n: int, height: int, width: int, prob: float, gen: torch.Generator,
                  area_range: tuple[float, float] = (0.02, 1 / 3), log_ratio: tuple[float, float] = (
                      math.log(0.3), math.log(1 / 0.3)), attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing (one box, const mode) for a batch: (B, 4) (top, left, h, w), h = 0 where none."""
    apply = torch.rand(n, generator=gen) < prob
    target = height * width * torch.empty(n, attempts, dtype=torch.float64).uniform_(*area_range, generator=gen)
    aspect = torch.exp(torch.empty(n, attempts, dtype=torch.float64).uniform_(*log_ratio, generator=gen))
    h = torch.round(torch.sqrt(target * aspect))
    w = torch.round(torch.sqrt(target / aspect))
    fits = (w < width) & (h < height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    keep = apply & fits.any(dim=1)
    u = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    top, left = torch.floor(u[:, 0] * (height - h + 1)), torch.floor(u[:, 1] * (width - w + 1))
    zero = torch.zeros_like(h)
    return torch.stack([top, left, torch.where(keep, h, zero), torch.where(keep, w, zero)], dim=1).long()


class DeviceDecoder:
    """Decodes and augments batches of encoded images on ``device``.

    Train: ``decoder(flat, lengths, targets, epoch=, step=)`` with the batch's bytes concatenated in ``flat``
    (uint8) and split by ``lengths``; returns (images float32 (B', C, S, S) on ``device``, targets on ``device``)
    with B' <= B (corrupt images dropped; ``corrupt`` counts them). Eval (``train=False``): resize the shorter
    side to ``img_size / crop_pct`` and center-crop ``img_size`` (timm's eval transform), no randomness."""

    def __init__(self, device: torch.device | str, *, train: bool, img_size: int, in_chans: int = 3,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0, rank: int = 0,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, re_prob: float = 0.0, interpolation: str = "bicubic",
                 crop_pct: float = 0.875, rand_augment=None):
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"data.decode=gpu resizes with bilinear or bicubic, got interpolation={interpolation!r}")
        self.device = torch.device(device)
        self.train, self.img_size, self.in_chans = train, img_size, in_chans
        self.seed, self.rank = seed, rank
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.read_mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        # Normalize, then (train) timm's default const-mode erasing, drawn from the batch's generator
        erasing = RandomErasing(probability=re_prob, mode="const", device="cpu") if train and re_prob > 0 else None
        self.finish = BatchFinish(mean, std, erasing)
        self.rand_augment = rand_augment  # a pipelines.data.augment.DeviceRandAugment, or None
        self.corrupt = 0

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """uint8 (C, H, W) images on the device; None for an image that fails to decode."""
        out: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = [i for i, e in enumerate(encoded) if e.numel() > 2 and bytes(e[:2].tolist()) == _JPEG_MAGIC]
        try:  # one batched call (nvJPEG); it returns nothing when any image fails, so retry those one by one
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=self.read_mode, device=self.device) \
                if jpegs else []
        except RuntimeError:
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(encoded[i], mode=self.read_mode, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpegs, decoded):
            out[i] = img
        for i in set(range(len(encoded))) - set(jpegs):  # PNG, WebP, ...: decoded here on the CPU
            try:
                out[i] = decode_image(encoded[i], mode=self.read_mode).to(self.device, non_blocking=True)
            except RuntimeError:
                out[i] = None
        return out

    def _boxes(self, sizes: torch.Tensor) -> torch.Tensor:
        """(top, left, h, w) of the region of each image that becomes the S x S eval crop."""
        scale_size = math.floor(self.img_size / self.crop_pct)
        h, w = sizes[:, 0].double(), sizes[:, 1].double()
        short = torch.minimum(h, w)
        crop = torch.clamp(torch.round(self.img_size * short / scale_size), min=1)
        crop_h, crop_w = torch.minimum(crop, h), torch.minimum(crop, w)
        return torch.stack([torch.floor((h - crop_h) / 2), torch.floor((w - crop_w) / 2), crop_h, crop_w], 1).long()

    def __call__(self, flat: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0,
                 step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = list(torch.split(flat, lengths.tolist()))
        decoded = self._decode(encoded)
        good = [i for i, img in enumerate(decoded) if img is not None]
        self.corrupt += len(decoded) - len(good)
        images = [decoded[i] for i in good]
        targets = targets[good].to(self.device, non_blocking=True)
        size = self.img_size
        if not images:
            return torch.empty(0, self.in_chans, size, size, device=self.device), targets
        sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.long)
        gen = None
        if self.train:
            gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, self.rank, step))
            boxes = random_resized_boxes(sizes, self.scale, self.ratio, gen)
        else:
            boxes = self._boxes(sizes)
        out = torch.empty(len(images), self.in_chans, size, size, device=self.device)
        for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes.tolist())):
            region = img[None, :, top:top + h, left:left + w].float()
            out[k] = F.interpolate(region, size=(size, size), mode=self.interpolation, antialias=True,
                                   align_corners=False)[0]
        out.clamp_(0, 255)  # bicubic overshoots; the CPU path's uint8 resize saturates alike
        if self.train:
            flip = (torch.rand(len(images), generator=gen) < self.hflip).to(self.device)
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
            if self.rand_augment is not None:  # on whole pixel values, as the CPU path's uint8 images
                out = self.rand_augment(out.round_(), gen)
        return self.finish.apply_(out, gen), targets

    def decode_ahead(self, batches: Iterable[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]], *,
                     epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decodes ``((flat, lengths), targets)`` batches one ahead of their use: batch k + 1 is submitted before
        batch k is handed out, on a side CUDA stream, so its decode overlaps the training step on batch k. The
        step index of a batch is its position in ``batches``: the output does not depend on the overlap."""
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending = None
        for step, ((flat, lengths), targets) in enumerate(batches):
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                ready = self(flat, lengths, targets, epoch=epoch, step=step)
            if pending is not None:
                yield self._hand_over(pending, side)
            pending = ready
        if pending is not None:
            yield self._hand_over(pending, side)

    def _hand_over(self, batch: tuple[torch.Tensor, torch.Tensor], side) -> tuple[torch.Tensor, torch.Tensor]:
        if side is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)  # the consumer's kernels run after the decode's
            for tensor in batch:
                tensor.record_stream(main)  # the side stream's allocator must not reuse them while in use
        return batch
