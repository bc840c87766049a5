"""Depthwise long convolution as one fused FFT per row, the FFT written as matrix products (Triton).

For an FFT size ``n = N1 * N2`` (powers of two, 256 to 8192) a row ``x`` of the zero-padded input is the
(N1, N2) matrix ``X[t1, t2] = x[N2 * t1 + t2]``, and the four-step ("Monarch") factorization of its DFT is::

    A = F_N1 @ X                      (k1, t2)
    A[k1, t2] *= w_n ** (k1 * t2)     twiddle, w_n = exp(-2 pi i / n)
    B = A @ F_N2                      B[k1, k2] = X_hat[k1 + N1 * k2]

Below n = 4096, ``N2 <= N1`` and ``A @ F_N2`` is one dense product. From 4096 on, N2 = 256 and that row DFT is
factored the same way again, as 16 x 16 (``_row_dft``), which cuts the work per row 2.4 times at n = 8192
(``row_macs``) and leaves the spectrum's columns in the inner steps' order (``_to_monarch``); CUDA devices before
sm_90 keep the dense product, which compiles better there (``factored_on``).

Each program makes one output row: it reads its input row once in its own dtype and transforms it on chip (fp32
accumulation), a block of 16 spectrum rows (k1) at a time: the block of ``X_hat``, times the kernel spectrum
(precomputed on the host in the same (k1, k2) layout, ``1/n`` included), then its share of the inverse four steps
(the conjugate row DFT, conjugate twiddle, real part of ``conj(F_N1)[:, k1] @ C``) added to one real output tile.
So no full complex (N1, N2) tile is ever live (compiled for sm_90 at n = 8192: 40-77 KB of shared memory for
L = 3136, 110 KB at most; a first version holding whole tiles asked for 164-262 KB, past an H100's 227 KB). The
output is cropped to the ``L`` positions and stored once, in fp32. Linear, not circular: ``n`` is at least
``L + max(lf - 1, lb)`` (``kernels.fft_size``), so nothing wraps around.

Two modes, as ``triton_toeplitz``: fan-out (``fft_conv``: (B, D, L) -> (B, K, D, L), one program per output row, so
with K kernels the input's transform is computed K times, in parallel) and fan-in (``fft_adjoint``: (B, K, D, L) ->
(B, D, L), the correlations with the K kernels summed in the spectral domain, one inverse transform). The gradient with
respect to the spectrum (and so the kernels) stays on ``torch.fft``: it sums the input's and the gradient's spectra
over the batch, which is not a per-row kernel.

A third mode reduces instead of storing: ``fft_square_sums`` gives the fan-out's centred square sums per (kernel,
channel), the training form's per-branch variances, without writing a branch output.

Registered as the custom ops ``mrconv::fft_conv``, ``mrconv::fft_adjoint`` and ``mrconv::fft_square_sums`` (fake
implementations; autograd on ``fft_conv``) so that ``torch.compile`` traces through them. Runs on CUDA, and on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how the
tests check it without a GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import kernels as K

MIN_FACTOR = 16  # tl.dot tiles are at least 16 wide
# From n = 4096 the row DFT (N2 = 256 points) is factored again, as 16 x 16 (``_row_dft``): per point it then costs
# 2 x 16 complex multiply-adds rather than N2 (64 for the dense 128 x 64 at n = 8192), and ``row_macs`` drops from
# 6.3 M to 2.6 M real multiply-adds per row. Below 4096, N1 would fall under 16, the smallest tl.dot side. Only
# where it compiles well (``factored_on``).
INNER, FACTORED_FROM = 16, 4096
# n = 16384 (64 x 256) with all 64 rows holding input, compiled for sm_90: 172 KB of shared memory for an fp32
# input (more than an A100 has) and 1-2.4 KB of register spills a thread; 8192 (32 x 256), which covers L = 3136
# with full-length kernels, takes at most 110 KB.
MIN_SIZE, MAX_SIZE = 256, 8192


def monarch_size(length: int, len_fwd: int, len_bwd: int) -> int | None:
    """The power-of-two FFT size with no wrap-around (``kernels.fft_size``'s bound), at least ``MIN_SIZE``; None
    above ``MAX_SIZE`` (the caller then uses ``torch.fft``)."""
    need = int(length) + max(int(len_fwd) - 1, int(len_bwd))
    n = max(1 << (need - 1).bit_length(), MIN_SIZE)
    return n if n <= MAX_SIZE else None


def factored_on(device: torch.device) -> bool:
    """Whether the kernel takes the factored row DFT for ``device``'s tensors: everywhere but CUDA devices before
    sm_90. Compiled by Triton 3.8 at n = 8192 for sm_80 (an A100), the factored kernel gets 32 registers and a
    9-16 KB stack a thread (its 3D reshapes go through local memory there), the dense one 255 registers and
    1.8-2.4 KB; for sm_90 the factored one gets 252-255 registers and at most 72 bytes. ``get_device_properties``
    is a constant to torch.compile."""
    return device.type != "cuda" or torch.cuda.get_device_properties(device).major >= 9


def input_rows(n: int, length: int, dense: bool = False) -> int:
    """ROWS: how many rows (t1) of a row's (N1, N2) grid the kernel reads and writes, the ``length`` positions
    rounded up to a power of two, at least 16 (a tl.dot side)."""
    n1, n2 = factors(n, dense)
    return min(n1, max(MIN_FACTOR, triton.next_power_of_2(triton.cdiv(length, n2))))


def row_macs(n: int, length: int, dense: bool = False) -> int:
    """Real multiply-adds in the tensor-core products that make one fan-out output row (its input's transform, the
    inverse). Per block of RB spectrum rows: ``F_N1``'s share, ``2 RB ROWS N2`` each way; the row DFT, dense
    ``4 RB N2^2`` or factored ``2 x 4 RB N2 M`` each way. Over the N1 / RB blocks: ``n (4 ROWS + 8 N2)`` dense,
    ``n (4 ROWS + 16 M)`` factored."""
    rows, m = input_rows(n, length, dense), inner_factor(n, dense)
    return n * (4 * rows + (16 * m if m else 8 * factors(n, dense)[1]))


def factors(n: int, dense: bool = False) -> tuple[int, int]:
    """``n = N1 * N2``. Below ``FACTORED_FROM``, ``N1 >= N2`` and the row DFT is one dense product: the N1 side is
    contracted once per direction on real data (the input's rows, the output's real part), the N2 side on complex
    data (four real products), so the larger factor belongs to N1. From ``FACTORED_FROM`` on, ``N2 = 256`` and its
    DFT is itself factored as 16 x 16 (``inner_factor``), unless ``dense`` (``factored_on``)."""
    if inner_factor(n, dense):
        return n // INNER ** 2, INNER ** 2
    n2 = 1 << ((n.bit_length() - 1) // 2)
    return n // n2, n2


def inner_factor(n: int, dense: bool = False) -> int:
    """``M`` with ``N2 = M * M`` when the row DFT is factored (n from ``FACTORED_FROM``, not ``dense``), else 0."""
    return INNER if n >= FACTORED_FROM and not dense else 0


def _unit(exponent: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``exp(-2 pi i e / n)`` as (2, ...) real and imaginary planes, the angle reduced in float64."""
    angle = exponent.remainder(n) * (-2 * math.pi / n)
    return torch.stack([angle.cos(), angle.sin()]).to(dtype).contiguous()


def dft_factors(n: int, device: torch.device | str, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F_N1`` (2, N1, N1), the row DFT and the twiddles ``w_n ** (k1 * t2)`` (2, N1, N2) (the kernel takes fp32;
    float64 for the tests that check the factorization itself). The row DFT is ``F_N2`` (2, N2, N2), or when it is
    factored (``inner_factor`` M > 0) ``F_M`` and the inner twiddles ``w_N2 ** (k2 * t3)`` as (2, 2, M, M): [0] the
    DFT's planes, [1] the twiddles'. Made once per (n, device, dtype) and
    shared, read-only, by every operator of that size; while torch.compile traces, made in the graph instead (Dynamo
    does not keep an ``lru_cache``)."""
    make = _dft_factors if torch.compiler.is_compiling() else _cached_dft_factors
    device = torch.device(device)
    return make(n, device, dtype, not factored_on(device))


def _dft_factors(n: int, device: torch.device, dtype: torch.dtype, dense: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n1, n2 = factors(n, dense)
    i1, i2 = (torch.arange(m, device=device, dtype=torch.float64) for m in (n1, n2))
    m = inner_factor(n, dense)
    if m:
        i3 = torch.arange(m, device=device, dtype=torch.float64)
        row = torch.stack([_unit(torch.outer(i3, i3), m, dtype), _unit(torch.outer(i3, i3), n2, dtype)])
    else:
        row = _unit(torch.outer(i2, i2), n2, dtype)
    return _unit(torch.outer(i1, i1), n1, dtype), row.contiguous(), _unit(torch.outer(i1, i2), n, dtype)


_cached_dft_factors = functools.lru_cache(maxsize=None)(_dft_factors)


def _to_monarch(full: torch.Tensor, n: int) -> torch.Tensor:
    """A full spectrum (..., n), complex, -> (..., 2, N1, N2) real planes with ``[k1, k2] = full[k1 + N1 * k2]``;
    with a factored row DFT (M > 0) column ``k2 = M * a + b`` holds ``full[k1 + N1 * (a + M * b)]`` instead (the
    order in which the inner 16 x 16 steps leave the row's spectrum)."""
    dense = not factored_on(full.device)
    n1, n2 = factors(n, dense)
    grid = full.reshape(*full.shape[:-1], n2, n1).transpose(-1, -2)
    m = inner_factor(n, dense)
    if m:
        grid = grid.reshape(*grid.shape[:-1], m, m).transpose(-1, -2).reshape(grid.shape)
    return torch.stack([grid.real, grid.imag], dim=-3)


def monarch_spectrum(fwd: torch.Tensor, bwd: torch.Tensor | None, n: int) -> torch.Tensor:
    """The kernels' spectrum in the kernel's layout: (K, D, lf), (K, D, lb) -> (K, D, 2, N1, N2) fp32, divided by
    ``n`` (the inverse transform's scale). Differentiable (plain ``torch.fft``)."""
    spectrum = torch.fft.fft(K.circular_kernel(fwd, bwd, n), n=n) / n
    return _to_monarch(spectrum, n).float().contiguous()


def spectrum_grad(grad: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Gradient of ``fft_conv(x, spectrum)`` with respect to the spectrum's real and imaginary planes.

    ``y[t] = Re(sum_k S[k] X[k] exp(2 pi i k t / n))``, so with ``P[k] = sum_b X[k] conj(G[k])`` (``G`` the FFT of the
    output gradient): ``d S_re = Re P``, ``d S_im = -Im P``. (B, K, D, L) and (B, D, L) -> (K, D, 2, N1, N2).
    """
    x_f = torch.fft.fft(x.float(), n=n).unsqueeze(1)
    g_f = torch.fft.fft(grad.float(), n=n)
    return _to_monarch((g_f * x_f.conj()).sum(dim=0), n)  # conj(P): real part Re P, imaginary part -Im P


@triton.jit
def _times_right(ar, ai, fr, fi, PREC: tl.constexpr):
    """``(ar + i ai) @ (fr + i fi)``, four real products."""
    return (tl.dot(ar, fr, input_precision=PREC) - tl.dot(ai, fi, input_precision=PREC),
            tl.dot(ar, fi, input_precision=PREC) + tl.dot(ai, fr, input_precision=PREC))


@triton.jit
def _times_left(fr, fi, ar, ai, PREC: tl.constexpr):
    """``(fr + i fi) @ (ar + i ai)``, four real products."""
    return (tl.dot(fr, ar, input_precision=PREC) - tl.dot(fi, ai, input_precision=PREC),
            tl.dot(fr, ai, input_precision=PREC) + tl.dot(fi, ar, input_precision=PREC))


@triton.jit
def _row_dft(ar, ai, f2r, f2i, f2_ptr, RB: tl.constexpr, N2: tl.constexpr, M: tl.constexpr,
             CONJ: tl.constexpr, PREC: tl.constexpr):
    """The N2-point DFT of each of the RB rows of ``ar + i ai`` (``CONJ``: with conjugate factors, the inverse
    without its ``1/n``). ``f2r + i f2i`` is ``F_N2`` when dense (M = 0): one product. Factored (N2 = M * M), it
    is ``F_M``: each row is an (M, M) grid ``[t2, t3]`` (t = M t2 + t3) transformed along t2, multiplied by the
    twiddles ``w_N2 ** (k2 * t3)`` (at ``f2_ptr + 2 M M``) and transformed along t3, so column ``M k2 + k3`` holds
    spectrum ``k2 + M k3`` (``_to_monarch``'s order); the inverse takes the steps back, k3 first. The block is held
    as ``[a, r, b]`` meanwhile, so that both steps are 2D products with the (M, M) factor, from the left for the
    first axis and from the right for the last. Every factor is symmetric, its own transpose."""
    if M == 0:
        if CONJ:  # (A @ conj(F)): the products of the forward, recombined
            cr = tl.dot(ar, f2r, input_precision=PREC) + tl.dot(ai, f2i, input_precision=PREC)
            ci = tl.dot(ai, f2r, input_precision=PREC) - tl.dot(ar, f2i, input_precision=PREC)
        else:
            cr, ci = _times_right(ar, ai, f2r, f2i, PREC)
    else:
        if CONJ:
            f2i = -f2i
        i = tl.arange(0, M)
        tw = f2_ptr + 2 * M * M + i[:, None] * M + i[None, :]
        twr = tl.load(tw)[:, None, :]
        twi = tl.load(tw + M * M)[:, None, :]
        if CONJ:
            twi = -twi
        ar = tl.reshape(tl.permute(tl.reshape(ar, (RB, M, M)), (1, 0, 2)), (M, RB * M))
        ai = tl.reshape(tl.permute(tl.reshape(ai, (RB, M, M)), (1, 0, 2)), (M, RB * M))
        if CONJ:  # [k2, r, k3] -> [k2, r, t3]
            br, bi = _times_right(tl.reshape(ar, (M * RB, M)), tl.reshape(ai, (M * RB, M)), f2r, f2i, PREC)
        else:  # [t2, r, t3] -> [k2, r, t3]
            br, bi = _times_left(f2r, f2i, ar, ai, PREC)
        br = tl.reshape(br, (M, RB, M))
        bi = tl.reshape(bi, (M, RB, M))
        br, bi = br * twr - bi * twi, br * twi + bi * twr
        if CONJ:  # -> [t2, r, t3]
            cr, ci = _times_left(f2r, f2i, tl.reshape(br, (M, RB * M)), tl.reshape(bi, (M, RB * M)), PREC)
        else:  # -> [k2, r, k3]
            cr, ci = _times_right(tl.reshape(br, (M * RB, M)), tl.reshape(bi, (M * RB, M)), f2r, f2i, PREC)
        cr = tl.reshape(tl.permute(tl.reshape(cr, (M, RB, M)), (1, 0, 2)), (RB, N2))
        ci = tl.reshape(tl.permute(tl.reshape(ci, (M, RB, M)), (1, 0, 2)), (RB, N2))
    return cr, ci


@triton.jit
def _spectrum_block(x, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1, t2, N1: tl.constexpr, N2: tl.constexpr,
                    M: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr):
    """Rows ``k1`` (a block) of X_hat in the (k1, k2) layout, from the row's first ROWS rows ``x`` (ROWS, N2) (the
    rest of the zero-padded row is zero): ``row_dft((F_N1[k1, :ROWS] @ x) * twiddle[k1, :])``."""
    f1 = f1_ptr + k1[:, None] * N1 + t1[None, :]
    ar = tl.dot(tl.load(f1), x, input_precision=PREC)
    ai = tl.dot(tl.load(f1 + N1 * N1), x, input_precision=PREC)
    tw = tw_ptr + k1[:, None] * N2 + t2[None, :]
    twr = tl.load(tw)
    twi = tl.load(tw + N1 * N2)
    ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
    return _row_dft(ar, ai, f2r, f2i, f2_ptr, RB, N2, M, False, PREC)


@triton.jit
def _inverse_block(yr, yi, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1, t2, N1: tl.constexpr, N2: tl.constexpr,
                   M: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr):
    """The share of spectrum rows ``k1`` (a block, ``yr + i yi``) in the real part of the inverse transform's first
    ROWS rows (the ``1/n`` is in the spectrum): ``Re(conj(F_N1)[:ROWS, k1] @ (conj_row_dft(Y) * conj(twiddle)))``."""
    cr, ci = _row_dft(yr, yi, f2r, f2i, f2_ptr, RB, N2, M, True, PREC)
    tw = tw_ptr + k1[:, None] * N2 + t2[None, :]
    twr = tl.load(tw)
    twi = tl.load(tw + N1 * N2)
    cr, ci = cr * twr + ci * twi, ci * twr - cr * twi
    # Re((F_re - i F_im) @ (C_re + i C_im)) = F_re @ C_re + F_im @ C_im
    f1 = f1_ptr + t1[:, None] * N1 + k1[None, :]
    return (tl.dot(tl.load(f1), cr, input_precision=PREC)
            + tl.dot(tl.load(f1 + N1 * N1), ci, input_precision=PREC))


@triton.jit
def _fft_conv_kernel(x_ptr, spec_ptr, f1_ptr, f2_ptr, tw_ptr, y_ptr, c_ptr, B, D, L, NK,
                     SUM_K: tl.constexpr, SQUARES: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                     M: tl.constexpr, ROWS: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr):
    """One output row. The spectrum is produced and consumed a block of RB rows (k1) at a time, and each block's
    share of the output accumulates in one (ROWS, N2) real tile, so no full complex (N1, N2) tile is ever live. Only
    the first ROWS rows (t1) of the row's (N1, N2) grid hold input or kept output.

    Fan-out (``SUM_K`` false): x (B, D, L), y (B, NK, D, L), one program per (b, k, d): ``IFFT(X_hat * S_k)``.
    Fan-in (``SUM_K`` true): x (B, NK, D, L), y (B, D, L), one program per (b, d): ``IFFT(sum_k X_hat_k * conj(S_k))``.
    Square sums (fan-out with ``SQUARES``): the row is not stored; y (B, NK, D) gets ``sum_t (row[t] - c[k, d])^2``
    over its L outputs, c (NK, D): per-branch statistics without the branch outputs in memory.
    Consecutive programs share (k, d), so that spectrum stays in L2.
    """
    pid = tl.program_id(0)
    b = (pid % B).to(tl.int64)
    rest = (pid // B).to(tl.int64)
    d = rest % D
    t1 = tl.arange(0, ROWS)
    t2 = tl.arange(0, N2)
    pos = t1[:, None] * N2 + t2[None, :]
    if M == 0:
        f2 = f2_ptr + t2[:, None] * N2 + t2[None, :]
        f2r = tl.load(f2)
        f2i = tl.load(f2 + N2 * N2)
    else:
        i = tl.arange(0, M)
        f2 = f2_ptr + i[:, None] * M + i[None, :]
        f2r = tl.load(f2)
        f2i = tl.load(f2 + M * M)
    out = tl.zeros((ROWS, N2), dtype=tl.float32)
    if SUM_K:
        for r0 in range(0, N1, RB):
            k1 = r0 + tl.arange(0, RB)
            acc_r = tl.zeros((RB, N2), dtype=tl.float32)
            acc_i = tl.zeros((RB, N2), dtype=tl.float32)
            for k in range(0, NK):
                x = tl.load(x_ptr + ((b * NK + k) * D + d) * L + pos, mask=pos < L, other=0.0).to(tl.float32)
                xr, xi = _spectrum_block(x, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1, t2, N1, N2, M, RB, PREC)
                spec = spec_ptr + (k * D + d) * (2 * N1 * N2) + k1[:, None] * N2 + t2[None, :]
                sr = tl.load(spec)
                si = tl.load(spec + N1 * N2)
                acc_r += xr * sr + xi * si
                acc_i += xi * sr - xr * si
            out += _inverse_block(acc_r, acc_i, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1, t2, N1, N2, M, RB,
                                  PREC)
        y_row = y_ptr + (b * D + d) * L
    else:
        k = rest // D
        x = tl.load(x_ptr + (b * D + d) * L + pos, mask=pos < L, other=0.0).to(tl.float32)
        for r0 in range(0, N1, RB):
            k1 = r0 + tl.arange(0, RB)
            xr, xi = _spectrum_block(x, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1, t2, N1, N2, M, RB, PREC)
            spec = spec_ptr + (k * D + d) * (2 * N1 * N2) + k1[:, None] * N2 + t2[None, :]
            sr = tl.load(spec)
            si = tl.load(spec + N1 * N2)
            out += _inverse_block(xr * sr - xi * si, xr * si + xi * sr, f1_ptr, f2r, f2i, f2_ptr, tw_ptr, k1, t1,
                                  t2, N1, N2, M, RB, PREC)
        y_row = y_ptr + ((b * NK + k) * D + d) * L
    if SQUARES:
        centred = tl.where(pos < L, out - tl.load(c_ptr + k * D + d), 0.0)
        tl.store(y_ptr + (b * NK + k) * D + d, tl.sum(tl.sum(centred * centred, axis=1), axis=0))
    else:
        tl.store(y_row + pos, out, mask=pos < L)


def _meta(n: int, rows: int, dtype: torch.dtype, dense: bool = False) -> dict:
    """The kernel's compile-time parameters and launch options for FFT size ``n``, ``rows`` rows of input (t1), an
    input of ``dtype``, and a row DFT factored or ``dense``."""
    n1, n2 = factors(n, dense)
    # fp32 inputs keep fp32's accuracy (1e-5 of the reference; kernels.TRITON_FP32_PRECISION); bf16/fp16 inputs
    # take single TF32 products.
    # Each program's work is a chain of dependent products: nothing for a software pipeline to overlap, and its
    # buffers would cost shared memory. 8 warps: compiled for sm_90 at n = 8192 and L = 3136, 4 warps spill
    # 330-700 bytes a thread from bf16 inputs and 1.5-1.9 KB from fp32 ones, 8 warps none and 56-144.
    precision = K.TRITON_FP32_PRECISION if dtype in (torch.float32, torch.float64) else "tf32"
    return dict(N1=n1, N2=n2, M=inner_factor(n, dense), ROWS=rows, RB=MIN_FACTOR, PREC=precision, num_warps=8,
                num_stages=1)


def _launch(x: torch.Tensor, spec: torch.Tensor, dft1: torch.Tensor, dft2: torch.Tensor, twiddle: torch.Tensor,
            sum_k: bool, center: torch.Tensor | None = None) -> torch.Tensor:
    """Fan-out (B, K, D, L), fan-in (B, 1, D, L), or with ``center`` (K, D) fp32 the fan-out's square sums (B, K, D)."""
    batch, _, dim, length = x.shape
    nk, n1, n2 = spec.shape[0], spec.shape[-2], spec.shape[-1]
    squares, dense = center is not None, not factored_on(x.device)
    y = x.new_empty(batch, 1 if sum_k else nk, dim, *(() if squares else (length,)), dtype=torch.float32)
    _fft_conv_kernel[(batch * dim * (1 if sum_k else nk),)](
        x, spec, dft1, dft2, twiddle, y, center if squares else y, batch, dim, length, nk, SUM_K=sum_k,
        SQUARES=squares, **_meta(n1 * n2, input_rows(n1 * n2, length, dense), x.dtype, dense))
    return y


@torch.library.custom_op("mrconv::fft_conv", mutates_args=())
def fft_conv(x: torch.Tensor, spec: torch.Tensor, dft1: torch.Tensor, dft2: torch.Tensor,
             twiddle: torch.Tensor) -> torch.Tensor:
    """(B, D, L) input in any float dtype, (K, D, 2, N1, N2) spectra (``monarch_spectrum``) and the ``dft_factors``
    of ``n = N1 * N2`` -> (B, K, D, L) fp32."""
    return _launch(x.contiguous().unsqueeze(1), spec.contiguous(), dft1, dft2, twiddle, sum_k=False)


@torch.library.custom_op("mrconv::fft_adjoint", mutates_args=())
def fft_adjoint(dy: torch.Tensor, spec: torch.Tensor, dft1: torch.Tensor, dft2: torch.Tensor,
                twiddle: torch.Tensor) -> torch.Tensor:
    """``sum_k`` of the correlations with the kernels (conjugate spectra): (B, K, D, L) -> (B, D, L) fp32, the
    gradient of ``fft_conv`` with respect to its input."""
    return _launch(dy.contiguous(), spec.contiguous(), dft1, dft2, twiddle, sum_k=True)[:, 0]


@torch.library.custom_op("mrconv::fft_square_sums", mutates_args=())
def fft_square_sums(x: torch.Tensor, spec: torch.Tensor, center: torch.Tensor, dft1: torch.Tensor,
                    dft2: torch.Tensor, twiddle: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t} (fft_conv(x, spec)[b, k, d, t] - center[k, d])^2`` -> (K, D) fp32, reduced on chip: the
    convolution's output never reaches memory (the training form's per-branch variances)."""
    partial = _launch(x.contiguous().unsqueeze(1), spec.contiguous(), dft1, dft2, twiddle, sum_k=False,
                      center=center.to(torch.float32).contiguous())
    return partial.sum(dim=0)


@fft_conv.register_fake
def _(x, spec, dft1, dft2, twiddle):
    return x.new_empty(x.shape[0], spec.shape[0], *x.shape[1:], dtype=torch.float32)


@fft_adjoint.register_fake
def _(dy, spec, dft1, dft2, twiddle):
    return dy.new_empty(dy.shape[0], *dy.shape[2:], dtype=torch.float32)


@fft_square_sums.register_fake
def _(x, spec, center, dft1, dft2, twiddle):
    return x.new_empty(spec.shape[0], x.shape[1], dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, spec, dft1, dft2, twiddle = ctx.saved_tensors
    grad_x = fft_adjoint(grad, spec, dft1, dft2, twiddle).to(x.dtype) if ctx.needs_input_grad[0] else None
    n = spec.shape[-2] * spec.shape[-1]
    grad_spec = spectrum_grad(grad, x, n).to(spec.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_spec, None, None, None


fft_conv.register_autograd(_backward, setup_context=_setup)
