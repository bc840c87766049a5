"""timm's RandAugment on a batch on the training device (``data.decode: gpu``).

``DeviceRandAugment(timm_rand_augment)`` reads the ops, probabilities, magnitudes and level functions of the
``RandAugment`` that timm builds from the config string (``rand-m9-mstd0.5-inc1``: the CPU path's own object), and
applies them to a float (B, C, H, W) batch of whole pixel values 0..255, each image with its own ops and magnitudes:
per image and layer an op drawn as ``RandAugment`` draws it (uniform with replacement, or weighted without), applied
with the op's probability, its magnitude drawn as ``AugmentOp`` draws it (Gaussian noise, clipped), turned into
arguments by timm's own level functions. Every draw comes from the batch's torch generator (the level functions'
random signs from Python's ``random`` seeded by it, its state restored), so a batch depends only on its seed.

Each op reproduces Pillow's arithmetic on whole pixel values (truncation where Pillow truncates; the grey of
``convert("L")``; ``ImageOps``'s lookup tables; ``ImageEnhance``'s blends; the SMOOTH filter with its border kept),
so the colour ops match the CPU path within a level. What differs, and nothing else: the geometric ops (rotate,
shear, translate) resample bilinearly, where timm picks bilinear or bicubic at random; bilinear follows Pillow's
(pixel centres, edge clamp, fill colour outside the source) in float32.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def grey(images: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")`` of RGB (B, 3, H, W) whole values: (B, 1, H, W); a 1-channel batch as it is."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(images.dtype)


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` (``ImageEnhance``): ``degenerate + f (image - degenerate)``, clipped
    to 0..255 and truncated, per image factor (B,)."""
    f = factor.to(images).view(-1, 1, 1, 1)
    return (degenerate + f * (images - degenerate)).clamp_(0, 255).floor_()


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: each channel stretched to 0..255 (``int(v * scale + offset)``); flat ones kept."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # a true division (255 / t is 255 * (1 / t))
    out = (x.double() * scale + -lo * scale).clamp_(0, 255).floor_().to(x.dtype)  # Pillow's double arithmetic
    return torch.where(hi > lo, out, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize`` per image and channel (torchvision's, which follows Pillow's)."""
    return TF.equalize(x.to(torch.uint8)).to(x.dtype)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` high bits per image (0 bits: black, as the CPU path's posterize); 8 or more: unchanged."""
    drop = (8 - bits.to(torch.int32).clamp(0, 8)).view(-1, 1, 1, 1)
    return ((x.to(torch.int32) >> drop) << drop).to(x.dtype)


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: values at or above the threshold inverted."""
    return torch.where(x >= thresh.to(x).view(-1, 1, 1, 1), 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    """timm's ``solarize_add``: ``add`` added below the threshold, at most 255."""
    return torch.where(x < thresh, (x + add.to(x).view(-1, 1, 1, 1)).clamp_(max=255), x)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(grey(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey, rounded (``ImageEnhance.Contrast``)."""
    mean = torch.floor(grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return blend(mean.expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with Pillow's SMOOTH filter (3x3, centre 5, others 1, over 13, rounded; the border rows and columns
    kept as they are)."""
    c = x.shape[1]
    kernel = x.new_ones(c, 1, 3, 3)
    kernel[:, :, 1, 1] = 5
    smooth = torch.floor(F.conv2d(x, kernel / 13, groups=c) + 0.5).clamp_(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return blend(degenerate, x, factor)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``transform(AFFINE, (a, b, c, d, e, f))`` with bilinear resampling, per image matrix (B, 6): output
    pixel centre (X, Y) samples the input at (a X + b Y + c, d X + e Y + f); outside the input, ``fill`` (C,)."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
    m = matrix.to(device=x.device, dtype=torch.float32).view(b, 6, 1, 1)
    src_x = m[:, 0] * xs.view(1, 1, w) + m[:, 1] * ys.view(1, h, 1) + m[:, 2]
    src_y = m[:, 3] * xs.view(1, 1, w) + m[:, 4] * ys.view(1, h, 1) + m[:, 5]
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    # align_corners=False maps -1..1 to the outer pixel edges: a centre-based position p is 2 p / size - 1; border
    # padding clamps the neighbours to the edge as Pillow does
    grid = torch.stack([2 * src_x / w - 1, 2 * src_y / h - 1], dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).floor_()
    return torch.where(inside.unsqueeze(1), out, fill.to(x).view(1, -1, 1, 1))


def _matrices(kind: str, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 6) Pillow affine matrices of timm's geometric ops for per-image arguments ``values`` (B,)."""
    h, w = size
    v = values.double()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if kind == "ShearX":
        return torch.stack([one, v, zero, zero, one, zero], 1)
    if kind == "ShearY":
        return torch.stack([one, zero, zero, v, one, zero], 1)
    if kind in ("TranslateXRel", "TranslateX"):
        return torch.stack([one, zero, v * w if kind.endswith("Rel") else v, zero, one, zero], 1)
    if kind in ("TranslateYRel", "TranslateY"):
        return torch.stack([one, zero, zero, zero, one, v * h if kind.endswith("Rel") else v], 1)
    # Rotate: Image.rotate's matrix about the centre, its cosines and sines rounded to 15 places
    angle = -torch.deg2rad(v % 360.0)
    cos, sin = torch.round(torch.cos(angle) * 1e15) / 1e15, torch.round(torch.sin(angle) * 1e15) / 1e15
    cx, cy = w / 2, h / 2
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)


_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY")
_BY_KIND: dict[str, Callable] = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Posterize": posterize,
    "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness,
}


def op_kind(name: str) -> str:
    """timm's op name without its level variant (``PosterizeIncreasing`` -> ``Posterize``)."""
    for suffix in ("Increasing", "Original"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class DeviceRandAugment:
    """timm's ``RandAugment`` object, applied per image to a batch with draws from a torch generator."""

    def __init__(self, rand_augment, fill: tuple[float, ...]):
        self.ops = list(rand_augment.ops)
        unknown = sorted({op.name for op in self.ops if op_kind(op.name) not in _BY_KIND
                          and op_kind(op.name) not in _GEOMETRIC})
        if unknown:
            raise ValueError(f"data.decode=gpu has no device version of RandAugment op(s) {', '.join(unknown)}")
        self.layers = rand_augment.num_layers
        weights = rand_augment.choice_weights
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.fill = torch.tensor(fill, dtype=torch.float32)

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, list[list[tuple | None]]]:
        """Per image and layer: the op index (n, layers) and its level arguments, None where the op is skipped."""
        if self.weights is None:  # np.random.choice(ops, layers, replace=True)
            chosen = torch.randint(len(self.ops), (n, self.layers), generator=gen)
        else:  # weighted: without replacement
            chosen = torch.multinomial(self.weights.expand(n, -1), self.layers, replacement=False, generator=gen)
        coin = torch.rand(n, self.layers, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, self.layers, generator=gen, dtype=torch.float64)
        uniform = torch.rand(n, self.layers, generator=gen, dtype=torch.float64)
        seed = int(torch.randint(2**62, (1,), generator=gen))
        state = random.getstate()
        random.seed(seed)  # timm's level functions draw their signs from Python's random
        try:
            args: list[list[tuple | None]] = []
            for i in range(n):
                row = []
                for j in range(self.layers):
                    op = self.ops[int(chosen[i, j])]
                    if op.prob < 1.0 and float(coin[i, j]) > op.prob:
                        row.append(None)
                        continue
                    magnitude = op.magnitude
                    if op.magnitude_std == float("inf"):
                        magnitude = float(uniform[i, j]) * magnitude
                    elif op.magnitude_std > 0:
                        magnitude = magnitude + op.magnitude_std * float(noise[i, j])
                    magnitude = max(0.0, min(magnitude, op.magnitude_max or 10))
                    row.append(op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ())
                args.append(row)
        finally:
            random.setstate(state)
        return chosen, args

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Float (B, C, H, W) whole pixel values 0..255 -> the same, augmented (a new tensor)."""
        x = images.clone()
        chosen, args = self.draw(len(x), gen)
        applied = torch.tensor([[a is not None for a in row] for row in args], dtype=torch.bool).view(chosen.shape)
        for j in range(self.layers):
            for k, op in enumerate(self.ops):
                rows = torch.nonzero((chosen[:, j] == k) & applied[:, j]).flatten().tolist()
                if not rows:
                    continue
                index = torch.tensor(rows, device=x.device)
                kind = op_kind(op.name)
                values = torch.tensor([args[i][j][0] if args[i][j] else 0.0 for i in rows], dtype=torch.float64)
                part = x[index]
                if kind in _GEOMETRIC:
                    part = affine(part, _matrices(kind, values, part.shape[-2:]), self.fill)
                elif args[rows[0]][j]:
                    part = _BY_KIND[kind](part, values.to(x.device))
                else:
                    part = _BY_KIND[kind](part)
                x[index] = part
        return x
