"""The Triton Toeplitz kernels (models/triton_toeplitz.py) against the PyTorch paths, on CPU under the Triton
interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is imported; on a CUDA machine they run compiled on the
GPU)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import require

try:
    from models import triton_toeplitz
except ImportError as exc:  # Triton ships with torch's Linux wheels: missing in CI is a failure, not a skip
    require(False, f"Triton is not importable ({exc})")

from models import MRConv  # noqa: E402
from models import kernels as K  # noqa: E402

from .mrconv_reference import (compare_with_reference, compiled_forms_match_eager,  # noqa: E402
                              moved_layer, naive_conv)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("length", [1, 5, 17, 37])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_conv_adjoint_and_lag_grad_equal_naive(length, bidirectional):
    """Odd and prime lengths, batch not a multiple of the tile, kernels shorter and longer than the input."""
    torch.manual_seed(length)
    u = torch.randn(3, 2, length, dtype=torch.float64, requires_grad=True)
    for klen in (3, 2 * length + 1):
        kernels = torch.randn(2 if bidirectional else 1, 2, 2, klen, dtype=torch.float64, requires_grad=True)
        fwd, bwd = K.truncate(kernels, length)
        ref = torch.stack([naive_conv(u, kernels[0, i], kernels[1, i] if bidirectional else None) for i in range(2)], 1)
        op = K.LongConv(fwd.float().detach(), None if bwd is None else bwd.float().detach(), length, "triton")
        x = u.detach().float().to(DEVICE)
        y = op.conv(op.prepare(x)).cpu().double()
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        for center in (ref.mean(dim=(0, 3)), torch.randn(2, 2, dtype=torch.float64)):  # reduced on chip, per tile
            want = (ref - center[None, :, :, None]).square().sum(dim=(0, 3))
            got = op.centred_square_sums(x, center.float().to(DEVICE)).cpu().double()
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        grad = torch.randn_like(ref)
        ref_du, ref_dk = torch.autograd.grad(ref, (u, kernels), grad)
        du, dk_fwd, dk_bwd = op.backward(grad.float().to(DEVICE), x)
        assert (du.cpu().double() - ref_du).abs().max() <= 1e-5 * ref_du.abs().max()
        assert (dk_fwd.cpu().double() - ref_dk[0, ..., :fwd.shape[-1]]).abs().max() <= 1e-5 * ref_dk.abs().max()
        if bidirectional and length > 1:
            assert (dk_bwd.cpu().double() - ref_dk[1, ..., :bwd.shape[-1]]).abs().max() <= 1e-5 * ref_dk.abs().max()


def test_custom_op_autograd_matches_the_toeplitz_path():
    torch.manual_seed(0)
    lags = torch.randn(2, 3, 2 * 20 - 1, device=DEVICE, requires_grad=True)
    x = torch.randn(4, 3, 20, device=DEVICE, requires_grad=True)
    y = triton_toeplitz.toeplitz_conv(x, lags, -19, 19)
    mats = lags.unfold(-1, 20, 1).flip(-1)
    ref = K.toeplitz_conv(x, mats)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, lags), grad)
    want = torch.autograd.grad(ref, (x, lags), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.library.opcheck(triton_toeplitz.toeplitz_conv, (x.detach(), lags.detach(), -19, 19),
                                 test_utils=("test_schema", "test_faketensor"))
    assert torch.library.opcheck(triton_toeplitz.toeplitz_square_sums,
                                 (x.detach(), lags.detach(), torch.randn(2, 3, device=DEVICE), -19, 19),
                                 test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_training_form_with_triton_equals_reference(bidirectional):
    layer = moved_layer("fourier_sparse", bidirectional, "triton", dtype=torch.float32).to(DEVICE)
    compare_with_reference(layer, 2 * torch.randn(3, layer.dim, 23, device=DEVICE) + 0.5, "toeplitz", rtol=1e-4)


def test_fused_triton_layer_equals_fft_layer_and_folds_exactly():
    torch.manual_seed(0)
    layer = MRConv(4, 40, 5, conv_impl="triton").to(DEVICE)
    layer(torch.randn(3, 4, 40, device=DEVICE)).sum().backward()  # statistics move
    layer.eval()
    fused = copy.deepcopy(layer)
    fused.reparameterize()
    u = torch.randn(2, 4, 40, device=DEVICE)
    with torch.no_grad():
        ref = layer(u)
        out = fused(u)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    fft = copy.deepcopy(fused)
    fft.conv_impl, fft._cache = "fft", None
    with torch.no_grad():
        assert (fft(u) - out).abs().max() <= 1e-5 * out.abs().max()


def test_fused_triton_layer_reads_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the fused Triton layer reads its input in bf16, as autocast has a depthwise conv read it
    (fp32 accumulation); outside autocast the input is taken as given."""
    torch.manual_seed(0)
    layer = MRConv(4, 40, 5, conv_impl="triton", inference_mode=True).to(DEVICE).eval()
    with torch.no_grad():
        for p in layer.parameters():  # the fused form starts at zero
            p.normal_()
    seen = []
    original = triton_toeplitz.toeplitz_conv
    monkeypatch.setattr(triton_toeplitz, "toeplitz_conv", lambda x, *a: seen.append(x.dtype) or original(x, *a))
    u = torch.randn(2, 4, 40, device=DEVICE)
    with torch.no_grad():
        ref = layer(u)
        with torch.autocast(device_type=u.device.type, dtype=torch.bfloat16):
            out = layer(u)
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32  # the layer returns its input's dtype
    assert 0 < (out - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 input rounding, nothing more


def test_compile_fullgraph_traces_mrconvnext():
    """No graph break in any form of the whole model (aot_eager: the tracing, without needing a C++ compiler)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=32, num_classes=10)
    compiled_forms_match_eager(model, torch.randn(2, 3, 32, 32))


def test_compile_fullgraph_traces_the_triton_custom_ops():
    """The same for a layer on the Triton ops (one layer: the interpreter is slow at model size)."""
    torch.manual_seed(0)
    compiled_forms_match_eager(MRConv(4, 20, 5, conv_impl="triton").to(DEVICE), torch.randn(2, 4, 20, device=DEVICE))


_COMPILE_FOR_SM90 = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from models import triton_toeplitz as T
kernel = T._toeplitz_kernel
ints = ("B", "D", "L", "NK", "span_lo", "span_hi", "x_kstride", "y_kstride")
shared = {}
for mode, sum_k, squares, dtype in (("fan-out", False, False, "bf16"), ("fan-in", True, False, "bf16"),
                                   ("squares", False, True, "bf16"), ("fp32 fan-out", False, False, "fp32")):
    consts = dict(SUM_K=sum_k, SQUARES=squares, FP32_PREC="tf32x3" if dtype == "fp32" else "", WIDEN=False,
                  BLOCK_T=32, BLOCK_S=32, BLOCK_B=32)
    sig = {name: "constexpr" if name in consts else "i32" if name in ints else
           f"*{dtype}" if name in ("x_ptr", "lags_ptr") else "*fp32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4))
    shared[mode] = compiled.metadata.shared
print(json.dumps(shared))
"""


def test_kernel_compiles_for_sm90_in_every_mode():
    """The interpreter runs what a GPU compiler may refuse: Triton's own compiler and ptxas (no GPU needed) build the
    bf16 kernel for sm_90 in its three modes, and the fp32 one (3xTF32 products)."""
    from tests.triton_compile import shared_memory
    shared = shared_memory(_COMPILE_FOR_SM90)
    assert set(shared) == {"fan-out", "fan-in", "squares", "fp32 fan-out"}, shared
    assert max(shared.values()) <= 163 * 1024, shared
