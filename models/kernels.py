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
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

KERNEL_TYPES = ("dilated", "fourier", "sparse", "fourier_sparse", "dense")
# impl="triton": Toeplitz tiles generated on chip (models/triton_toeplitz.py) up to this length, where the O(L^2)
# product still costs about a depthwise conv on tensor cores (FIELD_NOTES: bf16 Toeplitz bmm at L = 784 on an H100),
# the fused FFT kernel (models/triton_fft.py) above. Not yet measured with the Triton kernels themselves.
TRITON_MAX_LEN = 784
# impl="triton" on fp32 inputs (the training form's, an fp32 model's): Triton's tl.dot input precision. "tf32x3"
# multiplies as three TF32 tensor-core products (operands split into high and low TF32 parts, low x low dropped)
# rather than with fp32 FMAs ("ieee"). Emulated in torch at L = 3136 (FFT size 8192), the conv's error against
# float64: 2.3e-7 relative, as with fp32 FMAs (2.4e-7; one TF32 product: 3.9e-4). Compiled for sm_90 at n = 8192
# the FFT kernel's FMA path spills 304-1,004 bytes a thread, this one 56-144. Its speed against "ieee" awaits a GPU:
# ``pipelines.benchmark layer --fp32-precision``. bf16/fp16 inputs are not affected.
TRITON_FP32_PRECISION = "tf32x3"
# Rows of the (L, L) kernel-gradient products skewed at a time by ``antidiagonal_sums``: its padded copy is then
# ``64 * (L + 64)`` per matrix (at L = 196, 0.42 of a matrix; the whole-matrix skew took two).
ANTIDIAGONAL_ROWS = 64


def triton_runs_on(device: torch.device) -> bool:
    """Whether impl="triton" can launch its kernels on ``device``'s tensors: a CUDA (or ROCm) device, or any under
    Triton's interpreter (``TRITON_INTERPRET=1``, which the tests set to run them on the CPU)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


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


def circular_kernel(fwd: torch.Tensor, bwd: torch.Tensor | None, n: int) -> torch.Tensor:
    """The circular layout of a (forward, backward) kernel pair on ``n`` points: forward taps at ``0..``, backward
    taps wrapped to the end (index ``n - 1 - j`` holds ``kb[j]``, lag ``-(j + 1)``)."""
    parts = [fwd]
    used = fwd.shape[-1] + (0 if bwd is None else bwd.shape[-1])
    parts.append(fwd.new_zeros(*fwd.shape[:-1], n - used))
    if bwd is not None:
        parts.append(bwd.flip(-1))
    return torch.cat(parts, dim=-1)


def kernel_spectrum(fwd: torch.Tensor, bwd: torch.Tensor | None, n: int) -> torch.Tensor:
    """``rfft`` of the circular layout (``circular_kernel``) of a (forward, backward) kernel pair."""
    return torch.fft.rfft(circular_kernel(fwd, bwd, n), n=n)


def window_means(x: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor | None) -> torch.Tensor:
    """Mean over batch and the ``L`` output positions of every ``k_i * u``, without the convolutions: (K, D).

    ``sum_t (k * u)[t] = sum_lag k[lag] * W[lag]`` with ``W[lag]`` the sum of the inputs that lag brings into the
    output window: a prefix sum of the batch-summed input (forward lag ``j``: ``u[0 : L - j]``; backward lag
    ``-(j + 1)``: ``u[j + 1 : L]``). Accumulated in float64; ``x`` (B, D, L), kernels as ``truncate`` gives them."""
    batch, _, length = x.shape
    summed = x.sum(dim=0, dtype=torch.float64)
    prefix = F.pad(summed.cumsum(dim=-1), (1, 0))  # prefix[:, j] = sum of the first j positions
    total = (fwd.double() * prefix.flip(-1)[:, : fwd.shape[-1]]).sum(dim=-1)  # prefix[L - j]
    if bwd is not None:
        total = total + (bwd.double() * (prefix[:, length:] - prefix[:, 1: bwd.shape[-1] + 1])).sum(dim=-1)
    return (total / (batch * length)).to(x.dtype)


def weighted_sum(kernels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * k_i``: kernels (K, D, l), weights (K, D) -> one kernel (1, D, l)."""
    return (kernels * weights[..., None]).sum(dim=0, keepdim=True)


def toeplitz(fwd: torch.Tensor, bwd: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Per-channel Toeplitz matrices ``T[..., t, s] = k(t - s)`` (..., L, L) of a (forward, backward) kernel pair.

    Built from a sliding-window view of the lag vector, so its backward (when the matrices are trained) is a sum over
    windows, not the scatter-add of a gathered index."""
    length = seq_len
    lead = fwd.shape[:-1]
    past = F.pad(fwd, (0, length - fwd.shape[-1]))  # lags 0..L-1
    future = fwd.new_zeros(*lead, length - 1) if bwd is None else F.pad(bwd, (0, length - 1 - bwd.shape[-1]))
    lags = torch.cat([future.flip(-1), past], dim=-1)  # index L-1+lag holds k(lag), lag in [-(L-1), L-1]
    # window t holds lags[t : t + L]; column L-1-s of it is lags[L-1 + t - s] = k(t - s)
    return lags.unfold(-1, length, 1).flip(-1)


def antidiagonal_sums(matrices: torch.Tensor, row_block: int | None = None) -> torch.Tensor:
    """``out[..., t + c] = sum Q[..., t, c]``: the sums along the anti-diagonals of (..., L, L) -> (..., 2L-1).

    Computed by skewing the rows (pad, flatten, re-view) so every anti-diagonal becomes a column; no index scatter.
    The rows go ``row_block`` (default ``ANTIDIAGONAL_ROWS``) at a time, so the padded copy is
    ``row_block * (L + row_block)`` per matrix, not ``2 L^2``."""
    row_block = row_block or ANTIDIAGONAL_ROWS
    length = matrices.shape[-1]
    lead = matrices.shape[:-2]
    out = matrices.new_zeros(*lead, 2 * length - 1)
    for start in range(0, matrices.shape[-2], row_block):
        block = matrices[..., start: start + row_block, :]
        rows = block.shape[-2]
        width = length + rows - 1  # the block's anti-diagonals
        padded = F.pad(block, (0, rows))  # row i, then zeros: reading rows of ``width`` shifts row i by i
        skewed = padded.reshape(*lead, rows * (length + rows))[..., : rows * width]
        out[..., start: start + width].add_(skewed.reshape(*lead, rows, width).sum(dim=-2))
    return out


def lag_correlation(dc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[k, d, L-1 + lag] = sum_{b,t} dc[b, k, d, t] x[b, d, t - lag]``: (B, K, D, L) and (B, D, L) -> (K, D, 2L-1).

    One batched matmul against the input reversed in time (``Q[t, c] = sum_b dc[t] x[L-1-c]``, whose anti-diagonal
    ``t + c`` is lag ``t - s`` at index ``L-1 + t - s``), then ``antidiagonal_sums``: the (K, D, L, L) product is the
    only matrix-sized temporary (reversing it instead of the input would make a second). The adjoint of ``toeplitz``'s
    lag layout, summed over the batch."""
    return antidiagonal_sums(torch.matmul(dc.permute(1, 2, 3, 0), x.flip(-1).permute(1, 0, 2)))


def toeplitz_conv(u: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``u`` (B, D, L) times per-channel Toeplitz matrices (K, D, L, L) -> (B, K, D, L), as one batched matmul."""
    out = torch.matmul(matrices, u.permute(1, 2, 0))  # (K, D, L, B)
    return out.permute(3, 0, 1, 2)


def packs_pairs(batch: int) -> bool:
    """Whether the FFT path packs a batch of this size two rows per complex transform (even sizes; odd sizes, batch 1
    included, take real transforms rather than pay for a zero row)."""
    return batch % 2 == 0


class Spectrum(NamedTuple):
    """A prepared input of the FFT path. Even batch: the length-``n`` FFT of pairs of rows packed as one complex row
    (``pack_pairs``: ``u[2j] + i u[2j+1]``), (B/2, D, n). Odd batch: the real FFT of every row, (B, D, n//2+1)."""
    spectrum: torch.Tensor
    batch: int

    @property
    def packed(self) -> bool:
        return packs_pairs(self.batch)


def pack_pairs(x: torch.Tensor) -> torch.Tensor:
    """Real (B, ...) with B even -> complex (B/2, ...): rows ``2j`` and ``2j + 1`` as real and imaginary parts.

    A convolution, its adjoint and a correlation with REAL kernels act on the two parts separately, so one complex
    FFT of size ``n`` does the work of two real ones (torch's real inverse FFT copies its input first on CPU and
    runs at about half the speed of the complex one there)."""
    return torch.complex(x[0::2], x[1::2])


def unpack_pairs(z: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_pairs``: complex (B/2, ...) -> real (B, ...)."""
    return torch.stack((z.real, z.imag), dim=1).flatten(0, 1)


class LongConv:
    """K depthwise linear convolutions of a length-L input and the two adjoints a hand-written backward needs.

    ``fwd`` (K, D, lf) and ``bwd`` (K, D, lb) or None are kernels already truncated to L (``truncate``). ``impl``:
    ``fft`` (the kernels' complex spectrum of FFT size ``n``; an even batch packed two rows per complex row,
    ``pack_pairs``, an odd one through real FFTs), ``toeplitz`` (per-channel Toeplitz matrices) or ``triton``: up to
    ``TRITON_MAX_LEN`` Toeplitz tiles generated on the fly from the lag vectors (``models.triton_toeplitz``), above
    it the fused FFT kernel (``models.triton_fft``; ``self.impl`` then reads ``triton_fft``). Inputs go through
    ``prepare`` once (their spectrum, or themselves), so a backward that needs the input twice transforms it once.
    """

    def __init__(self, fwd: torch.Tensor, bwd: torch.Tensor | None, length: int, impl: str) -> None:
        self.length, self.len_fwd = length, fwd.shape[-1]
        self.has_bwd, self.len_bwd = bwd is not None, 0 if bwd is None else bwd.shape[-1]
        self.impl, self.n = impl, 0
        if impl == "triton" and length > TRITON_MAX_LEN:
            from . import triton_fft
            n = triton_fft.monarch_size(length, self.len_fwd, self.len_bwd)
            # sizes past triton_fft.MAX_SIZE (8192: L above 4096 with full-length kernels) stay on torch.fft
            self.impl = "fft" if n is None else "triton_fft"
        if self.impl == "toeplitz":
            self.operator = toeplitz(fwd, bwd, length)
        elif self.impl == "triton_fft":
            self.n = n
            self.operator = triton_fft.monarch_spectrum(fwd, bwd, n)
            self.dft = triton_fft.dft_factors(n, fwd.device)
        elif self.impl == "triton":
            from . import triton_toeplitz
            self.operator = triton_toeplitz.lag_vectors(fwd, bwd, length)
            self.span = (-self.len_bwd, self.len_fwd - 1)
        else:
            self.n = fft_size(length, self.len_fwd, self.len_bwd)
            self.operator = torch.fft.fft(circular_kernel(fwd, bwd, self.n))  # (K, D, n)

    def prepare(self, u: torch.Tensor) -> torch.Tensor | Spectrum:
        """(B, D, L) -> what ``conv`` and ``kernel_grad`` take: the input's spectrum (FFT) or the input itself."""
        if self.impl == "fft":
            return Spectrum(self._forward_fft(u), u.shape[0])
        return u

    def _forward_fft(self, u: torch.Tensor) -> torch.Tensor:
        """Real (B, ..., <= n) -> its spectrum: packed pairs for an even batch, real FFTs for an odd one."""
        if packs_pairs(u.shape[0]):
            return torch.fft.fft(pack_pairs(u), n=self.n)
        return torch.fft.rfft(u, n=self.n)

    def _inverse_fft(self, spectrum: torch.Tensor, batch: int) -> torch.Tensor:
        """``_forward_fft``'s inverse on the first L points: -> real (B, ..., L)."""
        if packs_pairs(batch):
            return unpack_pairs(torch.fft.ifft(spectrum)[..., : self.length])
        return torch.fft.irfft(spectrum, n=self.n)[..., : self.length]

    def _kernel_spectrum(self, packed: bool) -> torch.Tensor:
        """The kernels' spectrum in the input's layout: all n bins (packed), the first n//2+1 (real FFTs)."""
        return self.operator if packed else self.operator[..., : self.n // 2 + 1]

    def _spectral_product(self, x: Spectrum, scale: torch.Tensor | None, center: torch.Tensor | None
                          ) -> torch.Tensor:
        """The spectrum of ``(k_i * u - center_i) * scale_i`` for every kernel (circular, n points): (B or B/2, K, D,
        bins)."""
        spectrum, shift = self._spectral_factors(x.packed, scale, center)
        product = x.spectrum.unsqueeze(1) * spectrum
        if shift is not None:
            product[..., 0].sub_(shift)
        return product

    def _spectral_factors(self, packed: bool, scale: torch.Tensor | None, center: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernels' spectra times ``scale`` (K, D, bins) and what ``center`` takes off their products' DC bin: a
        constant on every output (both rows of a packed pair) is n times it there. Made once for all kernels, so a
        loop over them takes two operations a kernel."""
        spectrum = self._kernel_spectrum(packed)
        if scale is not None:
            spectrum = spectrum * scale[..., None]
        if center is None:
            return spectrum, None
        shift = self.n * (center if scale is None else center * scale)
        return spectrum, (torch.complex(shift, shift) if packed else shift)

    def _branch_outputs(self, x: Spectrum, scale: torch.Tensor | None, center: torch.Tensor | None):
        """``(k_i * u - center_i) * scale_i`` one branch at a time, as the inverse FFT leaves it: (B/2, D, n) complex
        (packed) or (B, D, n) real, valid on the first L points. Per branch, the (B, D, n) work of a layer stays in
        the CPU's caches where the (B, K, D, n) one did not (MRConvNeXt-atto's first stage, 64 px, batch 16: the
        backward's recomputation 4.7 ms a layer instead of 6.5)."""
        spectra, shifts = self._spectral_factors(x.packed, scale, center)
        for i in range(spectra.shape[0]):
            product = x.spectrum * spectra[i]
            if shifts is not None:
                product[..., 0].sub_(shifts[i])
            yield torch.fft.ifft(product) if x.packed else torch.fft.irfft(product, n=self.n)

    def conv(self, x: torch.Tensor | Spectrum, scale: torch.Tensor | None = None, center: torch.Tensor | None = None
             ) -> torch.Tensor:
        """``k_i * u`` for every kernel: prepared input -> (B, K, D, L); with ``center`` and ``scale`` (K, D),
        ``(k_i * u - center_i) * scale_i`` (the FFT applies both to the spectrum: no pass over the output)."""
        if self.impl == "fft":
            return self._inverse_fft(self._spectral_product(x, scale, center), x.batch)
        if self.impl == "toeplitz":
            out = toeplitz_conv(x, self.operator)
        elif self.impl == "triton":
            from . import triton_toeplitz
            out = triton_toeplitz.toeplitz_conv(x, self.operator, *self.span)
        else:
            from . import triton_fft
            out = triton_fft.fft_conv(x, self.operator, *self.dft)
        if center is not None:
            out = out - center[..., None]
        return out if scale is None else out * scale[..., None]

    def scaled_sum(self, x: Spectrum, center: torch.Tensor, slope) -> tuple[torch.Tensor, torch.Tensor]:
        """FFT only: ``sum_i s_i * (k_i * u - center_i)`` with every ``s_i = slope(i, q_i)`` (D) chosen from ``q_i``,
        that output's centred square sum over batch and the L outputs: -> ((B, D, L), q (K, D)). One inverse transform
        per kernel, each output reduced and added in as it comes (a convolution with the merged kernel would take one
        transform more, and its kernel's)."""
        sums, total = [], None
        for i, out in enumerate(self._branch_outputs(x, None, center)):
            window = torch.view_as_real(out[..., : self.length]) if x.packed else out[..., : self.length]
            flat = window.flatten(-2) if x.packed else window  # packed: |z|^2 = re^2 + im^2 sums both rows
            sums.append(torch.linalg.vecdot(flat, flat).sum(dim=0))
            s = slope(i, sums[-1])
            s = s[:, None, None] if x.packed else s[:, None]
            total = window * s if total is None else total.addcmul_(window, s)
        if x.packed:  # (B/2, D, L, 2) -> rows 2j (real parts) and 2j + 1 (imaginary parts)
            total = total.permute(0, 3, 1, 2).reshape(x.batch, *total.shape[1:3])
        return total, torch.stack(sums)

    def cross_spectrum(self, g: Spectrum, x: Spectrum) -> torch.Tensor:
        """The spectrum (D, bins) of ``sum_b corr(g_b, u_b)``, both prepared: ``sum_b G conj(X)``, in the layout that
        ``_spectral_backward`` inverts (packed: the real part of the inverse is the correlation)."""
        return (g.spectrum * x.spectrum.conj().resolve_conj()).sum(dim=0)

    def kernel_dots(self, cross: torch.Tensor, packed: bool) -> torch.Tensor:
        """``sum_lag k_i[lag] c[lag]`` over every kernel's taps, ``c`` the correlation whose spectrum ``cross`` is
        (``cross_spectrum``): (K, D) by Parseval, ``Re sum_f conj(K_f) C_f / n`` over all n bins, with no inverse
        transform (real FFTs hold half the bins: the others are their conjugates, so those between count twice)."""
        kernels = self._kernel_spectrum(packed)
        if not packed:
            weight = torch.full((cross.shape[-1],), 2.0, dtype=cross.real.dtype, device=cross.device)
            weight[0] = 1.0
            if self.n % 2 == 0:
                weight[-1] = 1.0
            cross = cross * weight
        return torch.linalg.vecdot(kernels, cross).real / self.n

    def weighted_spectrum(self, weights: torch.Tensor, packed: bool) -> torch.Tensor:
        """The spectrum of the merged kernel ``sum_i w_i k_i`` (D, bins) from the kernels' own, ``weights`` (K, D)."""
        return (self._kernel_spectrum(packed) * weights[..., None]).sum(dim=0)

    def centred_square_sums(self, x: torch.Tensor | Spectrum, center: torch.Tensor) -> torch.Tensor:
        """``sum_{b,t} (k_i * u - center_i)^2`` over batch and the L outputs: (K, D), the outputs never kept (the
        Triton kernels reduce them on chip; the FFT path's training form takes them from ``scaled_sum`` instead)."""
        if self.impl == "triton_fft":  # reduced on chip: the outputs never reach memory
            from . import triton_fft
            return triton_fft.fft_square_sums(x, self.operator, center, *self.dft).to(center.dtype)
        if self.impl == "triton":
            from . import triton_toeplitz
            return triton_toeplitz.toeplitz_square_sums(x, self.operator, center, *self.span).to(center.dtype)
        out = self.conv(x, center=center)
        return torch.linalg.vecdot(out, out).sum(dim=0)

    def backward_conv(self, x: torch.Tensor | Spectrum, scale: torch.Tensor, center: torch.Tensor,
                      input_grad: bool = True, grad_spectrum: torch.Tensor | None = None,
                      cross: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``backward(conv(x, scale, center), x)``: the gradients that its own centred, scaled outputs send back,
        without keeping them (the FFT transforms them back in their own buffer: no unpacking, no padded copy).

        FFT only: ``grad_spectrum`` (the input's layout) and ``cross`` (K, D, bins, as ``cross_spectrum`` gives it)
        are further terms of the input gradient's spectrum and of every kernel's correlation, added before their
        inverse transforms, so another backward shares them."""
        if self.impl != "fft":
            if grad_spectrum is not None or cross is not None:
                raise ValueError("LongConv.backward_conv: spectral terms are for impl='fft'")
            return self.backward(self.conv(x, scale, center), x, input_grad)

        def spectra():
            for out in self._branch_outputs(x, scale, center):
                out[..., self.length:] = 0  # the linear convolution's outputs only
                yield torch.fft.fft(out) if x.packed else torch.fft.rfft(out)

        return self._spectral_backward(spectra(), x, input_grad, x.batch, grad_spectrum, cross)

    def adjoint(self, dc: torch.Tensor) -> torch.Tensor:
        """``sum_i k_i^T dc_i``: (B, K, D, L) -> (B, D, L), the gradient of ``conv`` with respect to its input."""
        return self.backward(dc, None)[0]

    def kernel_grad(self, dc: torch.Tensor, x: torch.Tensor | Spectrum) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``g_i[lag] = sum_{b,t} dc_i[b, t] u[b, t - lag]``, the gradient of ``conv`` with respect to the kernels:
        (B, K, D, L) and the prepared input -> forward taps (K, D, lf), backward taps (K, D, lb) or None."""
        _, fwd, bwd = self.backward(dc, x, input_grad=False)
        return fwd, bwd

    def backward(self, dc: torch.Tensor, x: torch.Tensor | Spectrum | None, input_grad: bool = True
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Both gradients of ``conv`` from one transform of ``dc``: (input gradient or None, forward-tap gradient,
        backward-tap gradient); the kernel gradients are None when ``x`` (the prepared input) is None."""
        length = self.length
        grad_u = fwd = bwd = None
        if self.impl == "fft":
            spectra = (self._forward_fft(dc[:, i]) for i in range(dc.shape[1]))
            return self._spectral_backward(spectra, x, input_grad, dc.shape[0])
        if self.impl == "triton_fft":
            from . import triton_fft
            if input_grad:
                grad_u = triton_fft.fft_adjoint(dc, self.operator, *self.dft)
            if x is not None:  # a sum over the batch, not a per-row transform: left to torch.fft
                corr = torch.fft.irfft((torch.fft.rfft(dc, n=self.n) * torch.fft.rfft(x, n=self.n).conj().unsqueeze(1))
                                       .sum(dim=0), n=self.n)
                fwd, bwd = self._lags(corr)
            return grad_u, fwd, (bwd if self.has_bwd else None)
        if input_grad and self.impl == "triton":
            from . import triton_toeplitz
            grad_u = triton_toeplitz.toeplitz_adjoint(dc, self.operator, *self.span)
        elif input_grad:  # sum_i T_i^T dc_i: the transposed matrices as they are (no copy of K * D * L^2)
            grad_u = torch.matmul(self.operator.transpose(-1, -2), dc.permute(1, 2, 3, 0)).sum(dim=0).permute(2, 0, 1)
        if x is not None:
            lags = lag_correlation(dc, x)  # index L-1+lag
            fwd = lags[..., length - 1: length - 1 + self.len_fwd]
            bwd = lags[..., length - 1 - self.len_bwd: length - 1].flip(-1)
        return grad_u, fwd, (bwd if self.has_bwd else None)

    def _spectral_backward(self, dc_spectra, x: Spectrum | None, input_grad: bool, batch: int,
                           grad_f: torch.Tensor | None = None, cross: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``backward`` from the spectra of ``dc``, one kernel at a time (an iterable of ``_forward_fft``'s layout):
        the adjoint's spectrum summed over kernels (onto ``grad_f`` if given), each kernel's batch-summed correlation
        (plus ``cross[i]`` if given); no (B, K, D, n) tensor."""
        grad_u = fwd = bwd = None
        packed = packs_pairs(batch)
        kernels = self._kernel_spectrum(packed)
        conj_x = None if x is None else x.spectrum.conj().resolve_conj()
        products = []
        for i, dc_f in enumerate(dc_spectra):
            if conj_x is not None:
                products.append((dc_f * conj_x).sum(dim=0))
            if input_grad:
                grad_f = dc_f.mul_(kernels[i].conj()) if grad_f is None else grad_f.addcmul_(dc_f, kernels[i].conj())
        if input_grad:
            grad_u = self._inverse_fft(grad_f, batch)
        if conj_x is not None:
            # packed: sum_j DZ_j conj(X_j) = (the wanted correlation) + i (cross terms, real in time): keep the real
            # part of its inverse transform
            product = torch.stack(products) if cross is None else torch.stack(products).add_(cross)
            corr = torch.fft.ifft(product).real if packed else torch.fft.irfft(product, n=self.n)
            fwd, bwd = self._lags(corr)
        return grad_u, fwd, (bwd if self.has_bwd else None)

    def _lags(self, corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward taps of a circular correlation (K, D, n): lag j at index j, lag -(j+1) at n-1-j."""
        return corr[..., : self.len_fwd], corr[..., self.n - self.len_bwd:].flip(-1)


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


def fourier_basis(lengths: Sequence[int], n_modes: int, length: int) -> torch.Tensor:
    """The real matrices of ``fourier_kernel``, one per branch: (N, 2 * n_modes, length) float64 with
    ``modes @ basis[i] == pad(fourier_kernel(modes, lengths[i]), length)`` for modes laid out as (re, im) pairs.

    Row ``2f`` holds ``w_f cos(2 pi f t / l)``, row ``2f + 1`` holds ``-w_f sin(2 pi f t / l)`` on ``t < l`` (``w`` as
    ``irfft`` weighs bins: 1 at DC and Nyquist, 2 between; the sine vanishes at both, as ``irfft`` ignores their
    imaginary parts); modes past ``l // 2`` are dropped, as ``irfft`` drops them. One matmul then synthesises every
    branch, where ``fourier_kernel`` costs one inverse FFT per branch (forward and backward)."""
    basis = torch.zeros(len(lengths), 2 * n_modes, length, dtype=torch.float64)
    for i, size in enumerate(lengths):
        freqs = torch.arange(min(n_modes, size // 2 + 1), dtype=torch.float64)
        weight = torch.where((freqs == 0) | (2 * freqs == size), 1.0, 2.0)[:, None]
        angle = 2 * math.pi * freqs[:, None] * torch.arange(size, dtype=torch.float64)[None] / size
        basis[i, 0: 2 * len(freqs): 2, :size] = weight * torch.cos(angle)
        basis[i, 1: 2 * len(freqs): 2, :size] = -weight * torch.sin(angle)
    return basis


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
