"""Depthwise long convolution as one fused FFT per row, the FFT written as matrix products (Triton).

For an FFT size ``n = N1 * N2`` (powers of two, ``N2 <= N1``, each in 16..128) a row ``x`` of the zero-padded input
is the (N1, N2) matrix ``X[t1, t2] = x[N2 * t1 + t2]``, and the four-step ("Monarch") factorization of its DFT is::

    A = F_N1 @ X                      (k1, t2)
    A[k1, t2] *= w_n ** (k1 * t2)     twiddle, w_n = exp(-2 pi i / n)
    B = A @ F_N2                      B[k1, k2] = X_hat[k1 + N1 * k2]

Each program takes one (batch row, channel): it reads the row once in its own dtype, transforms it on chip (fp32
accumulation), multiplies by the kernel spectrum (precomputed on the host in the same (k1, k2) layout, ``1/n``
included), runs the inverse four steps back to the row layout (``C = Y @ conj(F_N2)``, conjugate twiddle, real part of
``conj(F_N1) @ C``), crops to the ``L`` outputs and stores them once, in fp32. Linear, not circular: ``n`` is at least
``L + max(lf - 1, lb)`` (``kernels.fft_size``), so nothing wraps around.

Two modes, as ``triton_toeplitz``: fan-out (``fft_conv``: (B, D, L) -> (B, K, D, L), one forward transform shared by
the K kernels) and fan-in (``fft_adjoint``: (B, K, D, L) -> (B, D, L), the correlations with the K kernels summed in
the spectral domain, one inverse transform). The gradient with respect to the spectrum (and so the kernels) stays on
``torch.fft``: it needs the input's and the gradient's spectra summed over the batch, which is not a per-row kernel.

Registered as the custom ops ``mrconv::fft_conv`` and ``mrconv::fft_adjoint`` (fake implementations; autograd on
``fft_conv``) so that ``torch.compile`` traces through them. Runs on CUDA, and on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how the tests check it without a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import kernels as K

MIN_FACTOR, MAX_FACTOR = 16, 128  # tl.dot tiles are at least 16 wide; 128 x 128 is the register budget of one tile
MIN_SIZE, MAX_SIZE = MIN_FACTOR * MIN_FACTOR, MAX_FACTOR * MAX_FACTOR


def monarch_size(length: int, len_fwd: int, len_bwd: int) -> int | None:
    """The power-of-two FFT size with no wrap-around (``kernels.fft_size``'s bound), at least ``MIN_SIZE``; None
    above ``MAX_SIZE`` (the caller then uses ``torch.fft``)."""
    need = int(length) + max(int(len_fwd) - 1, int(len_bwd))
    n = max(1 << (need - 1).bit_length(), MIN_SIZE)
    return n if n <= MAX_SIZE else None


def factors(n: int) -> tuple[int, int]:
    """``n = N1 * N2`` with ``N1 >= N2``: the N1 side is contracted once per direction, the N2 side twice (four
    real products), so the larger factor belongs to N1."""
    n2 = 1 << ((n.bit_length() - 1) // 2)
    return n // n2, n2


def _unit(exponent: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``exp(-2 pi i e / n)`` as (2, ...) real and imaginary planes, the angle reduced in float64."""
    angle = exponent.remainder(n) * (-2 * math.pi / n)
    return torch.stack([angle.cos(), angle.sin()]).to(dtype).contiguous()


def dft_factors(n: int, device: torch.device, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F_N1`` (2, N1, N1), ``F_N2`` (2, N2, N2) and the twiddles ``w_n ** (k1 * t2)`` (2, N1, N2) (the kernel
    takes fp32; float64 for the tests that check the factorization itself)."""
    n1, n2 = factors(n)
    i1, i2 = (torch.arange(m, device=device, dtype=torch.float64) for m in (n1, n2))
    return (_unit(torch.outer(i1, i1), n1, dtype), _unit(torch.outer(i2, i2), n2, dtype),
            _unit(torch.outer(i1, i2), n, dtype))


def _to_monarch(full: torch.Tensor, n: int) -> torch.Tensor:
    """A full spectrum (..., n), complex, -> (..., 2, N1, N2) real planes with ``[k1, k2] = full[k1 + N1 * k2]``."""
    n1, n2 = factors(n)
    grid = full.reshape(*full.shape[:-1], n2, n1).transpose(-1, -2)
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
def _forward_dft(row_ptr, L, f1_ptr, f2_ptr, tw_ptr,
                 N1: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """X_hat of one zero-padded row, (N1, N2) real and imaginary tiles in the (k1, k2) layout.

    Step 1 and the twiddle run a block of BC columns (t2) at a time and step 2 accumulates each block's share, so only
    the (N1, N2) result is live in full. Only the first ROWS rows (t1) of X can hold input."""
    k1 = tl.arange(0, N1)
    t1 = tl.arange(0, ROWS)
    k2 = tl.arange(0, N2)
    cols = tl.arange(0, BC)
    # F_N1[:, :ROWS]: the rows of X past the input are zero
    f1 = f1_ptr + k1[:, None] * N1 + t1[None, :]
    f1r = tl.load(f1)
    f1i = tl.load(f1 + N1 * N1)
    br = tl.zeros((N1, N2), dtype=tl.float32)
    bi = tl.zeros((N1, N2), dtype=tl.float32)
    for c0 in range(0, N2, BC):
        t2 = c0 + cols
        pos = t1[:, None] * N2 + t2[None, :]
        xc = tl.load(row_ptr + pos, mask=pos < L, other=0.0).to(tl.float32)
        ar = tl.dot(f1r, xc, input_precision=PREC)
        ai = tl.dot(f1i, xc, input_precision=PREC)
        tw = tw_ptr + k1[:, None] * N2 + t2[None, :]
        twr = tl.load(tw)
        twi = tl.load(tw + N1 * N2)
        ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
        f2 = f2_ptr + t2[:, None] * N2 + k2[None, :]  # rows t2 of F_N2
        f2r = tl.load(f2)
        f2i = tl.load(f2 + N2 * N2)
        br += tl.dot(ar, f2r, input_precision=PREC) - tl.dot(ai, f2i, input_precision=PREC)
        bi += tl.dot(ar, f2i, input_precision=PREC) + tl.dot(ai, f2r, input_precision=PREC)
    return br, bi


@triton.jit
def _inverse_dft_store(yr, yi, out_ptr, L, f1_ptr, f2_ptr, tw_ptr,
                       N1: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr, BC: tl.constexpr,
                       PREC: tl.constexpr):
    """Real part of the inverse transform (the ``1/n`` is in the spectrum) of the (N1, N2) tiles ``yr + i yi``,
    cropped to the first L positions and stored, a block of BC columns (t2) at a time."""
    k1 = tl.arange(0, N1)
    t1 = tl.arange(0, ROWS)
    k2 = tl.arange(0, N2)
    cols = tl.arange(0, BC)
    # conj(F_N1)[:ROWS, :]: only the first ROWS output rows reach L. Re(conj(F) @ C) = F_re @ C_re + F_im @ C_im.
    f1 = f1_ptr + t1[:, None] * N1 + k1[None, :]
    f1r = tl.load(f1)
    f1i = tl.load(f1 + N1 * N1)
    for c0 in range(0, N2, BC):
        t2 = c0 + cols
        f2 = f2_ptr + k2[:, None] * N2 + t2[None, :]  # columns t2 of conj(F_N2) = f2r - i f2i
        f2r = tl.load(f2)
        f2i = tl.load(f2 + N2 * N2)
        cr = tl.dot(yr, f2r, input_precision=PREC) + tl.dot(yi, f2i, input_precision=PREC)
        ci = tl.dot(yi, f2r, input_precision=PREC) - tl.dot(yr, f2i, input_precision=PREC)
        tw = tw_ptr + k1[:, None] * N2 + t2[None, :]  # conjugate twiddle: twr - i twi
        twr = tl.load(tw)
        twi = tl.load(tw + N1 * N2)
        cr, ci = cr * twr + ci * twi, ci * twr - cr * twi
        out = tl.dot(f1r, cr, input_precision=PREC) + tl.dot(f1i, ci, input_precision=PREC)
        pos = t1[:, None] * N2 + t2[None, :]
        tl.store(out_ptr + pos, out, mask=pos < L)


@triton.jit
def _fft_conv_kernel(x_ptr, spec_ptr, f1_ptr, f2_ptr, tw_ptr, y_ptr, B, D, L, NK,
                     SUM_K: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr,
                     BC: tl.constexpr, PREC: tl.constexpr):
    """One (batch row, channel); consecutive programs share the channel, so its spectrum stays in L2.

    Fan-out (``SUM_K`` false): x (B, D, L), y (B, NK, D, L), ``y_k = IFFT(X_hat * S_k)``.
    Fan-in (``SUM_K`` true): x (B, NK, D, L), y (B, D, L), ``y = IFFT(sum_k X_hat_k * conj(S_k))``.
    """
    pid = tl.program_id(0)
    b = (pid % B).to(tl.int64)
    d = (pid // B).to(tl.int64)
    k1 = tl.arange(0, N1)
    k2 = tl.arange(0, N2)
    grid = k1[:, None] * N2 + k2[None, :]
    if SUM_K:
        acc_r = tl.zeros((N1, N2), dtype=tl.float32)
        acc_i = tl.zeros((N1, N2), dtype=tl.float32)
        for k in range(0, NK):
            xr, xi = _forward_dft(x_ptr + ((b * NK + k) * D + d) * L, L, f1_ptr, f2_ptr, tw_ptr,
                                  N1, N2, ROWS, BC, PREC)
            spec = spec_ptr + (k * D + d) * (2 * N1 * N2) + grid
            sr = tl.load(spec)
            si = tl.load(spec + N1 * N2)
            acc_r += xr * sr + xi * si
            acc_i += xi * sr - xr * si
        _inverse_dft_store(acc_r, acc_i, y_ptr + (b * D + d) * L, L, f1_ptr, f2_ptr, tw_ptr,
                           N1, N2, ROWS, BC, PREC)
    else:
        xr, xi = _forward_dft(x_ptr + (b * D + d) * L, L, f1_ptr, f2_ptr, tw_ptr, N1, N2, ROWS, BC, PREC)
        for k in range(0, NK):
            spec = spec_ptr + (k * D + d) * (2 * N1 * N2) + grid
            sr = tl.load(spec)
            si = tl.load(spec + N1 * N2)
            _inverse_dft_store(xr * sr - xi * si, xr * si + xi * sr, y_ptr + ((b * NK + k) * D + d) * L, L,
                               f1_ptr, f2_ptr, tw_ptr, N1, N2, ROWS, BC, PREC)


def _launch(x: torch.Tensor, spec: torch.Tensor, dft1: torch.Tensor, dft2: torch.Tensor, twiddle: torch.Tensor,
            sum_k: bool) -> torch.Tensor:
    batch, _, dim, length = x.shape
    nk, n1, n2 = spec.shape[0], spec.shape[-2], spec.shape[-1]
    y = x.new_empty(batch, 1 if sum_k else nk, dim, length, dtype=torch.float32)
    rows = min(n1, max(MIN_FACTOR, triton.next_power_of_2(triton.cdiv(length, n2))))
    # fp32 inputs keep fp32 products (1e-5 of the reference); bf16/fp16 inputs take TF32 tensor cores
    prec = "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"
    _fft_conv_kernel[(batch * dim,)](
        x, spec, dft1, dft2, twiddle, y, batch, dim, length, nk, SUM_K=sum_k, N1=n1, N2=n2, ROWS=rows,
        BC=min(n2, 32), PREC=prec, num_warps=8 if n1 * n2 >= 4096 else 4)
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


@fft_conv.register_fake
def _(x, spec, dft1, dft2, twiddle):
    return x.new_empty(x.shape[0], spec.shape[0], *x.shape[1:], dtype=torch.float32)


@fft_adjoint.register_fake
def _(dy, spec, dft1, dft2, twiddle):
    return dy.new_empty(dy.shape[0], *dy.shape[2:], dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, spec, dft1, dft2, twiddle = ctx.saved_tensors
    grad_x = fft_adjoint(grad, spec, dft1, dft2, twiddle).to(x.dtype) if ctx.needs_input_grad[0] else None
    n = spec.shape[-2] * spec.shape[-1]
    grad_spec = spectrum_grad(grad, x, n).to(spec.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_spec, None, None, None


fft_conv.register_autograd(_backward, setup_context=_setup)
