"""GPU correctness (CUDA): the fold stays exact with cuFFT/cuBLAS/cuDNN, bf16 autocast trains a BatchNorm
model, the Triton kernels at stage shapes, and data.decode=gpu (nvJPEG) is deterministic and resumes exactly. CI
has no GPU: these run where one is present (`pytest tests/test_gpu.py` on a GPU machine)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import models  # noqa: F401
from models import MRConv
from models import kernels as K

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would make fp32 convolutions and matmuls approximate (~1e-3), hiding what the fold does."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("impl", ["fft", "toeplitz", "triton"])
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated", "dense"])
def test_fold_is_exact_on_cuda(kernel_type, impl):
    torch.manual_seed(0)
    layer = MRConv(32, 784, 49, kernel_type=kernel_type, conv_impl=impl).cuda()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        loss = layer(torch.randn(4, 32, 784, device="cuda") * 2 + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    fused = copy.deepcopy(layer)
    fused.reparameterize()
    x = torch.randn(4, 32, 784, device="cuda")
    with torch.inference_mode():
        ref, out = layer(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bf16_autocast_trains_a_batchnorm_model_on_cuda():
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=64, num_classes=4, ls_init_value=1.0).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x = torch.randn(16, 3, 64, 64, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())

    model.eval()
    fused = timm.utils.reparameterize_model(model)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused(x)
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()  # bf16 matmuls, fp32 FFTs


@pytest.mark.parametrize("length, l0", [(3136, 196), (784, 49), (196, 28), (49, 28)])
def test_triton_training_form_equals_the_reference_at_stage_shapes(length, l0):
    """The Triton kernels compiled on the GPU, at the ConvNeXt-T stage lengths (the FFT kernel at 3136, Toeplitz
    tiles below): output, every gradient and the running statistics against the old implementation (fp32 inputs,
    the kernels' 3xTF32 products)."""
    from .mrconv_reference import reference_forward

    torch.manual_seed(0)
    layer = MRConv(16, length, l0, conv_impl="triton").cuda()
    ref_layer = copy.deepcopy(layer)
    x = (torch.randn(8, 16, length, device="cuda") * 2 + 0.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = reference_forward(ref_layer, x_ref, "fft")
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()
    assert (x.grad - x_ref.grad).abs().max() <= 1e-4 * x_ref.grad.abs().max()
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max(), name
    torch.testing.assert_close(layer.norm.running_var, ref_layer.norm.running_var, rtol=1e-4, atol=1e-6)


def test_triton_fused_bf16_is_as_close_as_a_bf16_depthwise_conv():
    """bf16 input on the Triton path: error of the same order as bf16 autocast gives a 7x7 depthwise conv."""
    torch.manual_seed(0)
    layer = MRConv(64, 784, 49, conv_impl="triton").cuda().eval()
    layer.reparameterize()
    x = torch.randn(16, 64, 784, device="cuda")
    with torch.inference_mode():
        ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        dw = torch.nn.Conv2d(64, 64, 7, padding=3, groups=64).cuda()
        x2d = x.view(16, 64, 28, 28)
        dw_ref = dw(x2d)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            dw_out = dw(x2d)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    dw_err = (dw_out.float() - dw_ref).abs().max() / dw_ref.abs().max()
    assert err <= 4 * dw_err + 1e-3, (err, dw_err)


@pytest.mark.parametrize("length, l0, dim", [(3136, 196, 96), (784, 49, 192)])
def test_triton_fft_fused_layer_at_stage_shapes(length, l0, dim, monkeypatch):
    """The fused FFT kernel compiled on the GPU at the first two ConvNeXt-T stage shapes (n = 8192 and 2048; at 784
    the threshold is lowered, Toeplitz tiles take it by default): fp32 within 1e-5 of conv_impl="fft", a bf16 input
    (bf16 output) within the bound the Toeplitz test above gives a 7x7 depthwise conv under bf16 autocast."""
    monkeypatch.setattr(K, "TRITON_MAX_LEN", 0)
    torch.manual_seed(0)
    layer = MRConv(dim, length, l0, conv_impl="triton").cuda().eval()
    layer.reparameterize()
    fft = copy.deepcopy(layer)
    fft.conv_impl = "fft"
    side = int(length ** 0.5)
    x = torch.randn(8, dim, length, device="cuda")
    dw = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim).cuda()
    with torch.inference_mode():
        ref, out = fft(x), layer(x)
        assert layer._cache[1].impl == "triton_fft"
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        half = layer(x.bfloat16())  # MRConv turns autocast off inside: a bf16 input is what reaches the kernel
        dw_ref = dw(x.view(8, dim, side, side))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            dw_half = dw(x.view(8, dim, side, side))
    err = (half.float() - ref).abs().max() / ref.abs().max()
    dw_err = (dw_half.float() - dw_ref).abs().max() / dw_ref.abs().max()
    assert err <= 4 * dw_err + 1e-3, (err, dw_err)


def _gpu_loader(root, **kw):
    from pipelines.data import loader as data
    kw = {"auto_augment": None, **kw}
    return data.create_train_loader(str(root), batch_size=8, img_size=64, num_classes=4, num_workers=2, seed=3,
                                    re_prob=0.25, decode="gpu", device="cuda", **kw)


@pytest.mark.parametrize("auto_augment", [None, "rand-m9-mstd0.5-inc1"])
def test_gpu_decode_is_deterministic_and_resume_exact(tmp_path, auto_augment):
    """data.decode=gpu: nvJPEG decode + crop/flip/(RandAugment)/normalize/erasing on CUDA. The same epoch twice
    gives the same batches, and a loader resumed mid-epoch (skipping the consumed batches, as train.loop does) gives
    the rest of them bit for bit."""
    from tests.shard_helpers import write_split
    write_split(tmp_path, "train", [16] * 4, corrupt={(2, 5)})
    loader = _gpu_loader(tmp_path, label_smoothing=0.0, auto_augment=auto_augment)
    loader.set_epoch(1)
    first = [(x.clone(), y.clone()) for x, y in loader]
    assert all(x.device.type == "cuda" and x.dtype == torch.float32 and x.shape[1:] == (3, 64, 64)
               for x, _ in first)
    # the shuffle buffer draws from an endless re-read of the worker's shards: the bad sample may come twice
    assert loader.stats["corrupt_skipped"] >= 1
    assert sum(len(y) for _, y in first) == 64 - loader.stats["corrupt_skipped"]
    loader.set_epoch(1)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, loader))

    resumed = _gpu_loader(tmp_path, label_smoothing=0.0, auto_augment=auto_augment)
    resumed.set_epoch(1)
    it = iter(resumed)
    for _ in range(3):
        next(it)
    rest = list(it)
    assert len(rest) == len(first) - 3
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first[3:], rest))


def test_gpu_decode_matches_the_same_pipeline_on_cpu_and_mixes_on_cuda(tmp_path):
    """nvJPEG and libjpeg-turbo decode to within a few levels; crop boxes, flips and erasing are drawn on the
    CPU from the same generator, so the CUDA batch is the CPU batch up to decode and resize rounding."""
    import numpy as np

    from pipelines.data import decode
    from pipelines.benchmark.loader import synthetic_jpeg
    rng = np.random.default_rng(0)
    jpegs = [synthetic_jpeg(rng, w, h) for w, h in [(500, 375), (375, 500), (640, 480), (800, 600)] * 4]
    from pipelines.data.loader import concat_encoded
    flat, lengths = concat_encoded(jpegs)
    targets = torch.arange(len(jpegs))
    kw = dict(train=True, img_size=96, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed=1, re_prob=0.5)
    on_gpu, t_gpu = decode.DeviceDecoder("cuda", **kw)(flat, lengths, targets, epoch=0, step=4)
    on_cpu, t_cpu = decode.DeviceDecoder("cpu", **kw)(flat, lengths, targets, epoch=0, step=4)
    assert torch.equal(t_gpu.cpu(), t_cpu)
    levels = (on_gpu.cpu() - on_cpu).abs() * 0.225 * 255
    assert levels.mean() < 4.0, levels.mean()  # nvJPEG's IDCT and chroma upsampling are not libjpeg's

    from tests.shard_helpers import write_split
    write_split(tmp_path, "train", [16] * 4)
    mixed = _gpu_loader(tmp_path, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixed.set_epoch(0)
    x, y = next(iter(mixed))
    assert x.device.type == "cuda" and y.device.type == "cuda" and y.shape == (8, 4) and y.dtype == torch.float32


def test_device_randaugment_on_cuda_matches_cpu():
    """The same draws (from the CPU generator) on either device; the ops' float arithmetic may round a level apart."""
    from pipelines.data import augment, loader as data
    transform = data.train_transform(64, auto_augment="rand-m9-mstd0.5-inc1")
    rand_augment = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    device_ra = augment.DeviceRandAugment(rand_augment, (124, 116, 104))
    x = torch.randint(0, 256, (64, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    on_cpu = device_ra(x, torch.Generator().manual_seed(5))
    on_gpu = device_ra(x.cuda(), torch.Generator().manual_seed(5)).cpu()
    off = (on_gpu - on_cpu).abs()
    assert off.max() <= 2 and off.mean() < 0.05, (off.max(), off.mean())
