"""The MRConv layer against naive references: O(L^2) convolutions, kernels built tap by tap, BN by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from models import MRConv
from models import kernels as K
from models import branch_norm
from models.branch_norm import BranchConvBatchNorm, ToeplitzBatchNorm, _slice_bytes
from pipelines.benchmark.timing import LiveBytes

from .mrconv_reference import compare_with_reference, dilated_conv, moved_layer, naive_conv, reference_forward

KERNEL_TYPES = K.KERNEL_TYPES
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- naive references
def naive_fourier(modes: torch.Tensor, length: int) -> torch.Tensor:
    """k[t] = Re sum_f c_f X_f exp(2 pi i f t / n), c_0 = 1, c_f = 2 (and 1 at Nyquist): irfft with norm='forward'."""
    t = torch.arange(length, dtype=torch.float64)
    out = torch.zeros(*modes.shape[:-1], length, dtype=torch.float64)
    for f in range(min(modes.shape[-1], length // 2 + 1)):
        weight = 1.0 if f == 0 or (length % 2 == 0 and f == length // 2) else 2.0
        x = modes[..., f].to(torch.complex128)
        if weight == 1.0:
            x = x.real.to(torch.complex128)  # irfft ignores the imaginary part of DC and Nyquist
        out += weight * (x[..., None] * torch.exp(2j * math.pi * f * t / length)).real
    return out


def naive_branch_kernels(layer: MRConv) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(forward, backward) dense kernels of every branch, built tap by tap from the parameters."""
    out = []
    for i, length in enumerate(layer.lengths):
        dirs = []
        for di in range(layer.dirs):
            kt = layer.kernel_type
            if kt == "dilated":
                k = torch.zeros(layer.dim, length, dtype=torch.float64)
                for j in range(layer.l0):
                    k[:, j * 2**i + (2**i - 1 if di == 1 else 0)] = layer.dilated_taps[di, i, :, j].double()
            elif kt == "dense":
                k = layer.dense_kernels[i][di].double()
            else:
                k = torch.zeros(layer.dim, length, dtype=torch.float64)
                if kt in ("fourier", "fourier_sparse"):
                    pairs = layer.fourier_modes[di, i].detach().reshape(layer.dim, -1, 2)
                    modes = torch.complex(pairs[..., 0], pairs[..., 1])
                    fourier = naive_fourier(modes, length)
                    k += fourier * (layer.beta[di, i, 0].double() if kt == "fourier_sparse" else 1.0)
                if kt in ("sparse", "fourier_sparse"):
                    sparse = torch.zeros(layer.dim, length, dtype=torch.float64)
                    for j, pos in enumerate(layer.sparse_index[di, i].tolist()):
                        sparse[:, pos] = layer.sparse_values[di, i, :, j].double()
                    k += sparse * (layer.beta[di, i, 1].double() if kt == "fourier_sparse" else 1.0)
            dirs.append(k.detach())
        out.append((dirs[0], dirs[1] if layer.dirs == 2 else None))
    return out


def naive_layer_eval(layer: MRConv, u: torch.Tensor) -> torch.Tensor:
    """sum_i alpha_i * BN_i(k_i * u) with BN in eval mode, everything in float64, loops over branches."""
    n, d = layer.num_branches, layer.dim
    bn = layer.norm
    mean, var = bn.running_mean.view(n, d).double(), bn.running_var.view(n, d).double()
    gamma, beta = bn.weight.view(n, d).double().detach(), bn.bias.view(n, d).double().detach()
    y = torch.zeros_like(u, dtype=torch.float64)
    for i, (fwd, bwd) in enumerate(naive_branch_kernels(layer)):
        c = naive_conv(u.double(), fwd, bwd)
        c = (c - mean[i, :, None]) / torch.sqrt(var[i, :, None] + bn.eps) * gamma[i, :, None] + beta[i, :, None]
        y += layer.alpha[i].double().detach()[:, None] * c
    return y


def trained_layer(kernel_type: str, bidirectional: bool, *, dim=4, seq_len=40, l0=5, steps=3, seed=0,
                  conv_impl="auto") -> MRConv:
    """A layer after a few real optimizer steps in train mode (so weights and BN statistics moved), in eval mode."""
    torch.manual_seed(seed)
    layer = MRConv(dim, seq_len, l0, kernel_type=kernel_type, bidirectional=bidirectional, seed=seed,
                   conv_impl=conv_impl)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    target = torch.randn(2, dim, seq_len)
    for _ in range(steps):
        x = 3 * torch.randn(2, dim, seq_len) + 1.5
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.eval()


# ----------------------------------------------------------------------------------------------- pure functions
def test_next_fast_len_matches_brute_force():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 400):
        expected = next(m for m in range(n, 4 * n + 2) if smooth(m))
        assert K.next_fast_len(n) == expected, n


def test_resolutions_follow_the_paper_stage_layout():
    assert K.resolution_lengths(3136, 196) == [196, 392, 784, 1568, 3136]
    assert K.resolution_lengths(784, 49) == [49, 98, 196, 392, 784]
    assert K.resolution_lengths(196, 28) == [28, 56, 112, 196]
    assert K.resolution_lengths(49, 28) == [28, 49]
    assert K.resolution_lengths(10, 28) == [10]
    assert K.resolution_lengths(3136, 196, max_resolutions=3) == [196, 392, 784]


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("length", [1, 2, 7, 13, 31])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_long_conv_and_its_adjoints_equal_naive_convolution(impl, length, bidirectional):
    """``conv`` against the naive loop; ``adjoint`` and ``kernel_grad`` against autograd of that loop."""
    torch.manual_seed(length)
    u = torch.randn(3, 3, length, dtype=torch.float64, requires_grad=True)  # odd: the FFT packs rows in pairs
    for klen in (1, 4, length, 2 * length + 3):  # shorter and longer than the input
        kernels = torch.randn(2 if bidirectional else 1, 2, 3, klen, dtype=torch.float64, requires_grad=True)
        fwd, bwd = K.truncate(kernels, length)
        op = K.LongConv(fwd.detach(), None if bwd is None else bwd.detach(), length, impl)
        prepared = op.prepare(u.detach())
        y = op.conv(prepared)
        ref = torch.stack([naive_conv(u, kernels[0, i], kernels[1, i] if bidirectional else None) for i in range(2)], 1)
        torch.testing.assert_close(y, ref.detach(), rtol=1e-10, atol=1e-10)

        grad = torch.randn_like(ref)
        ref_du, ref_dk = torch.autograd.grad(ref, (u, kernels), grad)
        torch.testing.assert_close(op.adjoint(grad), ref_du, rtol=1e-10, atol=1e-10)
        dk_fwd, dk_bwd = op.kernel_grad(grad, prepared)
        torch.testing.assert_close(dk_fwd, ref_dk[0, ..., : fwd.shape[-1]], rtol=1e-10, atol=1e-10)
        if bidirectional:
            torch.testing.assert_close(dk_bwd, ref_dk[1, ..., : bwd.shape[-1]], rtol=1e-10, atol=1e-10)
        else:
            assert dk_bwd is None


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("length", [1, 6, 13])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_centred_scaled_outputs_and_their_backward_equal_naive(impl, length, bidirectional):
    """The pieces of the training form: ``window_means``, ``conv(scale, center)``, ``centred_square_sums`` and
    ``backward_conv`` against the naive convolution, for odd and even batches (the FFT packs rows in pairs)."""
    torch.manual_seed(length)
    for batch in (1, 2, 3):
        u = torch.randn(batch, 3, length, dtype=torch.float64) + 0.7
        kernels = torch.randn(2 if bidirectional else 1, 2, 3, length + 2, dtype=torch.float64)
        fwd, bwd = K.truncate(kernels, length)
        c = torch.stack([naive_conv(u, fwd[i], None if bwd is None else bwd[i]) for i in range(2)], 1)
        mean = c.mean(dim=(0, 3))
        torch.testing.assert_close(K.window_means(u, fwd, bwd), mean, rtol=1e-12, atol=1e-12)
        scale = torch.rand(2, 3, dtype=torch.float64) + 0.5
        op = K.LongConv(fwd, bwd, length, impl)
        prepared = op.prepare(u)
        centred = (c - mean[..., None]) * scale[..., None]
        torch.testing.assert_close(op.conv(prepared, scale, mean), centred, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.centred_square_sums(prepared, mean),
                                   (c - mean[..., None]).square().sum(dim=(0, 3)), rtol=1e-10, atol=1e-10)
        for got, want in zip(op.backward_conv(prepared, scale, mean), op.backward(centred, prepared)):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 6, 13])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_fft_spectral_pieces_equal_their_time_domain_forms(length, bidirectional):
    """The FFT path's shortcuts against what they replace: ``scaled_sum`` against the centred outputs summed with
    slopes chosen from their own square sums, ``kernel_dots`` (Parseval) against ``sum_lag k[lag] corr[lag]`` of the
    correlation that ``kernel_grad`` gives, ``backward_conv``'s spectral terms against adding their time-domain
    gradients; odd and even batches and an even and an odd FFT size (real FFTs weigh their bins)."""
    torch.manual_seed(length)
    for batch in (1, 2, 3, 4):
        u = torch.randn(batch, 3, length, dtype=torch.float64) + 0.7
        g = torch.randn(batch, 3, length, dtype=torch.float64)
        kernels = torch.randn(2 if bidirectional else 1, 2, 3, length + 2, dtype=torch.float64)
        fwd, bwd = K.truncate(kernels, length)
        op = K.LongConv(fwd, bwd, length, "fft")
        prepared = op.prepare(u)
        mean = K.window_means(u, fwd, bwd)
        centred = op.conv(prepared, center=mean)  # (B, 2, 3, L), checked against the naive loop above
        square_sums = centred.square().sum(dim=(0, 3))
        chosen = []

        def slope(i, sums):
            chosen.append(sums)
            return 1.0 / (sums + 1.0)

        total, sums = op.scaled_sum(prepared, mean, slope)
        torch.testing.assert_close(sums, square_sums, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.stack(chosen), square_sums, rtol=1e-10, atol=1e-10)
        want = (centred / (square_sums + 1.0)[..., None]).sum(dim=1)
        torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-10)

        # sum_lag k_i[lag] corr[lag], corr = sum_b corr(g_b, u_b): the kernel gradient of conv with dc_i = g
        dk_fwd, dk_bwd = op.kernel_grad(g[:, None].expand(-1, 2, -1, -1), prepared)
        dots = (fwd * dk_fwd).sum(dim=-1) + (0 if bwd is None else (bwd * dk_bwd).sum(dim=-1))
        g_prepared = op.prepare(g)
        cross = op.cross_spectrum(g_prepared, prepared)
        torch.testing.assert_close(op.kernel_dots(cross, prepared.packed), dots, rtol=1e-10, atol=1e-10)

        # backward_conv's extra terms: the merged kernel's adjoint of g and every kernel's correlation with g
        scale, weights = torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
        first = g_prepared.spectrum * op.weighted_spectrum(weights, prepared.packed).conj()
        got = op.backward_conv(prepared, scale, mean, True, first, weights[..., None] * cross)
        du, kf, kb = op.backward_conv(prepared, scale, mean)
        merged = K.LongConv(K.weighted_sum(fwd, weights), None if bwd is None else K.weighted_sum(bwd, weights),
                            length, "fft")
        want = (du + merged.adjoint(g[:, None]), kf + weights[..., None] * dk_fwd,
                None if bwd is None else kb + weights[..., None] * dk_bwd)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    toeplitz = K.LongConv(fwd, bwd, length, "toeplitz")
    with pytest.raises(ValueError, match="impl='fft'"):
        toeplitz.backward_conv(u, scale, mean, True, None, cross)


def test_packed_pairs_round_trip():
    x = torch.randn(6, 2, 7)
    z = K.pack_pairs(x)
    assert z.shape == (3, 2, 7) and torch.equal(z[:, 0].real, x[0::2, 0]) and torch.equal(z[:, 0].imag, x[1::2, 0])
    assert torch.equal(K.unpack_pairs(z), x)


@pytest.mark.parametrize("row_block", [1, 2, 3, 64])
def test_antidiagonal_sums_equal_a_loop_in_any_row_blocks(row_block):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = torch.zeros(2, 3, 9, dtype=torch.float64)
    for t in range(5):
        for c in range(5):
            expected[..., t + c] += q[..., t, c]
    torch.testing.assert_close(K.antidiagonal_sums(q, row_block), expected)


def test_lag_correlation_equals_a_loop():
    torch.manual_seed(0)
    batch, kernels, dim, length = 3, 2, 4, 6
    dc = torch.randn(batch, kernels, dim, length, dtype=torch.float64)
    x = torch.randn(batch, dim, length, dtype=torch.float64)
    expected = torch.zeros(kernels, dim, 2 * length - 1, dtype=torch.float64)
    for lag in range(-(length - 1), length):
        for t in range(length):
            if 0 <= t - lag < length:
                expected[..., length - 1 + lag] += (dc[..., t] * x[:, None, :, t - lag]).sum(dim=0)
    torch.testing.assert_close(K.lag_correlation(dc, x), expected)


def test_toeplitz_matrices_are_built_without_an_index_scatter():
    """The old gather-built matrices had an IndexBackward (a scatter-add on GPUs); the sliding-window view has not."""
    kernels = torch.randn(2, 1, 3, 6, requires_grad=True)
    mats = K.toeplitz(*K.truncate(kernels, 9), 9)
    assert "Index" not in " ".join(autograd_node_names(mats))


def autograd_node_names(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("bidirectional", [True, False])
def test_dilated_direct_conv_equals_its_dense_expansion(bidirectional):
    torch.manual_seed(1)
    u = torch.randn(2, 3, 37, dtype=torch.float64)
    taps = torch.randn(2 if bidirectional else 1, 3, 5, dtype=torch.float64)
    for dilation in (1, 2, 4, 16):
        dense = K.dilated_dense(taps, dilation, 5 * dilation)
        ref = naive_conv(u, dense[0], dense[1] if bidirectional else None)
        torch.testing.assert_close(dilated_conv(u, taps, dilation), ref, rtol=1e-10, atol=1e-10)


def test_fourier_kernel_equals_explicit_inverse_dft():
    torch.manual_seed(2)
    modes = torch.randn(3, 6, dtype=torch.complex128)
    for length in (5, 12, 13, 64):
        torch.testing.assert_close(K.fourier_kernel(modes, length), naive_fourier(modes, length))


def test_fourier_basis_synthesises_every_branch_as_fourier_kernel():
    torch.manual_seed(4)
    lengths, n_modes = [3, 4, 8, 13, 26], 5  # fewer bins than modes at the short lengths
    modes = torch.randn(2, len(lengths), 3, n_modes, dtype=torch.complex128)
    pairs = torch.view_as_real(modes).flatten(-2)  # (re, im) interleaved, as MRConv stores them
    got = torch.matmul(pairs, K.fourier_basis(lengths, n_modes, 26))
    for i, length in enumerate(lengths):
        torch.testing.assert_close(got[:, i, :, :length], K.fourier_kernel(modes[:, i], length), rtol=1e-12,
                                   atol=1e-12)
        assert not got[:, i, :, length:].any()


def test_fold_equals_branch_sum_by_hand():
    torch.manual_seed(3)
    dirs, n, d, length = 2, 3, 4, 9
    kernels = torch.randn(dirs, n, d, length, dtype=torch.float64)
    alpha, gamma, beta, mean = (torch.randn(n, d, dtype=torch.float64) for _ in range(4))
    var = torch.rand(n, d, dtype=torch.float64) + 0.1
    kernel, bias = K.fold_branches(kernels, alpha, gamma, beta, mean, var, 1e-5)
    u = torch.randn(2, d, 15, dtype=torch.float64)
    expected = sum(alpha[i, :, None] * ((naive_conv(u, kernels[0, i], kernels[1, i]) - mean[i, :, None])
                                        / torch.sqrt(var[i, :, None] + 1e-5) * gamma[i, :, None] + beta[i, :, None])
                   for i in range(n))
    torch.testing.assert_close(naive_conv(u, kernel[0], kernel[1]) + bias[:, None], expected)


# ----------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_layer_equals_naive_reference(kernel_type, bidirectional, impl):
    layer = trained_layer(kernel_type, bidirectional, conv_impl=impl)
    for length in (40, 23, 3):  # the layout length, a prime, shorter than l0
        u = torch.randn(2, layer.dim, length)
        with torch.no_grad():
            y = layer(u).double()
        ref = naive_layer_eval(layer, u)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (kernel_type, length)


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_causal_layer_never_sees_the_future(kernel_type, impl):
    """An impulse at the last position must leave every earlier output unchanged; circular wrap-around would not."""
    layer = trained_layer(kernel_type, False, conv_impl=impl).double()
    fused = copy.deepcopy(layer)
    fused.reparameterize()
    u = torch.randn(1, layer.dim, 40, dtype=torch.float64)
    impulse = torch.zeros_like(u)
    impulse[..., -1] = 1e3
    for m in (layer, fused):
        with torch.no_grad():
            delta = m(u + impulse) - m(u)
        assert delta[..., -1].abs().max() > 1.0  # the impulse does reach its own position
        earlier = delta[..., :-1].abs().max().item()
        if impl == "toeplitz":
            assert earlier == 0.0
        else:  # FFT rounding only (float64): a wrap-around would be O(1e3)
            assert earlier < 1e-9


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_fold_is_exact_after_training(kernel_type, bidirectional, impl):
    layer = trained_layer(kernel_type, bidirectional, conv_impl=impl, steps=5)
    assert not torch.allclose(layer.norm.running_var, torch.ones_like(layer.norm.running_var))
    fused = copy.deepcopy(layer)
    fused.reparameterize()
    assert fused.inference_mode and not hasattr(fused, "alpha") and not hasattr(fused, "norm")
    for length, batch in ((40, 3), (29, 1), (4, 2), (57, 2)):
        u = 2 * torch.randn(batch, layer.dim, length) + 0.5
        with torch.no_grad():
            ref, out = layer(u), fused(u)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (length, batch)

    # the fused state_dict loads into a layer built fused, and computes the same
    rebuilt = MRConv(layer.dim, layer.seq_len, layer.l0, kernel_type=kernel_type, bidirectional=bidirectional,
                     conv_impl=impl, inference_mode=True)
    rebuilt.load_state_dict(fused.state_dict())
    u = torch.randn(2, layer.dim, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(u), fused(u))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_every_parameter_receives_a_gradient(kernel_type, bidirectional):
    layer = MRConv(4, 40, 5, kernel_type=kernel_type, bidirectional=bidirectional)
    layer(torch.randn(2, 4, 40)).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fused_spectrum_is_cached_and_follows_length_and_weights():
    layer = trained_layer("fourier_sparse", True, conv_impl="fft")
    layer.reparameterize()
    u = torch.randn(1, layer.dim, 40)
    with torch.inference_mode():
        first = layer(u)
        key, op = layer._cache
        assert layer(u).equal(first) and layer._cache[1] is op  # reused, not recomputed
        layer(torch.randn(1, layer.dim, 33))
        assert layer._cache[0][0] == 33  # new length, new spectrum
    with torch.no_grad():
        layer.weight.mul_(2)
        layer.bias.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(layer(u), 2 * first)  # stale spectrum would give `first`


def test_sparse_positions_are_seeded_and_saved():
    a = MRConv(4, 64, 8, kernel_type="sparse", seed=7)
    b = MRConv(4, 64, 8, kernel_type="sparse", seed=7)
    c = MRConv(4, 64, 8, kernel_type="sparse", seed=8)
    assert a.sparse_index.equal(b.sparse_index) and not a.sparse_index.equal(c.sparse_index)
    assert "sparse_index" in a.state_dict()
    for i, length in enumerate(a.lengths):
        assert int(a.sparse_index[:, i].max()) < length


def test_bf16_autocast_runs_in_fp32_inside():
    layer = MRConv(4, 40, 5)
    x = torch.randn(2, 4, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_type="wavelet"), "unknown kernel_type 'wavelet'"),
        (dict(l0=0), "l0 must be an integer >= 1"),
        (dict(max_resolutions=0), "max_resolutions must be >= 1"),
        (dict(conv_impl="direct"), "conv_impl must be one of auto, fft, toeplitz, triton"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    args = dict(dim=4, seq_len=40, l0=5) | kwargs
    with pytest.raises(ValueError, match=message):
        MRConv(**args)


@pytest.mark.parametrize("shape", [(2, 4), (2, 5, 40), (2, 4, 40, 1)])
def test_wrong_input_shape_raises_value_error(shape):
    layer = MRConv(4, 40, 5)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, dim=4, length\)"):
        layer(torch.randn(*shape))


# ------------------------------------------------------------------------------------- the training form (issue 11)
@pytest.mark.parametrize("impl", ["fft", "toeplitz", "auto"])  # auto on the CPU: the direct path up to L = 36
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_training_form_equals_reference_in_float64(kernel_type, bidirectional, impl):
    layer = moved_layer(kernel_type, bidirectional, impl)
    # the layout length, a prime, shorter than l0, one position, and batch size 1
    for length, batch in ((40, 3), (23, 2), (3, 4), (1, 5), (57, 1)):
        u = 2 * torch.randn(batch, layer.dim, length, dtype=torch.float64) + 0.5
        compare_with_reference(layer, u, impl, rtol=1e-9)


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "sparse", "dense"])
def test_single_branch_training_form_equals_reference_in_float64(kernel_type, bidirectional, impl):
    """One resolution (``L <= l0``, MRConvNeXt's late stages) takes its own path: no merged kernel."""
    layer = moved_layer(kernel_type, bidirectional, impl, seq_len=16, l0=16)
    assert layer.num_branches == 1
    for length, batch in ((16, 3), (7, 2), (1, 5), (20, 1)):
        u = 2 * torch.randn(batch, layer.dim, length, dtype=torch.float64) + 0.5
        compare_with_reference(layer, u, impl, rtol=1e-9)


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated"])
def test_training_form_equals_reference_in_float32(kernel_type, impl):
    layer = moved_layer(kernel_type, True, impl, dtype=torch.float32)
    compare_with_reference(layer, 2 * torch.randn(3, layer.dim, 40) + 0.5, impl, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
def test_single_branch_training_form_equals_reference_in_float32(impl):
    layer = moved_layer("fourier_sparse", True, impl, dtype=torch.float32, seq_len=16, l0=16)
    compare_with_reference(layer, 2 * torch.randn(8, layer.dim, 16) + 0.5, impl, rtol=1e-4)


@pytest.mark.parametrize("impl, l0, length", [("fft", 5, 40), ("toeplitz", 5, 40), ("auto", 40, 40), ("auto", 5, 30)])
def test_training_form_takes_a_channels_last_view_as_it_is(impl, l0, length):
    """MRConvNeXt's feature maps are channels-last on the CPU (oneDNN's convolutions), so its layers get (B, D, L)
    views with the channels at stride 1, and gradients laid out alike: the same numbers as from contiguous ones."""
    layer = moved_layer("fourier_sparse", True, impl, seq_len=40, l0=l0)
    strided = copy.deepcopy(layer)
    u = 2 * torch.randn(3, length, layer.dim, dtype=torch.float64) + 0.5
    grad = torch.randn(3, length, layer.dim, dtype=torch.float64)
    u1, u2 = u.transpose(1, 2).contiguous().requires_grad_(), u.transpose(1, 2).detach().requires_grad_()
    assert u2.stride(1) == 1
    (layer(u1) * grad.transpose(1, 2).contiguous()).sum().backward()
    (strided(u2) * grad.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(u2.grad, u1.grad, rtol=1e-12, atol=1e-12)
    for p, q in zip(layer.parameters(), strided.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12)


def test_short_layers_train_through_the_direct_path_on_the_cpu():
    """``DIRECT_MAX_LEN_TRAIN``: one branch up to L = 64 and several up to 36 by their Toeplitz matrices
    (``ToeplitzBatchNorm``), longer inputs by FFTs (the merged-kernel path); eval mode folds as before."""
    for length, l0, node in ((16, 16, "ToeplitzBatchNormBackward"), (64, 64, "ToeplitzBatchNormBackward"),
                             (100, 100, "BranchConvBatchNormBackward"), (36, 5, "ToeplitzBatchNormBackward"),
                             (40, 5, "BranchConvBatchNormBackward")):
        layer = MRConv(4, length, l0)
        names = autograd_node_names(layer(torch.randn(2, 4, length, requires_grad=True)))
        assert node in names, (length, l0)
        assert layer.eval()(torch.randn(2, 4, length)).shape == (2, 4, length)


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
def test_channel_slices_give_the_same_result(impl):
    layer = moved_layer("fourier_sparse", True, impl, dim=7)
    sliced = copy.deepcopy(layer)
    sliced.norm.chunk_bytes = 1  # one channel per slice
    u = torch.randn(3, 7, 31, dtype=torch.float64, requires_grad=True)
    (layer(u) ** 2).sum().backward()
    grad_u = u.grad.clone()
    u.grad = None
    (sliced(u) ** 2).sum().backward()
    torch.testing.assert_close(u.grad, grad_u, rtol=1e-12, atol=1e-12)
    for p, q in zip(layer.parameters(), sliced.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_momentum_none_keeps_the_cumulative_average():
    layer = moved_layer("fourier", True, "fft")
    layer.norm.momentum = None
    compare_with_reference(layer, torch.randn(2, 4, 40, dtype=torch.float64), "fft", rtol=1e-9)


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd keeps for backward while ``fn`` runs (parameters included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("impl", ["fft", "toeplitz"])
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated", "dense"])
def test_training_form_saves_nothing_of_branch_size(kernel_type, impl):
    """A (B, N, D, L) tensor is N times the input: the new path keeps the input plus kernel-sized tensors only."""
    batch, dim, length = 64, 4, 40
    layer = MRConv(dim, length, 5, kernel_type=kernel_type, conv_impl=impl)
    assert layer.num_branches == 4
    u = torch.randn(batch, dim, length, requires_grad=True)
    input_bytes = u.numel() * u.element_size()
    kernel_bytes = 4 * layer.dirs * layer.num_branches * dim * layer.kernel_len
    new = saved_bytes(lambda: layer(u))
    assert new <= input_bytes + 8 * kernel_bytes < layer.num_branches * input_bytes
    reference = saved_bytes(lambda: reference_forward(copy.deepcopy(layer), u, impl))
    assert reference > layer.num_branches * input_bytes  # the test can tell the difference


@pytest.mark.parametrize("l0", [30, 5])
def test_direct_path_saves_the_input_only(l0):
    """``ToeplitzBatchNorm`` recomputes the branch outputs in backward: the input and kernel-sized tensors are all it
    keeps (autograd through the matmul and ``F.batch_norm`` would keep the (B, N, D, L) outputs besides)."""
    batch, dim, length = 64, 4, 30
    layer = MRConv(dim, length, l0)
    u = torch.randn(batch, dim, length, requires_grad=True)
    kernel_bytes = 4 * layer.dirs * layer.num_branches * dim * layer.kernel_len
    assert saved_bytes(lambda: layer(u)) <= u.numel() * u.element_size() + 8 * kernel_bytes
    assert "ToeplitzBatchNormBackward" in autograd_node_names(layer(u))


def work_bytes(layer: MRConv, u: torch.Tensor, grad: torch.Tensor, budget: int | None) -> int:
    """What a training step with ``chunk_bytes=budget`` makes (``LiveBytes`` peak) beyond a few input-sized tensors
    (output, gradients) and kernel-sized ones."""
    layer.norm.chunk_bytes = budget
    layer(u).backward(grad)  # the parameters' gradients exist from here on
    with LiveBytes() as live:
        layer(u).backward(grad)
    kernel_bytes = 4 * layer.dirs * layer.num_branches * layer.dim * layer.kernel_len
    return live.peak - 6 * u.numel() * 4 - 4 * kernel_bytes


@pytest.mark.parametrize("impl, batch, length", [("fft", 16, 100), ("fft", 15, 100), ("toeplitz", 4, 60),
                                                  ("direct", 8, 36)])
def test_training_step_stays_inside_its_memory_budget(impl, batch, length, monkeypatch):
    """``_slice_bytes`` is not below what a channel's forward + backward takes, so ``chunk_bytes`` bounds a step's
    transient memory (``work_bytes``), in one slice and in several, and by default within ``chunk_budget``."""
    dim = 24
    layer = MRConv(dim, length, 7 if length > 36 else 3, conv_impl="auto" if impl == "direct" else impl)
    assert layer._impl(length, torch.device("cpu"), training=True) == impl
    assert layer.num_branches == 5
    u = torch.randn(batch, dim, length, requires_grad=True)
    grad = torch.randn_like(u)
    per_channel = _slice_bytes(batch, layer.num_branches, length, impl)
    monkeypatch.setattr(branch_norm, "CHUNK_BYTES_MIN", 0)
    monkeypatch.setattr(branch_norm, "CHUNK_BYTES_PER_SAMPLE", 3 * per_channel // batch)  # default: 3 a slice
    assert branch_norm.chunk_budget(batch) <= 3 * per_channel
    for budget, used in ((1 << 40, dim * per_channel), (4 * per_channel, 4 * per_channel), (None, 3 * per_channel)):
        assert work_bytes(layer, u, grad, budget) <= used


@pytest.mark.parametrize("triton_max_len", [784, 0])  # Toeplitz tiles; the FFT kernel at every length
def test_triton_training_step_stays_inside_its_memory_budget(triton_max_len, monkeypatch):
    """The same bound for conv_impl="triton" (its kernels under Triton's interpreter here): what they allocate are
    their outputs, as on a GPU, where their work stays on chip."""
    monkeypatch.setattr(K, "TRITON_MAX_LEN", triton_max_len)
    batch, dim, length = 4, 8, 60
    layer = MRConv(dim, length, 7, conv_impl="triton")
    u = torch.randn(batch, dim, length, requires_grad=True)
    per_channel = _slice_bytes(batch, layer.num_branches, length, "triton")
    assert work_bytes(layer, u, torch.randn_like(u), 2 * per_channel) <= 2 * per_channel  # four slices


def test_chunk_budget_grows_with_the_batch_from_a_floor():
    assert branch_norm.chunk_budget(1) == branch_norm.CHUNK_BYTES_MIN == 256 * 2**20
    assert branch_norm.chunk_budget(128) == 128 * branch_norm.CHUNK_BYTES_PER_SAMPLE == 2 * 2**30


def test_training_form_backward_has_no_index_scatter():
    layer = MRConv(4, 40, 5, conv_impl="toeplitz")
    names = autograd_node_names(layer(torch.randn(2, 4, 40, requires_grad=True)))
    assert "BranchConvBatchNormBackward" in names and not any("Index" in n for n in names)


@pytest.mark.parametrize("length", [40, 30])  # the merged-kernel path; the direct one
def test_bf16_autocast_training_form_follows_fp32(length):
    layer = MRConv(4, 40, 5)
    fp32 = copy.deepcopy(layer)
    x = (torch.randn(3, 4, length) + 0.5).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    x32 = x.detach().float().requires_grad_()
    y32 = fp32(x32)
    y32.square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert (y.float() - y32).abs().max() <= 1e-2 * y32.abs().max()  # bf16 rounding of the output only
    torch.testing.assert_close(layer.alpha.grad, fp32.alpha.grad, rtol=2e-2, atol=2e-2)


def test_single_value_per_channel_is_refused_in_training():
    layer = MRConv(4, 40, 5)
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer(torch.randn(1, 4, 1))
    layer.eval()
    assert layer(torch.randn(1, 4, 1)).shape == (1, 4, 1)


def test_function_gradcheck():
    """torch.autograd.gradcheck on the Function itself (finite differences, float64)."""
    torch.manual_seed(0)
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    alpha, gamma, beta = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for impl in ("fft", "toeplitz"):
        assert torch.autograd.gradcheck(
            lambda *a: BranchConvBatchNorm.apply(*a, 1e-5, impl, 2**20)[0], (u, kernels, alpha, gamma, beta))
    one = [kernels[:, :1]] + [t[:1] for t in (alpha, gamma, beta)]  # the first branch alone
    one = [t.detach().clone().requires_grad_() for t in one]
    for args in ((u, kernels, alpha, gamma, beta), (u, *one)):
        for budget in (2**20, 1):  # one slice, one channel a slice
            assert torch.autograd.gradcheck(lambda *a: ToeplitzBatchNorm.apply(*a, 1e-5, budget)[0], args)
