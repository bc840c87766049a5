"""fvcore FLOP counting with FFT handles, checked against counts worked out by hand."""
from __future__ import annotations

import copy
import math

import timm
import pytest
import torch

import models  # noqa: F401
from models import MRConv
from models import kernels as K
from pipelines.flops import count_flops, fft_macs


def test_fft_convention():
    assert fft_macs(8, rows=1) == 1.25 * 8 * 3
    assert fft_macs(1024, rows=3) == 3 * 1.25 * 1024 * 10
    assert fft_macs(1, rows=5) == 0.0


def test_fused_layer_counts_one_transform_each_way_per_row():
    batch, dim, length = 2, 6, 50
    layer = MRConv(dim, length, 5, conv_impl="fft")
    layer.reparameterize()
    n = K.fft_size(length, length, length - 1)
    # two real rows per complex transform: one forward and one inverse per input row at the real rate; the kernel
    # spectrum is cached: not counted
    expected = 2 * 1.25 * batch * dim * n * math.log2(n)
    report = count_flops(layer, input_size=(dim, length), batch_size=batch)
    assert report.macs == pytest.approx(expected, rel=1e-12)
    assert not any(name.startswith("aten::fft") for name in report.unsupported)


def test_unfused_fourier_layer_in_eval_counts_kernel_synthesis_and_one_convolution():
    """In eval mode the training form applies its folded kernel: the per-branch kernels are synthesised (one matmul
    with the Fourier basis) and folded, then one spectrum, one input and one output transform per row, as the fused
    layer (which caches its spectrum)."""
    batch, dim, length, l0 = 2, 4, 40, 5
    layer = MRConv(dim, length, l0, kernel_type="fourier", conv_impl="fft")
    n = K.fft_size(length, length, length - 1)
    expected = 2 * layer.num_branches * dim * 2 * layer.n_modes * length  # (dirs, N, D, 2m) @ (N, 2m, l) MACs
    expected += fft_macs(n, rows=dim, per_point=2.5)  # complex spectrum of the folded kernel
    expected += fft_macs(n, rows=batch * dim) * 2  # input and output transforms (two real rows per complex one)
    report = count_flops(layer, input_size=(dim, length), batch_size=batch)
    assert report.macs == pytest.approx(expected, rel=1e-12)


def test_fused_model_counts_close_to_convnext():
    mr = timm.create_model("mrconvnext_atto", img_size=64)
    fused = timm.utils.reparameterize_model(copy.deepcopy(mr))
    base = count_flops(timm.create_model("convnext_atto"), (3, 64, 64))
    unfused, fused_r = count_flops(mr, (3, 64, 64)), count_flops(fused, (3, 64, 64))
    assert fused_r.macs < unfused.macs
    assert 0.5 * base.macs < fused_r.macs < 1.5 * base.macs  # the mixers are a small share of the MACs


def test_a_triton_model_counts_on_the_cpu_as_auto(monkeypatch):
    """fvcore counts a CPU copy of the model (``benchmark models`` does so for a model that runs on a GPU): outside
    Triton's interpreter, which the tests set, conv_impl="triton" takes what ``auto`` takes there, and the count
    equals the default model's, where the kernels cannot launch at all."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = MRConv(4, 300, 5, conv_impl="triton")
    assert layer._impl(300, torch.device("cpu")) == MRConv(4, 300, 5)._impl(300, torch.device("cpu"))
    assert layer._impl(300, torch.device("cuda")) == "triton"
    triton_model = timm.create_model("mrconvnext_atto", img_size=64, conv_impl="triton")
    default = timm.create_model("mrconvnext_atto", img_size=64)
    assert count_flops(triton_model, (3, 64, 64)).macs == count_flops(default, (3, 64, 64)).macs
