"""pipelines.data.decode: the draft decode keeps timm's crops and draws; the device decoder's crops follow timm's
distributions, and it is deterministic, shaped right and counts corrupt images (run here on the CPU)."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data import decode, loader as data
from pipelines.benchmark.loader import synthetic_jpeg
from tests.shard_helpers import write_split

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Photo-like JPEGs of several sizes: 500x375 (ImageNet's typical size: no DCT reduction at 224) up to
    1600x1200 (large crops decode at 1/2 or 1/4), one grayscale."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (1600, 1200), (375, 500), (1200, 900), (900, 1600), (640, 480)] * 3
    out = [synthetic_jpeg(rng, w, h) for w, h in sizes]
    buf = io.BytesIO()
    Image.open(io.BytesIO(out[1])).convert("L").save(buf, format="JPEG")
    return out + [buf.getvalue()]


def seed_all(seed: int) -> None:
    """The three generators timm's transform draws from (RandAugment picks its ops with numpy's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def timm_boxes(transform, images: list[bytes], seed: int) -> tuple[list[tuple], float]:
    """The (left, top, right, bottom) boxes timm's transform crops from full decodes, and the next draw after."""
    crop = transform.transforms[0]
    boxes = []
    get_params = crop.get_params

    def recording(img, scale, ratio):
        top, left, h, w = get_params(img, scale, ratio)
        boxes.append((left, top, left + w, top + h))
        return top, left, h, w

    crop.get_params = recording
    seed_all(seed)
    for raw in images:
        try:
            img = data.decode_full(raw, "RGB")
        except Exception:
            continue
        transform(img)
    return boxes, random.random()


def test_draft_decode_draws_timms_boxes_and_leaves_the_stream_in_step(jpegs):
    corrupt = [b"\xff\xd8 not really a jpeg", jpegs[0][:2000]]  # garbage; a header with a truncated body
    images = jpegs[:3] + corrupt[:1] + jpegs[3:9] + corrupt[1:] + jpegs[9:]
    transform = data.train_transform(224)  # RandAugment draws from the same stream too
    # random erasing moves to the batch (BatchFinish): the worker's stream is timm's transform without it
    expected, next_draw = timm_boxes(data.train_transform(224, re_prob=0.0), images, seed=3)

    draft = decode.DraftCropDecoder(transform, "RGB")
    seed_all(3)
    boxes, scales, skipped = [], [], 0
    for raw in images:
        try:
            drafted = draft.decode(raw)
        except Exception:
            skipped += 1
            continue
        boxes.append(drafted.box)
        scales.append(drafted.scale)
        full = Image.open(io.BytesIO(raw)).size
        assert drafted.pixels.shape[1:] == tuple(-(-n // drafted.scale) for n in full[::-1])
        out = draft.transform(drafted)
        assert out.shape == (224, 224, 3) and out.dtype == torch.uint8
    assert skipped == 2
    assert boxes == expected and random.random() == next_draw
    assert set(scales) >= {1, 2}  # some crops are decoded reduced, the 500x375 ones never
    for (left, top, right, bottom), s in zip(boxes, scales):  # the smallest decode that covers the output
        assert s == decode.draft_scale(right - left, bottom - top, 224, 224)


def test_draft_decode_matches_timms_pixels(jpegs):
    """Without RandAugment: at full scale the outputs differ only by the resize kernels' integer arithmetic
    (torch's and Pillow's: about 0.01 level on average); at a reduction the scaled IDCT and the box rounded to
    the reduced grid add a few levels on these textured images, less after an 8x8 average (low frequencies)."""
    kw = dict(auto_augment=None, re_prob=0.0)
    timm_t = data.train_transform(224, **kw)
    draft = decode.DraftCropDecoder(data.train_transform(224, **kw), "RGB")
    for k, raw in enumerate(jpegs[:12]):
        seed_all(k)
        ref = timm_t(data.decode_full(raw, "RGB"))
        seed_all(k)
        drafted = draft.decode(raw)
        out = draft.finish(draft.transform(drafted)[None])[0]
        assert out.dtype == torch.float32 and out.shape == ref.shape
        levels = (out - ref) * torch.tensor(STD).view(3, 1, 1) * 255
        low = torch.nn.functional.avg_pool2d(levels[None], 8).abs().mean()
        if drafted.scale == 1:
            assert levels.abs().mean() < 0.05, (k, levels.abs().mean())
        else:
            assert levels.abs().mean() < 5 and low < 3, (k, drafted.scale, levels.abs().mean(), low)


def test_draft_scale_and_reduced_box():
    assert decode.draft_scale(447, 1000, 224, 224) == 1
    assert decode.draft_scale(448, 448, 224, 224) == 2
    assert decode.draft_scale(1800, 1000, 224, 224) == 4
    assert decode.draft_scale(100, 100, 224, 224) == 1  # upsampled: decoded in full
    assert decode.reduced_box((3, 5, 903, 605), 2, (800, 600)) == (2, 2, 452, 302)
    assert decode.reduced_box((0, 0, 1599, 1199), 4, (400, 300)) == (0, 0, 400, 300)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (64, 400)])  # the last often falls back
def test_device_crops_follow_timms_distributions(size):
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC
    n, scale, ratio = 2000, (0.08, 1.0), (3 / 4, 4 / 3)
    img = Image.new("RGB", (size[1], size[0]))
    random.seed(0)
    ref = np.array([RRC.get_params(img, scale, ratio) for _ in range(n)], dtype=np.float64)
    gen = torch.Generator().manual_seed(0)
    ours = decode.random_resized_boxes(torch.tensor([size] * n), scale, ratio, gen).double().numpy()
    h, w = size
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    # KS at the 0.1% level for n = m = 2000: 1.949 * sqrt(2 / 2000) = 0.062
    for name, f in {"area": lambda b: b[:, 2] * b[:, 3] / (h * w), "log ratio": lambda b: np.log(b[:, 3] / b[:, 2]),
                    "top": lambda b: b[:, 0], "left": lambda b: b[:, 1]}.items():
        assert ks_distance(f(ref), f(ours)) < 0.062, name


def test_erasing_boxes_follow_timms_distribution():
    from timm.data.random_erasing import RandomErasing
    n = 2000
    erase = RandomErasing(probability=1.0, mode="const", device="cpu")
    random.seed(0)
    ref = []
    for _ in range(n):
        x = torch.ones(3, 224, 224)
        erase(x)
        ys, xs = torch.nonzero(x[0] == 0, as_tuple=True)
        ref.append((ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) if len(ys) else (0, 0, 0, 0))
    ref = np.array(ref, dtype=np.float64)
    ours = decode.erasing_boxes(n, 224, 224, 1.0, torch.Generator().manual_seed(0)).double().numpy()
    for f in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 0], lambda b: b[:, 1]):
        assert ks_distance(f(ref), f(ours)) < 0.062
    assert (decode.erasing_boxes(n, 224, 224, 0.25, torch.Generator().manual_seed(1))[:, 2] > 0).float().mean() \
        == pytest.approx(0.25, abs=0.03)


def test_batch_finish_is_timms_normalize_then_seeded_erasing():
    """The CPU path's batch end: timm's ToTensor + Normalize on uint8 (B, H, W, C), then const-mode erasing drawn
    per batch from (seed, epoch, rank, step)."""
    from timm.data.random_erasing import RandomErasing
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (16, 40, 48, 3), dtype=torch.uint8, generator=gen)
    normalize = data.train_transform(40, re_prob=0.0).transforms[-1]
    expected = torch.stack([normalize(p.permute(2, 0, 1).float() / 255) for p in pixels])
    plain = decode.BatchFinish(MEAN, STD)
    out = plain(pixels)
    assert out.shape == (16, 3, 40, 48) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, expected, atol=1e-5)

    erasing = RandomErasing(probability=1.0, mode="const", device="cpu")
    finish = decode.BatchFinish(MEAN, STD, erasing, seed=3, rank=1)
    erased = finish(pixels, epoch=2, step=5)
    zero = (erased == 0).all(1)  # erased pixels are 0 in normalized units in every channel
    assert zero.flatten(1).any(1).all()  # probability 1: every image has a box ...
    for k in range(len(pixels)):  # ... a rectangle, and everything outside it is the plain output
        ys, xs = torch.nonzero(zero[k], as_tuple=True)
        box = zero[k, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all() and torch.equal(erased[k][:, ~zero[k]], out[k][:, ~zero[k]])
    assert torch.equal(erased, decode.BatchFinish(MEAN, STD, erasing, seed=3, rank=1)(pixels, epoch=2, step=5))
    assert not torch.equal(erased, finish(pixels, epoch=2, step=6))
    assert not torch.equal(erased, decode.BatchFinish(MEAN, STD, erasing, seed=3, rank=0)(pixels, epoch=2, step=5))
    with pytest.raises(TypeError, match="const mode with one box"):
        decode.BatchFinish(MEAN, STD, RandomErasing(probability=0.5, mode="pixel", device="cpu"))


def encoded_batch(images: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    return data.concat_encoded(images)


def test_device_decoder_on_cpu_is_deterministic_shaped_and_counts_corrupt(jpegs):
    png = io.BytesIO()
    Image.new("RGB", (60, 40), (10, 200, 30)).save(png, format="PNG")
    batch = jpegs[:5] + [b"\xff\xd8 not really a jpeg", png.getvalue(), jpegs[0][:3000], b"plain text"]
    flat, lengths = encoded_batch(batch)
    targets = torch.arange(len(batch))
    kw = dict(img_size=64, mean=MEAN, std=STD, seed=5, rank=1, re_prob=0.5)
    dec = decode.DeviceDecoder("cpu", train=True, **kw)
    images, out_targets = dec(flat, lengths, targets, epoch=2, step=7)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert out_targets.tolist() == [0, 1, 2, 3, 4, 6] and dec.corrupt == 3
    again, _ = decode.DeviceDecoder("cpu", train=True, **kw)(flat, lengths, targets, epoch=2, step=7)
    assert torch.equal(images, again)  # a batch depends only on (seed, epoch, rank, step)
    other, _ = dec(flat, lengths, targets, epoch=2, step=8)
    assert not torch.equal(images, other)
    assert images.min() >= (0 - max(MEAN)) / min(STD) - 1e-5 and images.max() <= (1 - min(MEAN)) / min(STD) + 1e-5

    ev = decode.DeviceDecoder("cpu", train=False, img_size=64, mean=MEAN, std=STD, crop_pct=0.875)
    out, _ = ev(flat, lengths, targets)
    assert out.shape == (6, 3, 64, 64) and ev.corrupt == 3
    # the PNG is one colour: its centre crop is that colour, normalized
    expected = (torch.tensor([10, 200, 30]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[5, :, 32, 32], expected, atol=1e-4)

    gray = decode.DeviceDecoder("cpu", train=True, img_size=32, in_chans=1, mean=(0.45,), std=(0.226,))
    assert gray(*encoded_batch(jpegs[:3]), targets[:3])[0].shape == (3, 1, 32, 32)


def test_gpu_decode_loader_on_cpu_same_labels_as_cpu_decode_and_repeatable(tmp_path):
    write_split(tmp_path / "clean", "train", [8] * 4)
    write_split(tmp_path / "bad", "train", [8] * 4, corrupt={(1, 3)})
    kw = dict(batch_size=4, img_size=32, num_classes=4, num_workers=2, seed=1, label_smoothing=0.0,
              auto_augment=None, shuffle_buffer=16)

    def epoch(loader):
        loader.set_epoch(0)
        return [(x, y) for x, y in loader]

    cpu_batches = epoch(data.create_train_loader(str(tmp_path / "clean"), **kw))
    gpu = data.create_train_loader(str(tmp_path / "clean"), decode="gpu", device="cpu", re_prob=0.25, **kw)
    gpu_batches = epoch(gpu)
    assert [y.tolist() for _, y in gpu_batches] == [y.tolist() for _, y in cpu_batches]
    assert all(x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 for x, _ in gpu_batches)
    again = epoch(gpu)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gpu_batches, again))

    bad = data.create_train_loader(str(tmp_path / "bad"), decode="gpu", device="cpu", **kw)
    sizes = [len(y) for _, y in epoch(bad)]
    assert sorted(sizes) == [3] + [4] * 7 and bad.stats["corrupt_skipped"] == 1


def test_gpu_decode_runs_randaugment_and_refuses_other_policies(tmp_path):
    write_split(tmp_path, "train", [8] * 4)
    kw = dict(batch_size=4, img_size=32, num_classes=4, num_workers=2, decode="gpu", device="cpu", seed=1)
    loader = data.create_train_loader(str(tmp_path), auto_augment="rand-m9-mstd0.5-inc1", **kw)
    plain = data.create_train_loader(str(tmp_path), auto_augment=None, **kw)
    for each in (loader, plain):
        each.set_epoch(0)
    first = [images for images, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in loader]))  # seeded per batch
    assert not all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in plain]))  # it augments
    with pytest.raises(ValueError, match="runs RandAugment"):
        data.create_train_loader(str(tmp_path), auto_augment="original", **kw)


# ----------------------------------------------------------------------------------------------------------
# RandAugment on the device: each op against timm's Pillow op, then the per-image draws


@pytest.fixture(scope="module")
def small_images() -> tuple[list[np.ndarray], torch.Tensor]:
    """Noise and smooth images (odd sizes) as uint8 arrays and as one float (B, 3, H, W) batch of whole values."""
    from PIL import ImageFilter
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (37, 45, 3), dtype=np.uint8) for _ in range(3)]
    arrays = noise + [np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))) for a in noise]
    return arrays, torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() for a in arrays])


def pillow_batch(arrays, fn, *args, **kwargs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(fn(Image.fromarray(a), *args, **kwargs)).copy()).permute(2, 0, 1)
                        for a in arrays]).float()


def test_device_randaugment_ops_match_timms_pillow_ops(small_images):
    """Point and colour ops: Pillow's values exactly; geometric ops (bilinear): within one level, on under 5% of the
    pixels (float32 positions against Pillow's doubles)."""
    import timm.data.auto_augment as aa
    from pipelines.data import augment
    arrays, x = small_images
    n = len(arrays)

    def full(v):
        return torch.full((n,), float(v))
    exact = [(augment.auto_contrast(x), pillow_batch(arrays, aa.auto_contrast)),
             (augment.equalize(x), pillow_batch(arrays, aa.equalize)),
             (augment.invert(x), pillow_batch(arrays, aa.invert)),
             (augment.posterize(x, full(2)), pillow_batch(arrays, aa.posterize, 2)),
             (augment.solarize(x, full(100)), pillow_batch(arrays, aa.solarize, 100)),
             (augment.solarize_add(x, full(60)), pillow_batch(arrays, aa.solarize_add, 60))]
    for f in (0.1, 0.6, 1.7):
        exact += [(augment.color(x, full(f)), pillow_batch(arrays, aa.color, f)),
                  (augment.contrast(x, full(f)), pillow_batch(arrays, aa.contrast, f)),
                  (augment.brightness(x, full(f)), pillow_batch(arrays, aa.brightness, f)),
                  (augment.sharpness(x, full(f)), pillow_batch(arrays, aa.sharpness, f))]
    for k, (got, want) in enumerate(exact):
        assert torch.equal(got, want), (k, (got - want).abs().max())
    fill = (124, 116, 104)
    for kind, fn, v in (("Rotate", aa.rotate, 17.3), ("ShearX", aa.shear_x, 0.21), ("ShearY", aa.shear_y, -0.13),
                        ("TranslateXRel", aa.translate_x_rel, 0.31), ("TranslateYRel", aa.translate_y_rel, -0.2)):
        got = augment.affine(x, augment._matrices(kind, full(v), (37, 45)), torch.tensor(fill, dtype=torch.float32))
        off = (got - pillow_batch(arrays, fn, v, resample=Image.BILINEAR, fillcolor=fill)).abs()
        assert off.max() <= 1 and (off > 0).float().mean() < 0.05, (kind, off.max(), (off > 0).float().mean())


def test_device_randaugment_draws_like_timm_and_is_seeded(small_images):
    from pipelines.data import augment
    transform = data.train_transform(32, auto_augment="rand-m9-mstd0.5-inc1")
    rand_augment = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    device_ra = augment.DeviceRandAugment(rand_augment, (124, 116, 104))
    chosen, args = device_ra.draw(6000, torch.Generator().manual_seed(0))
    assert chosen.shape == (6000, 2)
    counts = torch.bincount(chosen.flatten(), minlength=15).double()
    assert ((counts - 800).abs() < 120).all()  # uniform over the 15 ops, with replacement (sd ~27)
    applied = torch.tensor([[a is not None for a in row] for row in args]).double().mean()
    assert abs(applied - 0.5) < 0.02  # each op's probability 0.5
    rotations = [a[0] for row, ops in zip(args, chosen.tolist()) for a, k in zip(row, ops)
                 if a is not None and rand_augment.ops[k].name == "Rotate"]
    assert max(map(abs, rotations)) <= 30 and 0.4 < np.mean([r > 0 for r in rotations]) < 0.6  # timm's signs
    assert abs(np.mean(np.abs(rotations)) - 27) < 1  # magnitude 9 of 10 (noise 0.5): 27 degrees on average
    _, x = small_images
    state = random.getstate()
    out = device_ra(x, torch.Generator().manual_seed(3))
    assert random.getstate() == state  # Python's random untouched
    assert torch.equal(out, device_ra(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, device_ra(x, torch.Generator().manual_seed(4)))
    assert out.shape == x.shape and torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255


@pytest.mark.slow
def test_train_runs_with_gpu_decode_on_cpu(shards, tmp_path):
    """The trainer with data.decode=gpu on a CPU rank: workers read bytes, the rank decodes (PNGs here), trains
    and evaluates."""
    from tests.trainer_runs import launch, ok
    out = ok(launch(tmp_path / "run", shards, "data.decode=gpu", "schedule.epochs=1", "data.num_workers=1",
                    nproc=1, timeout=240))
    assert "top1" in out

