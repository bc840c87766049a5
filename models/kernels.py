"""Pure functions behind the MRConv layer: resolutions, kernel construction, long convolutions and the fold.

Conventions (see ``docs`` in the README and MRCONV.md):

* A kernel set is ``(dirs, K, D, l)``: ``dirs`` is 1 (causal) or 2 (bidirectional), ``K`` branches, ``D`` channels.
* Direction 0 is the *forward* kernel ``kf``: tap ``j`` weights lag ``j`` (the past, ``u[t - j]``).
  Direction 1 is the *backward* kernel ``kb``: tap ``j`` weights lag ``-(j + 1)`` (the future, ``u[t + j + 1]``),
  so no lag is counted twice::

      y[t] = sum_j kf[j] u[t - j] + sum_j kb[j] u[t + j + 1]

* Convolutions are linear (zero padded), never circular.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

KERNEL_TYPES = ("dilated", "fourier", "sparse", "fourier_sparse", "dense")


def num_resolutions(seq_len: int, l0: int, max_resolutions: int | None = None) -> int:
    """``N = ceil(log2(L / l0)) + 1`` (at least 1), optionally capped."""
    n = 1 if seq_len <= l0 else math.ceil(math.log2(seq_len / l0)) + 1
    return min(n, max_resolutions) if max_resolutions else n


def resolution_lengths(seq_len: int, l0: int, max_resolutions: int | None = None) -> list[int]:
    """Kernel length of every branch: ``l_i = l0 * 2**i``, clipped to the global length ``seq_len``."""
    return [min(l0 * 2**i, seq_len) for i in range(num_resolutions(seq_len, l0, max_resolutions))]


def next_fast_len(n: int) -> int:
    """Smallest integer >= ``n`` whose only prime factors are 2, 3 and 5 (fast for pocketfft, MKL and cuFFT)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            # smallest power of two that lifts p35 to at least n
            quotient = -(-n // p35)
            p2 = 1 << (quotient - 1).bit_length()
            best = min(best, p2 * p35)
            p35 *= 3
        p5 *= 5
    return best


def fft_size(seq_len: int, len_fwd: int, len_bwd: int) -> int:
    """FFT size with no wrap-around for kernels of these (already truncated) lengths on a length-``seq_len`` input.

    Forward lags reach ``len_fwd - 1`` into the past, backward lags ``len_bwd`` into the future, so a circular
    convolution of size ``n >= L + max(len_fwd - 1, len_bwd)`` equals the linear one on outputs ``0..L-1``.
    """
    return next_fast_len(int(seq_len) + max(int(len_fwd) - 1, int(len_bwd)))


def truncate(kernels: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split ``(dirs, K, D, l)`` into forward/backward kernels, dropping taps that cannot reach a length-L input."""
    fwd = kernels[0, ..., :seq_len]
    bwd = kernels[1, ..., : max(seq_len - 1, 0)] if kernels.shape[0] == 2 else None
    return fwd, bwd


def kernel_spectrum(fwd: torch.Tensor, bwd: torch.Tensor | None, n: int) -> torch.Tensor:
    """``rfft`` of the circular layout of a (forward, backward) kernel pair: forward taps at ``0..``, backward taps
    wrapped to the end (index ``n - 1 - j`` holds ``kb[j]``, lag ``-(j + 1)``)."""
    parts = [fwd]
    used = fwd.shape[-1] + (0 if bwd is None else bwd.shape[-1])
    parts.append(fwd.new_zeros(*fwd.shape[:-1], n - used))
    if bwd is not None:
        parts.append(bwd.flip(-1))
    return torch.fft.rfft(torch.cat(parts, dim=-1), n=n)


def fft_conv(u: torch.Tensor, spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """Linear convolution of ``u`` (B, D, L) with K kernels given by their spectrum (K, D, n//2+1) -> (B, K, D, L)."""
    length = u.shape[-1]
    u_f = torch.fft.rfft(u, n=n)
    return torch.fft.irfft(u_f.unsqueeze(1) * spectrum, n=n)[..., :length]


def toeplitz(fwd: torch.Tensor, bwd: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Per-channel Toeplitz matrices ``T[..., t, s] = k(t - s)`` (..., L, L) of a (forward, backward) kernel pair."""
    length = seq_len
    lead = fwd.shape[:-1]
    past = F.pad(fwd, (0, length - fwd.shape[-1]))  # lags 0..L-1
    future = fwd.new_zeros(*lead, length - 1) if bwd is None else F.pad(bwd, (0, length - 1 - bwd.shape[-1]))
    lags = torch.cat([future.flip(-1), past], dim=-1)  # index L-1+lag holds k(lag), lag in [-(L-1), L-1]
    idx = torch.arange(length, device=fwd.device)
    return lags[..., idx[:, None] - idx[None, :] + length - 1]


def toeplitz_conv(u: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``u`` (B, D, L) times per-channel Toeplitz matrices (K, D, L, L) -> (B, K, D, L), as one batched matmul."""
    out = torch.matmul(matrices, u.permute(1, 2, 0))  # (K, D, L, B)
    return out.permute(3, 0, 1, 2)


def dilated_conv(u: torch.Tensor, taps: torch.Tensor, dilation: int) -> torch.Tensor:
    """Direct depthwise dilated convolution. ``taps`` (dirs, D, l0): forward taps at lags ``j * d``, backward taps at
    lags ``-(j + 1) * d``; returns (B, D, L)."""
    l0 = taps.shape[-1]
    # conv1d is a cross-correlation: weight index m reads u[t + m*d - pad], i.e. lag (l0 - 1 - m) * d.
    weight = taps[0].flip(-1)
    pad = (l0 - 1) * dilation, 0
    if taps.shape[0] == 2:
        weight = torch.cat([weight, taps[1]], dim=-1)
        pad = (l0 - 1) * dilation, l0 * dilation
    return F.conv1d(F.pad(u, pad), weight.unsqueeze(1), dilation=dilation, groups=u.shape[1])


def dilated_dense(taps: torch.Tensor, dilation: int, length: int) -> torch.Tensor:
    """Expand dilated taps (dirs, D, l0) to dense kernels (dirs, D, length) with zeros between taps."""
    dirs, dim, l0 = taps.shape
    dense = taps.new_zeros(dirs, dim, length)
    fwd_pos = torch.arange(l0, device=taps.device) * dilation
    dense[0, :, fwd_pos] = taps[0]
    if dirs == 2:
        dense[1, :, fwd_pos + dilation - 1] = taps[1]
    return dense


def fourier_kernel(modes: torch.Tensor, length: int) -> torch.Tensor:
    """Real kernel of ``length`` taps from complex low-frequency modes (..., m): ``irfft(zero_pad(modes), n=length)``.

    ``norm='forward'`` keeps the tap amplitude independent of the length, so every resolution starts on one scale.
    """
    return torch.fft.irfft(modes, n=length, norm="forward")


def sparse_kernel(values: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Dense kernel (..., D, length) with ``values`` (..., D, k) at positions ``index`` (..., k)."""
    dense = values.new_zeros(*values.shape[:-1], length)
    return dense.scatter(-1, index.unsqueeze(-2).expand_as(values), values)


def pad_to(kernels: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Zero-pad kernels (..., l_i) to a common length and stack them on a new dim -3: -> (dirs, K, D, length)."""
    return torch.stack([F.pad(k, (0, length - k.shape[-1])) for k in kernels], dim=1)


def fold_branches(
    kernels: torch.Tensor,
    alpha: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact structural reparameterization of ``sum_i alpha_i * BN_i(k_i * u)`` into ``k_rep * u + b_rep``.

    ``kernels`` (dirs, N, D, l); ``alpha`` and the eval-mode BN tensors (N, D). Computed in float64::

        s_i   = gamma_i / sqrt(var_i + eps)
        k_rep = sum_i alpha_i * s_i * k_i
        b_rep = sum_i alpha_i * (beta_i - s_i * mu_i)      # missing from the paper, needed for exactness
    """
    dtype = kernels.dtype
    alpha, gamma, beta, mean, var = (t.double() for t in (alpha, bn_weight, bn_bias, bn_mean, bn_var))
    scale = gamma / torch.sqrt(var + eps)
    kernel = ((alpha * scale)[None, :, :, None] * kernels.double()).sum(dim=1)
    bias = (alpha * (beta - scale * mean)).sum(dim=0)
    return kernel.to(dtype), bias.to(dtype)
