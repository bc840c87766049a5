"""MRConv's training form, ``y = sum_i alpha_i * BN_i(k_i * u)``, without keeping the branch outputs.

With its batch statistics known, ``BN_i`` is a per-channel affine map, so the branch outputs ``c_i = k_i * u`` matter
only through per-branch reductions (MRCONV.md section 6):

* forward: ``mean_i`` and ``var_i`` over batch and the ``L`` output positions; then
  ``y = sum_i a_i * (c_i - mean_i) + sum_i alpha_i * beta_i`` with ``a_i = alpha_i * gamma_i / sqrt(var_i + eps)``;
* backward (``G0 = sum g``, ``G1_i = sum g * c_hat_i`` over batch and positions, ``M = B * L``)::

      d gamma_i = alpha_i * G1_i        d beta_i = alpha_i * G0        d alpha_i = gamma_i * G1_i + beta_i * G0
      d c_i     = a_i * (g - G0 / M - c_hat_i * G1_i / M)
      d u       = sum_i k_i^T d c_i     d k_i[lag] = sum_{b,t} d c_i[b, t] u[b, t - lag]

The branch outputs are produced a slice of channels at a time (the statistics are per channel, so a slice holds all
it needs), reduced and dropped; backward recomputes them from the saved input. Nothing of shape ``(B, N, D, L)``
outlives a slice. The statistics are the reference's (batch and output positions), so the result is the same model.
Two ways to get there: ``BranchConvBatchNorm`` (FFTs, or Toeplitz operators and y as one convolution with the merged
kernel) and, for short inputs, ``ToeplitzBatchNorm`` (every branch's Toeplitz matrix in one batched matmul).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from . import kernels as K

# Work memory of one channel slice (branch outputs, spectra, Toeplitz products): 16 MiB a sample, at least 256 MiB.
# Scaled with the batch, it stays a fixed share of the network's activations, and a layer takes as many slices at
# batch 128 as at 32 (each slice is some 50 kernel launches on a GPU). Measured with CUDA's implementation table
# (the tensors' bytes on the CPU, MRConvNeXt-T at 224 px, batch 32, an SGD step), the step's peak is 1.035x
# ConvNeXt-T's at 4 MiB a sample, 1.08x at 16 and 1.16x at 32 or more (one slice a layer).
CHUNK_BYTES_PER_SAMPLE, CHUNK_BYTES_MIN = 16 * 2**20, 256 * 2**20


def chunk_budget(batch: int) -> int:
    """The work memory a training step's layer may take for a batch of this size (``CHUNK_BYTES_PER_SAMPLE``)."""
    return max(CHUNK_BYTES_MIN, CHUNK_BYTES_PER_SAMPLE * batch)


def channel_slices(dim: int, per_channel_bytes: int, budget: int) -> list[slice]:
    """Consecutive channel slices of at most ``budget`` bytes each (at least one channel per slice)."""
    step = max(1, min(dim, budget // max(per_channel_bytes, 1)))
    return [slice(start, min(start + step, dim)) for start in range(0, dim, step)]


def _slice_bytes(batch: int, branches: int, length: int, impl: str) -> int:
    """Bytes of transient work per channel, as measured (``pipelines.benchmark layer --train`` prints a step's peak;
    ``tests/test_mrconv.py`` holds each path to this). torch's FFTs, which go one branch at a time: a few (B, n)
    spectra (the input's, the gradient's, a branch's product, its inverse and forward transforms, the adjoint's sum)
    and the kernels' spectra and layouts, about 12 (N, n) (the larger share at small batches). The Triton FFT above
    ``TRITON_MAX_LEN`` (its kernel gradient is torch's): two (B, N, n) spectra at a time (three for an odd batch,
    whose real inverse FFT copies its input on the CPU). Otherwise the (L, L) matrices: the branches' and the merged
    kernel's Toeplitz operators (``toeplitz`` only) and the batch-summed products whose anti-diagonals give the
    kernel gradients (``kernels.lag_correlation``) with their padded row blocks, and a few (B, N, L) outputs.
    ``direct`` (``ToeplitzBatchNorm``): the branches' matrices, their layout copies and kernel-gradient products, the
    (B, N, L) outputs and their gradients."""
    if impl == "direct":
        rows = min(K.ANTIDIAGONAL_ROWS, length)
        return 4 * (3 * branches * length * length + 5 * batch * branches * length + branches * rows * (length + rows))
    if impl == "fft":
        n = K.fft_size(length, length, length)
        return 4 * (batch * (7 * n + 2 * length) + (12 * branches + 4) * n)
    if impl == "triton" and length > K.TRITON_MAX_LEN:
        from . import triton_fft
        n = triton_fft.monarch_size(length, length, length) or K.fft_size(length, length, length)
        spectra = 2 if K.packs_pairs(batch) else 3
        return 4 * (batch * (branches * (spectra * n + length) + 4 * n) + (2 * branches + 2) * n)
    rows = min(K.ANTIDIAGONAL_ROWS, length)
    matrices = (2 * branches + 2 if impl == "toeplitz" else branches + 2) * length * length
    return 4 * (matrices + 6 * batch * branches * length + branches * rows * (length + rows))


def _merged(fwd: torch.Tensor, bwd: torch.Tensor | None, weights: torch.Tensor, length: int, impl: str
            ) -> K.LongConv:
    """The single convolution ``sum_i w_i k_i`` (the branches' lengths, so it takes their operator's prepared input)."""
    return K.LongConv(K.weighted_sum(fwd, weights), None if bwd is None else K.weighted_sum(bwd, weights), length, impl)


def _affine_grads(alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, sum_g: torch.Tensor,
                  sum_g_chat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``d alpha``, ``d gamma``, ``d beta`` (N, D) from ``G0`` (D) and ``G1`` (N, D) (the module docstring)."""
    return gamma * sum_g_chat + beta * sum_g, alpha * sum_g_chat, alpha * sum_g.expand_as(alpha)


class BranchConvBatchNorm(torch.autograd.Function):
    """``(u, kernels, alpha, gamma, beta)`` -> ``(y, mean, var)``: the training form with batch statistics.

    ``u`` (B, D, L) in any float dtype (saved as given, computed in the kernels' dtype); ``kernels`` (dirs, N, D, l)
    dense, fp32 or fp64; ``alpha``, ``gamma``, ``beta`` (N, D) in the same dtype. ``mean`` and the biased ``var``
    (N, D) are returned for the running statistics and carry no gradient.

    Per channel slice, forward: the means from prefix sums (``kernels.window_means``), the centred branch outputs
    (one transform of N) for their variance, then ``y = sum_i a_i (c_i - mean_i)`` plus a bias: on the FFT path
    summed from those outputs as each comes (``LongConv.scaled_sum``), otherwise as ONE convolution with the merged
    kernel ``sum_i a_i k_i``. Backward: the merged kernel's adjoint and correlation with ``g - G0 / M`` give ``d u``'s
    BatchNorm-free part, every ``d k_i``'s first term and ``G1_i = invstd_i * (k_i . corr)``; the centred branch
    outputs, recomputed and scaled by ``-a_i G1_i invstd_i / M``, give the rest. On the FFT path the first part stays
    spectra (``G1`` by Parseval, ``LongConv.kernel_dots``) added to the branches' before their inverse transforms, so
    a step takes 3N + 4 transforms of the batch where the merged kernel's own took two more. A single branch
    (``L <= l0``) needs no merged kernel: its centred output is ``y`` up to an affine map, computed once each way.
    """

    @staticmethod
    def forward(ctx, u, kernels, alpha, gamma, beta, eps: float, impl: str, chunk_bytes: int):
        x = u.to(kernels.dtype)
        batch, dim, length = x.shape
        branches, count = kernels.shape[1], batch * length
        fwd, bwd = K.truncate(kernels, length)
        y = x.new_empty(batch, dim, length)
        mean = K.window_means(x, fwd, bwd)
        var = x.new_empty(branches, dim)
        shift = (alpha * beta).sum(dim=0)
        for sl in channel_slices(dim, _slice_bytes(batch, branches, length, impl), chunk_bytes):
            f, b = fwd[:, sl], None if bwd is None else bwd[:, sl]
            op = K.LongConv(f, b, length, impl)
            prepared = op.prepare(x[:, sl])
            if branches == 1:  # the centred output is y but for an affine map: keep it, convolve once
                centred = op.conv(prepared, center=mean[:, sl])[:, 0]
                var[:, sl] = torch.linalg.vecdot(centred, centred).sum(dim=0)[None] / count
                scale = alpha[0, sl] * gamma[0, sl] * torch.rsqrt(var[0, sl] + eps)
                torch.addcmul(shift[sl, None], centred, scale[:, None], out=y[:, sl])
            elif op.impl == "fft":  # y summed from the centred outputs as they come, no merged kernel
                gain = alpha[:, sl] * gamma[:, sl]

                def slope(i, square_sums, gain=gain):
                    return torch.rsqrt(square_sums / count + eps).mul_(gain[i])

                out, square_sums = op.scaled_sum(prepared, mean[:, sl], slope)
                var[:, sl] = square_sums / count
                y[:, sl] = out + shift[sl, None]
            else:
                var[:, sl] = op.centred_square_sums(prepared, mean[:, sl]) / count
                scale = alpha[:, sl] * gamma[:, sl] * torch.rsqrt(var[:, sl] + eps)
                bias = shift[sl] - (scale * mean[:, sl]).sum(dim=0)
                y[:, sl] = _merged(f, b, scale, length, impl).conv(prepared)[:, 0] + bias[:, None]
        ctx.save_for_backward(u, kernels, alpha, gamma, beta, mean, var)
        ctx.eps, ctx.impl, ctx.chunk_bytes = eps, impl, chunk_bytes
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        u, kernels, alpha, gamma, beta, mean, var = ctx.saved_tensors
        x, g = u.to(kernels.dtype), grad_y.to(kernels.dtype).contiguous()
        batch, dim, length = x.shape
        branches = kernels.shape[1]
        count = batch * length
        input_grad = ctx.needs_input_grad[0]
        fwd, bwd = K.truncate(kernels, length)
        invstd = torch.rsqrt(var + ctx.eps)
        a = alpha * gamma * invstd  # BN_i's slope, the merged kernel's weights
        grad_u = torch.empty_like(x) if input_grad else None
        grad_k = torch.zeros_like(kernels)
        sum_g = g.sum(dim=(0, 2))  # G0 per channel, shared by every branch
        sum_g_chat = torch.empty_like(mean)  # G1
        for sl in channel_slices(dim, _slice_bytes(batch, branches, length, ctx.impl), ctx.chunk_bytes):
            f, b = fwd[:, sl], None if bwd is None else bwd[:, sl]
            op = K.LongConv(f, b, length, ctx.impl)
            prepared = op.prepare(x[:, sl])
            # d c_i = a_i * (g - G0 / M) - (a_i * G1_i / M) * c_hat_i
            centred_g = (g[:, sl] - (sum_g[sl] / count)[None, :, None]).unsqueeze(1)
            if branches == 1:  # one convolution's worth: c_hat, G1 from it, then d c in one piece
                chat = op.conv(prepared, invstd[:, sl], mean[:, sl])
                g1 = torch.linalg.vecdot(chat, centred_g).sum(dim=0)
                dc = centred_g.mul_(a[:, sl, None]).sub_(chat.mul_((a[:, sl] * g1 / count)[..., None]))
                du, kf, kb = op.backward(dc, prepared, input_grad)
            elif op.impl == "fft":  # the first term's spectra folded into the branches' backward
                centred_g = op.prepare(centred_g[:, 0])
                cross = op.cross_spectrum(centred_g, prepared)  # of sum_b corr(g - G0/M, u)
                g1 = invstd[:, sl] * op.kernel_dots(cross, prepared.packed)
                weight = -a[:, sl] * g1 / count
                first = None
                if input_grad:
                    first = centred_g.spectrum.mul_(op.weighted_spectrum(a[:, sl], prepared.packed).conj())
                du, kf, kb = op.backward_conv(prepared, weight * invstd[:, sl], mean[:, sl], input_grad, first,
                                              a[:, sl, None] * cross)
            else:
                # the first term through the merged kernel
                du, corr_f, corr_b = _merged(f, b, a[:, sl], length, ctx.impl).backward(centred_g, prepared, input_grad)
                # sum_{b,t} (g - G0/M) c_i = sum_lag k_i[lag] corr[lag] = sum g c_i - G0 mean_i
                g1 = invstd[:, sl] * ((f * corr_f).sum(dim=-1) + (0 if b is None else (b * corr_b).sum(dim=-1)))
                weight = -a[:, sl] * g1 / count  # on c_hat_i = (c_i - mean_i) * invstd_i
                du_hat, kf, kb = op.backward_conv(prepared, weight * invstd[:, sl], mean[:, sl], input_grad)
                du = None if du is None else du + du_hat
                kf = kf + a[:, sl, None] * corr_f
                kb = None if kb is None else kb + a[:, sl, None] * corr_b
            sum_g_chat[:, sl] = g1
            if grad_u is not None:
                grad_u[:, sl] = du
            grad_k[0, :, sl, : kf.shape[-1]] = kf
            if kb is not None:
                grad_k[1, :, sl, : kb.shape[-1]] = kb
        grad_u = None if grad_u is None else grad_u.to(u.dtype)
        return grad_u, grad_k, *_affine_grads(alpha, gamma, beta, sum_g, sum_g_chat), None, None, None


class ToeplitzBatchNorm(torch.autograd.Function):
    """``(u, kernels, alpha, gamma, beta)`` -> ``(y, mean, var)`` for short inputs, every branch by its Toeplitz
    matrix: the branch outputs of a channel slice in one matmul, their statistics in two reductions, ``y`` as their
    weighted sum, and in backward every gradient in three more matmuls (the outputs recomputed from the saved input).

    Where a layer is short (MRConvNeXt's late stages at small image sizes), what it costs is the count of its
    operations, not their arithmetic: this path takes some 30, where the merged-kernel path (``BranchConvBatchNorm``)
    takes some 200. Its (N, D_slice, B, L) outputs live only inside a slice. Arguments and outputs as
    ``BranchConvBatchNorm``'s."""

    @staticmethod
    def _outputs(x: torch.Tensor, kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrices (N, D, L, L) and every ``k_i * u`` laid out (N, D, B, L), from ``x`` (B, D, L)."""
        matrices = K.toeplitz(*K.truncate(kernels, x.shape[-1]), x.shape[-1])
        return matrices, torch.matmul(x.transpose(0, 1), matrices.transpose(-1, -2))

    @staticmethod
    def forward(ctx, u, kernels, alpha, gamma, beta, eps: float, chunk_bytes: int):
        x = u.to(kernels.dtype)
        batch, dim, length = x.shape
        branches, count = kernels.shape[1], batch * length
        y = x.new_empty(batch, dim, length)
        mean, var = x.new_empty(branches, dim), x.new_empty(branches, dim)
        shift = (alpha * beta).sum(dim=0)
        for sl in channel_slices(dim, _slice_bytes(batch, branches, length, "direct"), chunk_bytes):
            _, c = ToeplitzBatchNorm._outputs(x[:, sl], kernels[:, :, sl])
            mean[:, sl] = c.sum(dim=(2, 3)) / count
            centred = c.sub_(mean[:, sl, None, None]).flatten(2)  # torch.var_mean over two dims is ~50x slower
            var[:, sl] = torch.linalg.vecdot(centred, centred) / count
            scale = alpha[:, sl] * gamma[:, sl] * torch.rsqrt(var[:, sl] + eps)
            if branches == 1:
                out = torch.addcmul(shift[sl, None, None], c[0], scale[0, :, None, None])
            else:
                out = torch.einsum("nd,ndbl->dbl", scale, c).add_(shift[sl, None, None])
            y[:, sl] = out.transpose(0, 1)
        ctx.save_for_backward(u, kernels, alpha, gamma, beta, mean, var)
        ctx.eps, ctx.chunk_bytes = eps, chunk_bytes
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        u, kernels, alpha, gamma, beta, mean, var = ctx.saved_tensors
        x, g = u.to(kernels.dtype), grad_y.to(kernels.dtype).contiguous()
        batch, dim, length = x.shape
        branches, count = kernels.shape[1], batch * length
        invstd = torch.rsqrt(var + ctx.eps)
        a = alpha * gamma * invstd
        grad_u = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(kernels)
        sum_g = g.sum(dim=(0, 2))  # G0
        sum_g_chat = torch.empty_like(mean)  # G1
        fwd, bwd = K.truncate(kernels, length)
        for sl in channel_slices(dim, _slice_bytes(batch, branches, length, "direct"), ctx.chunk_bytes):
            matrices, c = ToeplitzBatchNorm._outputs(x[:, sl], kernels[:, :, sl])
            chat = c.sub_(mean[:, sl, None, None]).mul_(invstd[:, sl, None, None])  # (N, d, B, L)
            gs = g[:, sl].transpose(0, 1)  # (d, B, L)
            g1 = torch.linalg.vecdot(chat.flatten(2), gs.flatten(1))
            sum_g_chat[:, sl] = g1
            # d c_i = a_i * (g - G0 / M - c_hat_i * G1_i / M)
            centred_g = gs - (sum_g[sl] / count)[:, None, None]
            dc = torch.addcmul(centred_g * a[:, sl, None, None], chat, (-a[:, sl] * g1 / count)[..., None, None])
            if grad_u is not None:  # sum_i T_i^T d c_i
                du = torch.matmul(dc, matrices)
                grad_u[:, sl] = (du[0] if branches == 1 else du.sum(dim=0)).transpose(0, 1)
            lags = K.lag_correlation(dc.permute(2, 0, 1, 3), x[:, sl])  # (N, d, 2L-1), index L-1+lag
            grad_k[0, :, sl, : fwd.shape[-1]] = lags[..., length - 1: length - 1 + fwd.shape[-1]]
            if bwd is not None:
                grad_k[1, :, sl, : bwd.shape[-1]] = lags[..., length - 1 - bwd.shape[-1]: length - 1].flip(-1)
        grad_u = None if grad_u is None else grad_u.to(u.dtype)
        return grad_u, grad_k, *_affine_grads(alpha, gamma, beta, sum_g, sum_g_chat), None, None


class BranchBatchNorm(nn.BatchNorm1d):
    """The per-branch BatchNorms ``BN_i`` of an MRConv as one ``BatchNorm1d(N * D)`` (parameters, buffers and
    ``state_dict`` keys of a plain BatchNorm), applied together with the branch convolutions and the ``alpha``
    weighted sum, since only that combination avoids the branch tensor.

    ``forward(u, kernels, alpha, impl)`` (``impl`` as ``kernels.LongConv`` takes it): in training, batch statistics
    over batch and output positions (running statistics updated as ``nn.BatchNorm1d`` does), the work done in channel
    slices of at most ``chunk_bytes`` (default ``chunk_budget`` of the batch); in eval, the running statistics, i.e.
    the folded single kernel (``fold_branches``) applied once.
    """

    def __init__(self, num_branches: int, dim: int, chunk_bytes: int | None = None, **kwargs) -> None:
        super().__init__(num_branches * dim, **kwargs)
        self.num_branches, self.dim, self.chunk_bytes = num_branches, dim, chunk_bytes

    def branch_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.num_branches, self.dim)

    def fold(self, kernels: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The single kernel (dirs, D, l) and bias (D) of the eval-mode layer."""
        v = self.branch_view
        return K.fold_branches(kernels, alpha, v(self.weight), v(self.bias), v(self.running_mean),
                               v(self.running_var), self.eps)

    def forward(self, u: torch.Tensor, kernels: torch.Tensor, alpha: torch.Tensor,  # type: ignore[override]
                impl: str) -> torch.Tensor:
        batch, _, length = u.shape
        dtype = torch.promote_types(kernels.dtype, torch.float32)  # fp32 under autocast, fp64 when asked
        if not self.training:
            kernel, bias = self.fold(kernels, alpha)
            op = K.LongConv(*K.truncate(kernel.unsqueeze(1), length), length, impl)
            return op.conv(op.prepare(u.to(dtype)))[:, 0] + bias[:, None]
        if batch * length < 2:
            raise ValueError(f"MRConv: BatchNorm needs more than one value per channel in training, got input of "
                             f"shape {tuple(u.shape)}")
        v = self.branch_view
        # (B, D, L) in memory: a channels-last feature map's flattened view steps over channels (stride 1) and would
        # make every transform and matmul gather its rows (measured: 2.8x slower at L = 16, batch 16, on the CPU)
        u = u.contiguous()
        args = (u, kernels.to(dtype), alpha.to(dtype), v(self.weight).to(dtype), v(self.bias).to(dtype), self.eps)
        budget = self.chunk_bytes or chunk_budget(batch)
        if impl == "direct":
            y, mean, var = ToeplitzBatchNorm.apply(*args, budget)
        else:
            y, mean, var = BranchConvBatchNorm.apply(*args, impl, budget)
        self._update_running_stats(mean, var, batch * length)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.flatten(), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.flatten(), alpha=factor * count / (count - 1))
