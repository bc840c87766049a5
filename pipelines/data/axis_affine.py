"""timm's shear and translate ops (RandAugment's ``ShearX/Y``, ``TranslateX/YRel``), vectorized, byte for byte
Pillow's.

Those ops call Pillow's ``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` with a map that moves pixels
along ONE axis (``x' = x + a1 y + a2`` or ``y' = y + a3 x + a5``). Pillow runs its generic per-pixel transform for
it, the costliest part of RandAugment at the ImageNet recipe's bicubic. Along one axis the other coordinate is the
pixel's own, so Pillow's 2D filter is a 1D one: a row (or column) shifted by a per-row amount. ``axis_affine`` does
exactly Pillow's arithmetic on whole arrays: the source coordinate of every pixel in doubles in Pillow's order, its
floor and fraction, the taps clamped at the edges, Pillow's cubic (a = -1, Horner form in doubles) or linear
weights, Pillow's clip and truncation, the fill colour where the source coordinate leaves the image. The result is
the same bytes as Pillow's (tests/test_axis_affine.py: every pixel, both resamples, L and RGB, shifts past the
edges; a Pillow built to fuse multiply-adds, as aarch64 compilers may, could round a rare pixel the other way). It
declines (returns None) whatever it does not cover -- another mode or resample, a 2D map, a row whose taps are not
one shifted run -- and the caller then uses Pillow. At 224 x 224 RGB on one core (this project's 2-core development
machine): bicubic 1.1 ms against Pillow's 1.9-2.1, bilinear 0.75-0.8 against 0.8-0.9; below ``MIN_VALUES`` Pillow is
faster.

``vectorized_shifts(step)`` gives a copy of a timm ``RandAugment`` whose shear and translate ops run through it;
timm's own op functions still draw the interpolation and build the matrix, so the random stream and the arguments
are timm's.
"""
from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Hashable
from typing import Sequence

import numpy as np
from PIL import Image
from timm.data.auto_augment import RandAugment

# timm's ops that call Image.transform with a one-axis affine map
SHIFT_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"})
_TAPS = {Image.Resampling.BILINEAR: 2, Image.Resampling.BICUBIC: 4}
# Below these sizes (pixels x channels) Pillow's C loop is faster than numpy's ~25 whole-array passes (measured on one
# core: bicubic breaks even at 64 x 64 RGB, bilinear at 128 x 128 RGB); ``vectorized_shifts`` leaves them to Pillow
MIN_VALUES = {Image.Resampling.BILINEAR: 128 * 128 * 3, Image.Resampling.BICUBIC: 64 * 64 * 3}
_scratch = threading.local()  # work arrays (1.2 MB of doubles at 224 x 224 RGB), reused: a fresh one page-faults


def _work(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's work array ``name``, kept for the next call of the same shape."""
    cache = _scratch.__dict__.setdefault("arrays", {})
    array = cache.get(name)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = cache[name] = np.empty(shape, dtype)
    return array


def source_coordinates(data: Sequence[float], height: int, width: int) -> tuple[np.ndarray, bool] | None:
    """The source coordinate along the moving axis of every output pixel, (H, W) doubles computed as Pillow's
    ``affine_transform`` does (``a0 * (x + 0.5) + a1 * (y + 0.5) + a2``), and whether that axis is x; None for a map
    that moves pixels along both axes or scales them."""
    a0, a1, a2, a3, a4, a5 = (float(v) for v in data[:6])
    if not all(map(np.isfinite, (a1, a2, a3, a5))):
        return None
    along_x = a3 == 0 and a5 == 0  # y' = y exactly: moves along x (else x' = x exactly: moves along y)
    if a0 != 1 or a4 != 1 or not (along_x or (a1 == 0 and a2 == 0)):
        return None
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    return ((a0 * xs + a1 * ys) + a2 if along_x else (a3 * xs + a4 * ys) + a5), along_x


def axis_affine(img: Image.Image, data: Sequence[float], resample: int, fillcolor=None) -> Image.Image | None:
    """``img.transform(img.size, Image.AFFINE, data, resample, fillcolor=fillcolor)`` for a one-axis map, bilinear
    or bicubic, mode L or RGB: the same bytes, vectorized; None where it does not apply (use Pillow)."""
    taps = _TAPS.get(resample)
    if taps is None or img.mode not in ("L", "RGB") or not isinstance(fillcolor, Hashable):
        return None  # (a list as fill colour: Pillow's own call says what it makes of it)
    height, width = img.height, img.width
    found = source_coordinates(data, height, width)
    if found is None:
        return None
    coord, along_x = found
    size = width if along_x else height
    outside = (coord < 0.0) | (coord >= size)  # Pillow's filters refuse these: the fill colour stays
    coord -= 0.5
    base = np.floor(coord)
    frac = np.subtract(coord, base, out=coord)  # Pillow's dx (or dy), per pixel
    # each row (column) must read one run of source pixels: base minus the position along the axis is constant
    base -= np.arange(size, dtype=np.float64) if along_x else np.arange(size, dtype=np.float64)[:, None]
    start = base[:, :1] if along_x else base[:1, :]
    if not (base == start).all():
        return None
    # gather the runs (taps - 1 extra, the cubic's starting one before), clamped at the edges as Pillow clamps
    lead, span = taps // 2 - 1, size + taps - 1
    offsets = np.arange(span) - lead
    if along_x:
        index = np.clip(start.astype(np.intp) + offsets, 0, width - 1) + (np.arange(height) * width)[:, None]
    else:
        index = np.clip(start.astype(np.intp) + offsets[:, None], 0, height - 1) * width + np.arange(width)
    pixels = np.asarray(img)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    # channel-major (C, ...) runs from the interleaved pixels: element (pixel * C + c)
    runs = np.take(pixels.reshape(-1), index * channels + np.arange(channels)[:, None, None])
    tap = [runs[:, :, j: j + width] if along_x else runs[:, j: j + height] for j in range(taps)]
    shape = (height, width)
    out = np.empty((channels, height, width), np.uint8)
    value = _work("value", shape, np.float64)
    interpolate = pillow_linear if taps == 2 else pillow_cubic
    for c in range(channels):  # a plane at a time: its work arrays stay in cache
        np.copyto(out[c], interpolate([t[c] for t in tap], frac, value), casting="unsafe")  # (UINT8): truncation
    if outside.any():
        fill = _fill_pixel(img.mode, fillcolor)
        for plane, colour in zip(out, fill):
            plane[outside] = colour
    return image_from_planes(out, img.mode)


def image_from_planes(planes: np.ndarray, mode: str) -> Image.Image:
    """A C-contiguous uint8 (C, H, W) array as a Pillow image of ``mode``: Pillow interleaves the planes faster than a
    transpose does."""
    bands = [Image.frombuffer("L", (planes.shape[2], planes.shape[1]), plane, "raw", "L", 0, 1) for plane in planes]
    return bands[0] if len(bands) == 1 else Image.merge(mode, bands)


def pillow_linear(taps: Sequence[np.ndarray], d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Pillow's ``BILINEAR(v, a, b, d) = a + (b - a) * d`` on uint8 tap arrays, in doubles, into ``out``."""
    a, b = taps
    diff = np.subtract(b, a, out=_work("p2", out.shape, np.int16), dtype=np.int16)
    np.multiply(diff, d, out=out)
    out += a
    return out


def pillow_cubic(taps: Sequence[np.ndarray], d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Pillow's ``BICUBIC`` macro (a = -1) on uint8 tap arrays: ``p1 + d * (p2 + d * (p3 + d * p4))`` with the p's in
    integers as the macro computes them and the Horner steps in doubles in its order, clipped to 0..255, into
    ``out``."""
    v1, v2, v3, v4 = taps
    p2 = np.subtract(v3, v1, out=_work("p2", out.shape, np.int16), dtype=np.int16)
    p3 = np.subtract(v1, v2, out=_work("p3", out.shape, np.int16), dtype=np.int16)
    p3 *= 2
    p3 += v3
    p3 -= v4
    p4 = np.subtract(v2, v1, out=_work("p4", out.shape, np.int16), dtype=np.int16)
    p4 -= v3
    p4 += v4
    np.multiply(p4, d, out=out)
    out += p3
    out *= d
    out += p2
    out *= d
    out += v2
    return np.clip(out, 0.0, 255.0, out=out)


@functools.lru_cache(maxsize=64)
def _fill_pixel(mode: str, fillcolor) -> np.ndarray:
    """The fill colour as Pillow reads it for an image of this mode (one value per channel); black for None, as
    Pillow clears what its filter refuses when no fill colour is given."""
    return np.asarray(Image.new(mode, (1, 1), 0 if fillcolor is None else fillcolor), dtype=np.uint8).reshape(-1)


class _AxisAffineImage:
    """What timm's shear and translate functions see instead of the image: its ``size``, and a ``transform`` that
    runs ``axis_affine`` (Pillow's own where that declines)."""

    def __init__(self, img: Image.Image):
        self.img, self.size = img, img.size

    def transform(self, size, method, data=None, resample=Image.Resampling.NEAREST, fill=1, fillcolor=None):
        img = self.img
        values = img.width * img.height * len(img.getbands())
        if (method == Image.Transform.AFFINE and tuple(size) == img.size and data is not None
                and values >= MIN_VALUES.get(resample, values + 1)):
            out = axis_affine(img, data, resample, fillcolor)
            if out is not None:
                return out
        return img.transform(size, method, data, resample, fill, fillcolor)


class _Vectorized:
    """timm's op function, handed the image behind an ``_AxisAffineImage``. A class rather than a closure: the
    transform is pickled to the loader's workers (the fork server's and spawn's)."""

    def __init__(self, aug_fn):
        self.__wrapped__ = aug_fn

    def __call__(self, img, *args, **kwargs):
        return self.__wrapped__(_AxisAffineImage(img) if isinstance(img, Image.Image) else img, *args, **kwargs)


def vectorized_shifts(step):
    """A copy of a timm ``RandAugment`` whose shear and translate ops run through ``axis_affine``; any other step
    as it is."""
    if not isinstance(step, RandAugment):
        return step
    fast = copy.copy(step)
    fast.ops = []
    for op in step.ops:
        if op.name in SHIFT_OPS and not isinstance(op.aug_fn, _Vectorized):
            op = copy.copy(op)
            op.aug_fn = _Vectorized(op.aug_fn)
        fast.ops.append(op)
    return fast
