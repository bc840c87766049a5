"""The fused Triton FFT convolution (models/triton_fft.py): the four-step factorization in float64, the kernel against
a naive convolution, its custom ops, and MRConv(conv_impl="triton") on it against conv_impl="fft". On CPU the kernel
runs under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1); on a CUDA machine it runs compiled.

MRConv takes the FFT kernel only above kernels.TRITON_MAX_LEN (784), too long for the interpreter at layer level, so
the layer tests lower that threshold."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import require

try:
    from models import triton_fft
except ImportError as exc:  # Triton ships with torch's Linux wheels: missing in CI is a failure, not a skip
    require(False, f"Triton is not importable ({exc})")

from models import MRConv  # noqa: E402
from models import kernels as K  # noqa: E402

from .mrconv_reference import (compare_with_reference, compiled_forms_match_eager,  # noqa: E402
                              moved_layer, naive_conv)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fft_everywhere(monkeypatch):
    """LongConv(impl="triton") takes the FFT kernel at every length."""
    monkeypatch.setattr(K, "TRITON_MAX_LEN", 0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want.cpu().double()).abs().max() / want.abs().max()).item()


def test_sizes_and_factors():
    assert [triton_fft.monarch_size(length, 1, 0) for length in (1, 256, 257, 3136, 8192)] == [
        256, 256, 512, 4096, 8192]
    assert triton_fft.monarch_size(3136, 3136, 3135) == 8192  # 6271 without wrap-around
    assert triton_fft.monarch_size(4097, 4097, 0) is None
    assert {n: triton_fft.factors(n) for n in (256, 512, 1024, 2048, 4096, 8192)} == {
        256: (16, 16), 512: (32, 16), 1024: (32, 32), 2048: (64, 32), 4096: (16, 256), 8192: (32, 256)}
    assert [triton_fft.inner_factor(n) for n in (2048, 4096, 8192)] == [0, 16, 16]
    assert triton_fft.factors(8192, dense=True) == (128, 64) and triton_fft.inner_factor(8192, dense=True) == 0
    assert triton_fft.factored_on(torch.device("cpu"))
    # the L = 3136 stage: 16 rows of 256 hold its input; the dense 128 x 64 held it in 64 rows of 64 and made
    # n (4 x 64 + 8 x 64) = 6.3 M
    assert triton_fft.input_rows(8192, 3136) == 16
    assert triton_fft.row_macs(8192, 3136) == 8192 * (4 * 16 + 16 * 16) == 2_621_440
    assert triton_fft.row_macs(2048, 784) == 2048 * (4 * 32 + 8 * 32)  # dense 64 x 32, 25 of 64 rows -> 32
    assert triton_fft.row_macs(8192, 3136, dense=True) == 8192 * (4 * 64 + 8 * 64)  # 49 of 128 rows of 64 -> 64


def row_dft(a: torch.Tensor, row: torch.Tensor, n: int, conj: bool = False) -> torch.Tensor:
    """The kernel's row DFT written in torch (``_row_dft``), from ``dft_factors``' row factor: dense, or the 16 x 16
    steps."""
    m = triton_fft.inner_factor(n)
    if not m:
        f2 = torch.complex(row[0], row[1])
        return a @ (f2.conj() if conj else f2)
    g, tw = (torch.complex(t[0], t[1]) for t in row)
    if conj:
        g, tw = g.conj(), tw.conj()
    grid = a.reshape(*a.shape[:-1], m, m)
    grid = (grid @ g if conj else g @ grid) * tw
    return (g @ grid if conj else grid @ g).reshape(a.shape)


@pytest.mark.parametrize("n", [256, 512, 2048, 4096, 8192])
def test_four_step_factorization_equals_torch_fft_in_float64(n):
    """The kernel's algorithm written in torch, with the module's factors and spectrum layout: forward four steps =
    ``fft``, inverse four steps (real part) = ``ifft``; from 4096 with the row DFT factored again."""
    torch.manual_seed(0)
    f1_planes, row, tw_planes = triton_fft.dft_factors(n, "cpu", torch.float64)
    f1, tw = torch.complex(f1_planes[0], f1_planes[1]), torch.complex(tw_planes[0], tw_planes[1])
    n1, n2 = triton_fft.factors(n)
    x = torch.randn(3, n - 37, dtype=torch.float64)
    grid = torch.nn.functional.pad(x, (0, 37)).reshape(3, n1, n2).to(torch.complex128)
    spectrum = row_dft((f1 @ grid) * tw, row, n)
    want = triton_fft._to_monarch(torch.fft.fft(x, n=n), n)
    assert (torch.stack([spectrum.real, spectrum.imag], dim=-3) - want).abs().max() <= 1e-12 * want.abs().max()

    full = torch.randn(3, n, dtype=torch.complex128)
    y_hat = triton_fft._to_monarch(full, n)
    inner = row_dft(torch.complex(y_hat[:, 0], y_hat[:, 1]), row, n, conj=True) * tw.conj()
    back = (f1.real @ inner.real + f1.imag @ inner.imag).reshape(3, n) / n
    assert (back - torch.fft.ifft(full).real).abs().max() <= 1e-12


# (length, forward taps, backward taps or None, kernels K, batch): odd and prime lengths, L much shorter than n, a
# kernel as long as the input, causal, input in every row of the (N1, N2) grid (300 of n = 512), and batches that are
# not a multiple of anything
CASES = [(97, 37, 20, 2, 3), (131, 131, None, 1, 5), (5, 3, 4, 3, 2), (61, 61, 60, 2, 1), (300, 40, None, 1, 2)]


@pytest.mark.parametrize("length, lf, lb, nk, batch", CASES)
def test_conv_adjoint_and_kernel_grad_equal_naive(length, lf, lb, nk, batch, fft_everywhere):
    torch.manual_seed(length)
    dim = 2
    u = torch.randn(batch, dim, length, dtype=torch.float64, requires_grad=True)
    fwd = torch.randn(nk, dim, lf, dtype=torch.float64, requires_grad=True)
    bwd = None if lb is None else torch.randn(nk, dim, lb, dtype=torch.float64, requires_grad=True)
    ref = torch.stack([naive_conv(u, fwd[i], None if bwd is None else bwd[i]) for i in range(nk)], 1)
    op = K.LongConv(fwd.detach().float().to(DEVICE), None if bwd is None else bwd.detach().float().to(DEVICE),
                    length, "triton")
    assert op.impl == "triton_fft" and op.n == triton_fft.monarch_size(length, lf, lb or 0)
    x = u.detach().float().to(DEVICE)
    assert relative_error(op.conv(op.prepare(x)), ref) <= 1e-5
    grad = torch.randn_like(ref)
    wanted = (u, fwd) if bwd is None else (u, fwd, bwd)
    ref_du, ref_dkf, *ref_dkb = torch.autograd.grad(ref, wanted, grad)
    du, dkf, dkb = op.backward(grad.float().to(DEVICE), x)
    assert relative_error(du, ref_du) <= 1e-5
    assert relative_error(dkf, ref_dkf) <= 1e-5
    assert dkb is None if bwd is None else relative_error(dkb, ref_dkb[0]) <= 1e-5


@pytest.mark.parametrize("length, lf, lb, nk, batch", CASES[:4])
def test_square_sums_equal_naive(length, lf, lb, nk, batch, fft_everywhere):
    """The on-chip reduction: sum over batch and the L outputs of (k_i * u - c_i)^2, against the float64 naive
    convolution, centred near its mean (as the training form centres it) and off it."""
    torch.manual_seed(length + 1)
    dim = 3
    u = torch.randn(batch, dim, length, dtype=torch.float64) + 0.3
    fwd = torch.randn(nk, dim, lf, dtype=torch.float64)
    bwd = None if lb is None else torch.randn(nk, dim, lb, dtype=torch.float64)
    ref = torch.stack([naive_conv(u, fwd[i], None if bwd is None else bwd[i]) for i in range(nk)], 1)
    op = K.LongConv(fwd.float().to(DEVICE), None if bwd is None else bwd.float().to(DEVICE), length, "triton")
    assert op.impl == "triton_fft"
    x = u.float().to(DEVICE)
    for center in (ref.mean(dim=(0, 3)), torch.randn(nk, dim, dtype=torch.float64)):
        want = (ref - center[None, :, :, None]).square().sum(dim=(0, 3))
        got = op.centred_square_sums(x, center.float().to(DEVICE))
        assert got.shape == (nk, dim) and relative_error(got, want) <= 1e-5
    args = (x, op.operator, center.float().to(DEVICE), *op.dft)
    torch.library.opcheck(triton_fft.fft_square_sums, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_read_as_given(dtype, fft_everywhere):
    """bf16/fp16 rows go in unconverted (TF32 products on a GPU): within 1e-2 of the float64 convolution of the
    unrounded input (bf16 rounding alone is 2**-9 per element; the interpreter computes in fp32), and within 1e-5 of
    the float64 convolution of the rounded input under the interpreter."""
    torch.manual_seed(0)
    u = torch.randn(3, 2, 97, dtype=torch.float64)
    fwd, bwd = torch.randn(2, 2, 97, dtype=torch.float64), torch.randn(2, 2, 96, dtype=torch.float64)
    op = K.LongConv(fwd.float().to(DEVICE), bwd.float().to(DEVICE), 97, "triton")
    y = op.conv(u.to(DEVICE, dtype))
    assert y.dtype == torch.float32
    ref = torch.stack([naive_conv(u, fwd[i], bwd[i]) for i in range(2)], 1)
    assert relative_error(y, ref) <= 1e-2
    if DEVICE == "cpu":
        rounded = u.to(dtype).double()
        assert relative_error(y, torch.stack([naive_conv(rounded, fwd[i], bwd[i]) for i in range(2)], 1)) <= 1e-5


@pytest.mark.parametrize("length, n, dense", [(2100, 8192, False), (1500, 4096, False), (2100, 8192, True)])
def test_factored_sizes_equal_torch_fft(length, n, dense, monkeypatch):
    """The sizes whose row DFT is factored again: n = 8192 (the L = 3136 stage's size: N1 = 32, N2 = 256 = 16 x 16,
    two row blocks) and 4096 (N1 = 16, one block), against torch.fft in float64: conv, adjoint and square sums; and
    n = 8192 with the dense row DFT (128 x 64) that CUDA devices before sm_90 take (``factored_on``)."""
    if dense:
        monkeypatch.setattr(triton_fft, "factored_on", lambda device: False)
    torch.manual_seed(length)
    dim = 2
    u = torch.randn(2, dim, length, dtype=torch.float64)
    fwd, bwd = torch.randn(2, dim, length, dtype=torch.float64), torch.randn(2, dim, length - 1, dtype=torch.float64)
    ref_op = K.LongConv(fwd, bwd, length, "fft")
    op = K.LongConv(fwd.float().to(DEVICE), bwd.float().to(DEVICE), length, "triton")
    assert op.impl == "triton_fft" and op.n == n
    assert op.operator.shape[-2:] == triton_fft.factors(n, dense) == ((128, 64) if dense else (n // 256, 256))
    ref = ref_op.conv(ref_op.prepare(u))
    assert relative_error(op.conv(u.float().to(DEVICE)), ref) <= 1e-5
    grad = torch.randn(2, 2, dim, length, dtype=torch.float64)
    assert relative_error(op.adjoint(grad.float().to(DEVICE)), ref_op.adjoint(grad)) <= 1e-5
    center = ref.mean(dim=(0, 3))
    want = (ref - center[None, :, :, None]).square().sum(dim=(0, 3))
    assert relative_error(op.centred_square_sums(u.float().to(DEVICE), center.float().to(DEVICE)), want) <= 1e-5


def test_lengths_past_the_largest_fft_stay_on_torch_fft():
    fwd = torch.randn(1, 1, 5000)
    assert K.LongConv(fwd, fwd[..., :-1], 5000, "triton").impl == "fft"  # n would be 16384
    assert K.LongConv(fwd[..., :8], None, 5000, "triton").impl == "triton_fft"  # n = 8192
    assert K.LongConv(fwd[..., :8], None, 784, "triton").impl == "triton"  # Toeplitz tiles up to TRITON_MAX_LEN


def test_custom_op_autograd_matches_torch_fft():
    """Gradients through ``mrconv::fft_conv`` (input: the adjoint kernel; spectrum: torch.fft) back to the input and
    the kernel taps, against the same convolution on torch.fft; and the op's schema and fake implementation."""
    torch.manual_seed(0)
    length, n = 45, 256
    x = torch.randn(3, 2, length, device=DEVICE, requires_grad=True)
    fwd = torch.randn(2, 2, 30, device=DEVICE, requires_grad=True)
    bwd = torch.randn(2, 2, 12, device=DEVICE, requires_grad=True)
    spec = triton_fft.monarch_spectrum(fwd, bwd, n)
    factors = triton_fft.dft_factors(n, x.device)
    y = triton_fft.fft_conv(x, spec, *factors)
    ref = torch.fft.irfft(torch.fft.rfft(x, n=n).unsqueeze(1) * K.kernel_spectrum(fwd, bwd, n), n=n)[..., :length]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, fwd, bwd), grad), torch.autograd.grad(ref, (x, fwd, bwd), grad)):
        assert relative_error(got, want) <= 1e-5
    args = (x.detach(), spec.detach(), *factors)
    torch.library.opcheck(triton_fft.fft_conv, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(triton_fft.fft_adjoint, (ref.detach(), *args[1:]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launches by mode, so a test knows the FFT kernel ran (and the Toeplitz one did not)."""
    counts = {"conv": 0, "adjoint": 0, "squares": 0}
    launch = triton_fft._launch

    def counted(*args, sum_k, center=None):
        counts["adjoint" if sum_k else "conv" if center is None else "squares"] += 1
        return launch(*args, sum_k=sum_k, center=center)
    monkeypatch.setattr(triton_fft, "_launch", counted)
    return counts


def test_fused_triton_layer_equals_fft_layer_and_folds_exactly(fft_everywhere, launches):
    torch.manual_seed(0)
    layer = MRConv(4, 150, 10, conv_impl="triton").to(DEVICE)
    layer(torch.randn(3, 4, 150, device=DEVICE)).sum().backward()  # statistics move
    # forward: the branch outputs' square sums and the merged kernel's output; backward: the branch outputs again
    # (no input gradient asked, so no adjoint)
    assert launches == {"conv": 2, "adjoint": 0, "squares": 1}
    layer.eval()
    fused = copy.deepcopy(layer)
    fused.reparameterize()
    u = torch.randn(2, 4, 150, device=DEVICE)
    with torch.no_grad():
        ref, out = layer(u), fused(u)
    assert relative_error(out, ref) <= 1e-5
    fft = copy.deepcopy(fused)
    fft.conv_impl, fft._cache = "fft", None
    with torch.no_grad():
        assert relative_error(out, fft(u)) <= 1e-5
    assert launches == {"conv": 4, "adjoint": 0, "squares": 1}  # and the eval and fused forwards


def test_fused_layer_trains_through_the_spectrum(fft_everywhere, launches):
    """A fused layer whose kernel is trained: the gradient reaches the weight through the op's spectrum gradient."""
    torch.manual_seed(0)
    layer = MRConv(3, 120, 10, conv_impl="triton", inference_mode=True).to(DEVICE)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    fft = copy.deepcopy(layer)
    fft.conv_impl = "fft"
    u = torch.randn(2, 3, 120, device=DEVICE)
    x1, x2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    y, y_ref = layer(x1), fft(x2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert relative_error(y.detach(), y_ref.detach()) <= 1e-5
    assert relative_error(x1.grad, x2.grad) <= 1e-5
    for p, q in zip(layer.parameters(), fft.parameters()):
        assert relative_error(p.grad, q.grad) <= 1e-5
    assert launches == {"conv": 1, "adjoint": 1, "squares": 0}


@pytest.mark.parametrize("bidirectional", [True, False])
def test_training_form_with_triton_fft_equals_reference(bidirectional, fft_everywhere, launches):
    """Output, every gradient and the running statistics of a training step at L = 101 (n = 256)."""
    layer = moved_layer("fourier_sparse", bidirectional, "triton", dtype=torch.float32, seq_len=101, l0=13)
    compare_with_reference(layer.to(DEVICE), 2 * torch.randn(3, layer.dim, 101, device=DEVICE) + 0.5, "fft",
                           rtol=1e-4)
    # forward: the branch outputs' square sums, merged output; backward: branch outputs again; the input gradient
    # through the merged kernel and through the branches
    assert launches == {"conv": 2, "adjoint": 2, "squares": 1}


def test_compile_fullgraph_traces_the_fft_custom_ops(fft_everywhere, launches):
    torch.manual_seed(0)
    compiled_forms_match_eager(MRConv(4, 40, 5, conv_impl="triton").to(DEVICE), torch.randn(2, 4, 40, device=DEVICE))
    assert launches["conv"] > 0


_COMPILE_FOR_GPUS = r"""
import json, os, subprocess, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from models import triton_fft as T
kernel = T._fft_conv_kernel
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
found = {}
for arch, n, dtype, mode in ((90, T.MAX_SIZE, "fp32", "fan-out"), (90, T.MAX_SIZE, "bf16", "fan-in"),
                             (90, T.MAX_SIZE, "bf16", "squares"), (90, 2048, "fp32", "fan-in"),
                             (90, 2048, "bf16", "fan-out"), (80, T.MAX_SIZE, "bf16", "fan-out"),
                             (80, T.MAX_SIZE, "fp32", "fan-in")):
    dense = arch < 90  # what factored_on gives a CUDA device of that generation
    consts = T._meta(n, T.factors(n, dense)[0], getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]), dense)
    options = {key: consts.pop(key) for key in ("num_warps", "num_stages")}
    consts["SUM_K"], consts["SQUARES"] = mode == "fan-in", mode == "squares"
    sig = {name: "constexpr" if name in consts else "i32" if name in ("B", "D", "L", "NK") else
           f"*{dtype}" if name == "x_ptr" else "*fp32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    stack = int(usage.split("STACK:")[1].split()[0])
    found[f"sm_{arch} {n} {dtype} {mode}"] = [compiled.metadata.shared, stack]
print(json.dumps(found))
"""


def test_kernel_compiles_for_h100_and_a100_within_their_resources():
    """The interpreter runs what a GPU compiler may refuse (tile shapes, types, resources, and code in a
    compile-time branch not taken). Compiled here by Triton's own compiler and ptxas, no GPU needed, with every row
    holding input: for sm_90 at the largest size (factored row DFT: fp32 fan-out, bf16 fan-in, bf16 square sums)
    and at 2048 (dense); for sm_80 (an A100) at the largest size with the dense row DFT ``factored_on`` gives it.
    Each asks for at most an A100's 163 KB of shared memory per block, and a stack (spilled registers) of at most
    4 KB a thread: the factored kernel compiled for sm_80 needed 9-11 KB at 32 registers."""
    from tests.triton_compile import shared_memory
    found = shared_memory(_COMPILE_FOR_GPUS)
    largest = triton_fft.MAX_SIZE
    assert set(found) == {f"sm_90 {largest} fp32 fan-out", f"sm_90 {largest} bf16 fan-in",
                          f"sm_90 {largest} bf16 squares", "sm_90 2048 fp32 fan-in", "sm_90 2048 bf16 fan-out",
                          f"sm_80 {largest} bf16 fan-out", f"sm_80 {largest} fp32 fan-in"}, found
    assert max(shared for shared, _ in found.values()) <= 163 * 1024, found
    assert max(stack for _, stack in found.values()) <= 4096, found
