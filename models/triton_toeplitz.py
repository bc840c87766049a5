"""Depthwise long convolution as a Toeplitz matrix product whose tiles are generated on the fly (Triton).

``y[b, k, d, t] = sum_s k_{k,d}(t - s) x[b, d, s]``: per channel a (L x L) Toeplitz matrix times an (L x B) block of
inputs. Each program builds its (t, s) tile of the matrix from the kernel's lag vector (``lags[..., L - 1 + lag]``,
as in ``kernels.toeplitz``), so no matrix is ever written to memory, and multiplies it on tensor cores (``tl.dot``,
fp32 accumulation). Only the ``s`` blocks inside the kernel's support are visited. The adjoint (``T^T``) is the same
product with the lag vector reversed, summed over the kernels.

A third mode reduces instead of storing: ``toeplitz_square_sums`` gives the fan-out's centred square sums per
(kernel, channel), the training form's per-branch variances, without writing a branch output.

Registered as the custom ops ``mrconv::toeplitz_conv`` (fake implementation and autograd included),
``mrconv::toeplitz_adjoint`` and ``mrconv::toeplitz_square_sums`` so that ``torch.compile`` traces through them. Runs
on CUDA, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported),
which is how the tests check it without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import kernels as K

# Triton's interpreter (3.8) multiplies bf16 tiles wrongly in tl.dot (fp16 and fp32 are right; compiled kernels use
# the tensor cores' bf16 products): there the tiles are widened to fp32 first, so the tests check the arithmetic.
_WIDEN_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _toeplitz_kernel(x_ptr, lags_ptr, y_ptr, c_ptr, B, D, L, NK, span_lo, span_hi,
                     x_kstride, y_kstride, SUM_K: tl.constexpr, SQUARES: tl.constexpr, FP32_PREC: tl.constexpr,
                     WIDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """One (kernel-or-channel, t block, batch block) tile of the output.

    Fan-out (``SUM_K`` false): x (B, 1, D, L), y (B, NK, D, L), program axis 0 runs over (k, d).
    Fan-in (``SUM_K`` true): x (B, NK, D, L), y (B, 1, D, L), axis 0 runs over d and the k loop sums.
    Square sums (fan-out with ``SQUARES``): the tile is not stored; y (NK, D, t blocks, batch blocks) gets
    ``sum (tile - c[k, d])^2`` over its valid entries, c (NK, D).
    Lags with ``t - s`` outside ``[span_lo, span_hi]`` are zero, so those ``s`` are skipped.
    """
    pid = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    d = pid % D
    t0 = tl.program_id(1) * BLOCK_T
    s_start = tl.maximum(t0 - span_hi, 0)
    s_start = (s_start // BLOCK_S) * BLOCK_S
    s_stop = tl.minimum(t0 + BLOCK_T - span_lo, L)
    acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    n_k = NK if SUM_K else 1
    for kk in range(0, n_k):
        k = kk if SUM_K else pid // D
        lag_row = lags_ptr + (k * D + d) * (2 * L - 1) + (L - 1)
        x_row = x_ptr + (kk * x_kstride if SUM_K else 0) + d * L
        for s0 in range(s_start, s_stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            inside = (t[:, None] < L) & (s[None, :] < L)
            tile = tl.load(lag_row + t[:, None] - s[None, :], mask=inside, other=0.0)
            xs = tl.load(x_row + b[None, :] * (x_kstride * (NK if SUM_K else 1)) + s[:, None],
                         mask=(s[:, None] < L) & (b[None, :] < B), other=0.0)
            if WIDEN:
                acc += tl.dot(tile.to(tl.float32), xs.to(tl.float32), input_precision="ieee")
            elif FP32_PREC != "":  # an fp32 input: kernels.TRITON_FP32_PRECISION
                acc += tl.dot(tile, xs, input_precision=FP32_PREC)
            else:
                acc += tl.dot(tile, xs)
    valid = (t[:, None] < L) & (b[None, :] < B)
    if SQUARES:
        centred = tl.where(valid, acc - tl.load(c_ptr + pid), 0.0)  # pid = k * D + d
        slot = (pid * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        tl.store(y_ptr + slot, tl.sum(tl.sum(centred * centred, axis=1), axis=0))
    else:
        y_row = y_ptr + (0 if SUM_K else (pid // D) * y_kstride) + d * L
        out = y_row + b[None, :] * (y_kstride * (1 if SUM_K else NK)) + t[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=valid)


def _launch(x: torch.Tensor, lags: torch.Tensor, span: tuple[int, int], sum_k: bool,
            center: torch.Tensor | None = None) -> torch.Tensor:
    """Fan-out (B, K, D, L), fan-in (B, 1, D, L), or with ``center`` (K, D) fp32 the fan-out's square sums per tile
    (K, D, t blocks, batch blocks)."""
    batch, kx, dim, length = x.shape
    nk = lags.shape[0]
    block_t = block_s = 16 if length <= 16 else 32
    block_b = 16 if batch <= 16 else 32
    grid = (dim if sum_k else nk * dim, triton.cdiv(length, block_t), triton.cdiv(batch, block_b))
    squares = center is not None
    shape = (nk, dim, grid[1], grid[2]) if squares else (batch, 1 if sum_k else nk, dim, length)
    y = x.new_empty(shape, dtype=torch.float32)
    _toeplitz_kernel[grid](x, lags.to(x.dtype).contiguous(), y, center if squares else y, batch, dim, length, nk,
                           span[0], span[1], dim * length, dim * length, SUM_K=sum_k, SQUARES=squares,
                           FP32_PREC=K.TRITON_FP32_PRECISION if x.dtype == torch.float32 else "",
                           WIDEN=_WIDEN_BF16 and x.dtype == torch.bfloat16,
                           BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_B=block_b)
    return y


def lag_vectors(fwd: torch.Tensor, bwd: torch.Tensor | None, length: int) -> torch.Tensor:
    """(K, D, 2L-1) lag vectors with ``k(lag)`` at index ``L - 1 + lag`` (the layout of ``kernels.toeplitz``)."""
    past = torch.nn.functional.pad(fwd, (0, length - fwd.shape[-1]))
    future = (fwd.new_zeros(*fwd.shape[:-1], length - 1) if bwd is None
              else torch.nn.functional.pad(bwd, (0, length - 1 - bwd.shape[-1])))
    return torch.cat([future.flip(-1), past], dim=-1)


@torch.library.custom_op("mrconv::toeplitz_conv", mutates_args=())
def toeplitz_conv(x: torch.Tensor, lags: torch.Tensor, span_lo: int, span_hi: int) -> torch.Tensor:
    """(B, D, L) input, (K, D, 2L-1) lag vectors non-zero for lags in ``[span_lo, span_hi]`` -> (B, K, D, L) fp32."""
    return _launch(x.contiguous().unsqueeze(1), lags, (span_lo, span_hi), sum_k=False)


@torch.library.custom_op("mrconv::toeplitz_adjoint", mutates_args=())
def toeplitz_adjoint(dy: torch.Tensor, lags: torch.Tensor, span_lo: int, span_hi: int) -> torch.Tensor:
    """``sum_k T_k^T dy_k``: (B, K, D, L) -> (B, D, L) fp32 (the reversed lag vector, lags negated)."""
    return _launch(dy.contiguous(), lags.flip(-1), (-span_hi, -span_lo), sum_k=True)[:, 0]


@torch.library.custom_op("mrconv::toeplitz_square_sums", mutates_args=())
def toeplitz_square_sums(x: torch.Tensor, lags: torch.Tensor, center: torch.Tensor, span_lo: int,
                         span_hi: int) -> torch.Tensor:
    """``sum_{b,t} (toeplitz_conv(x, lags)[b, k, d, t] - center[k, d])^2`` -> (K, D) fp32, reduced tile by tile on
    chip: the convolution's output never reaches memory (the training form's per-branch variances)."""
    partial = _launch(x.contiguous().unsqueeze(1), lags, (span_lo, span_hi), sum_k=False,
                      center=center.to(torch.float32).contiguous())
    return partial.sum(dim=(2, 3))


@toeplitz_square_sums.register_fake
def _(x, lags, center, span_lo, span_hi):
    return x.new_empty(lags.shape[0], x.shape[1], dtype=torch.float32)


@toeplitz_conv.register_fake
def _(x, lags, span_lo, span_hi):
    return x.new_empty(x.shape[0], lags.shape[0], *x.shape[1:], dtype=torch.float32)


@toeplitz_adjoint.register_fake
def _(dy, lags, span_lo, span_hi):
    return dy.new_empty(dy.shape[0], *dy.shape[2:], dtype=torch.float32)


def lag_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g[k, d, L-1+lag] = sum_{b,t} dy[b, k, d, t] x[b, d, t - lag]`` (``kernels.lag_correlation``, in fp32)."""
    return K.lag_correlation(dy.float(), x.float())


def _setup(ctx, inputs, output):
    x, lags, span_lo, span_hi = inputs
    ctx.save_for_backward(x, lags)
    ctx.span = (span_lo, span_hi)


def _backward(ctx, grad):
    x, lags = ctx.saved_tensors
    grad_x = toeplitz_adjoint(grad, lags, *ctx.span).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_lags = lag_grad(grad, x).to(lags.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_lags, None, None


toeplitz_conv.register_autograd(_backward, setup_context=_setup)
