"""pipelines.data.axis_affine: timm's shear and translate ops, vectorized, give Pillow's bytes and timm's draws."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipelines.data import axis_affine as A, decode, loader as data

BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC


def images(mode: str) -> list[Image.Image]:
    """Noise (every tap matters, values hit 0 and 255: the cubic's clip) and a smooth image, not square."""
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8))
    smooth = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    return [noise.convert(mode), smooth.convert(mode)]


def one_axis_maps(width: int, height: int) -> list[tuple[float, ...]]:
    """Shears and translations as timm builds them: small and large, negative, whole and half pixels, past the edge."""
    maps = []
    for factor in (0.3, -0.3, 0.0917, -0.51, 2.5):
        maps += [(1, factor, 0, 0, 1, 0), (1, 0, 0, factor, 1, 0)]
    for frac in (0.45, -0.45, 0.1234567, 0.5 / width, 3 / width, -1.5):
        maps += [(1, 0, frac * width, 0, 1, 0), (1, 0, 0, 0, 1, frac * height)]
    return maps


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
def test_axis_affine_is_pillows_transform_byte_for_byte(mode, resample):
    fills = [None, (124, 116, 104)] if mode == "RGB" else [None, 120]
    for img in images(mode):
        for matrix in one_axis_maps(*img.size):
            for fill in fills:
                ours = A.axis_affine(img, matrix, resample, fill)
                assert ours is not None, matrix
                pillow = img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)
                assert ours.mode == pillow.mode and ours.size == pillow.size
                diff = np.asarray(ours).astype(int) - np.asarray(pillow)
                assert not diff.any(), (mode, resample, matrix, fill, np.count_nonzero(diff), np.abs(diff).max())


def test_axis_affine_declines_what_it_does_not_cover():
    rgb = images("RGB")[0]
    rotation = (0.96, -0.28, 5.0, 0.28, 0.96, -3.0)
    assert A.axis_affine(rgb, rotation, BICUBIC) is None
    assert A.axis_affine(rgb, (2, 0, 0, 0, 1, 0), BICUBIC) is None  # a scaling
    assert A.axis_affine(rgb, (1, 0.3, 0, 0, 1, 0), Image.Resampling.NEAREST) is None
    assert A.axis_affine(rgb.convert("RGBA"), (1, 0.3, 0, 0, 1, 0), BICUBIC) is None
    assert A.axis_affine(rgb, (1, 0.3, 0, 0, 1, 0), BICUBIC, [1, 2, 3]) is None  # Pillow's call judges a list


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_vectorized_rand_augment_draws_like_timm_and_gives_its_images(monkeypatch):
    transform = data.train_transform(96)  # bicubic, past MIN_VALUES (smaller images stay with Pillow)
    timm_ra = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    fast = A.vectorized_shifts(timm_ra)
    wrapped = {op.name for op in fast.ops if hasattr(op.aug_fn, "__wrapped__")}
    assert wrapped == {"ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert not any(hasattr(op.aug_fn, "__wrapped__") for op in timm_ra.ops)  # timm's object is left as it was
    assert A.vectorized_shifts(transform.transforms[0]) is transform.transforms[0]  # other steps pass through
    # the decoder's worker transform is the vectorized one
    draft = decode.DraftCropDecoder(transform, "RGB")
    assert any(hasattr(op.aug_fn, "__wrapped__") for step in draft.rest for op in getattr(step, "ops", ()))

    calls = []
    real = A.axis_affine

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(A, "axis_affine", counting)
    img = images("RGB")[1].resize((96, 96))
    small = images("RGB")[0]
    for seed in range(60):
        seed_all(seed)
        ours = np.asarray(fast(img))
        after = random.random(), np.random.random_sample()
        seed_all(seed)
        theirs = np.asarray(timm_ra(img))
        assert np.array_equal(ours, theirs), seed
        assert after == (random.random(), np.random.random_sample())  # the same draws, in step
    assert len(calls) >= 10 and all(calls)  # the shear/translate ops ran, every one vectorized
    count = len(calls)
    for seed in range(20):  # a small image: Pillow's own loop, still timm's images
        seed_all(seed)
        ours = np.asarray(fast(small))
        seed_all(seed)
        assert np.array_equal(ours, np.asarray(timm_ra(small)))
    assert len(calls) == count
    # the loader's workers receive it pickled (fork server, spawn): it survives that and still gives timm's images
    revived = pickle.loads(pickle.dumps(fast))
    for seed in range(20):
        seed_all(seed)
        ours = np.asarray(revived(img))
        seed_all(seed)
        assert np.array_equal(ours, np.asarray(timm_ra(img)))
    assert len(calls) > count


def test_interpolation_is_pillows_macros_value_for_value():
    """The whole-array kernels against Pillow's BILINEAR and BICUBIC macros written out for one value in Python
    floats (C doubles, the same order of operations)."""
    rng = np.random.default_rng(2)
    taps = [rng.integers(0, 256, 500).astype(np.uint8) for _ in range(4)]
    d = rng.random(500)
    d[:5] = [0.0, 0.5, 0.25, 1 - 2**-52, 2**-40]

    def cubic(v1, v2, v3, v4, t):
        v1, v2, v3, v4 = int(v1), int(v2), int(v3), int(v4)
        p1, p2, p3, p4 = float(v2), float(-v1 + v3), float(2 * (v1 - v2) + v3 - v4), float(-v1 + v2 - v3 + v4)
        return min(max(p1 + t * (p2 + t * (p3 + t * p4)), 0.0), 255.0)

    linear = A.pillow_linear(taps[:2], d, np.empty(500))
    assert linear.tolist() == [int(a) + (int(b) - int(a)) * t for a, b, t in zip(*taps[:2], d)]
    cubics = A.pillow_cubic(taps, d, np.empty(500))
    assert cubics.tolist() == [cubic(*v, t) for *v, t in zip(*taps, d)]
