"""The MRConv training form as it was first written, kept as the reference the fast path is tested against.

It materialises every branch output ``(B, N, D, L)`` and lets autograd differentiate through the convolutions
(direct dilated convolutions, a gathered Toeplitz matrix or FFTs), ``F.batch_norm`` in training mode over
``(branch, channel)`` and the ``alpha``-weighted sum: the definition of section 1 of MRCONV.md, op by op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import MRConv
from models import kernels as K


def gathered_toeplitz(fwd: torch.Tensor, bwd: torch.Tensor | None, length: int) -> torch.Tensor:
    """``T[..., t, s] = k(t - s)`` by indexing the lag vector (backward: a scatter-add)."""
    past = F.pad(fwd, (0, length - fwd.shape[-1]))
    future = fwd.new_zeros(*fwd.shape[:-1], length - 1) if bwd is None else F.pad(bwd, (0, length - 1 - bwd.shape[-1]))
    lags = torch.cat([future.flip(-1), past], dim=-1)
    idx = torch.arange(length, device=fwd.device)
    return lags[..., idx[:, None] - idx[None, :] + length - 1]


def dilated_conv(u: torch.Tensor, taps: torch.Tensor, dilation: int) -> torch.Tensor:
    """Direct depthwise dilated convolution: ``taps`` (dirs, D, l0), forward taps at lags ``j * d``, backward taps
    at lags ``-(j + 1) * d``; (B, D, L) -> (B, D, L)."""
    l0 = taps.shape[-1]
    weight = taps[0].flip(-1)  # conv1d cross-correlates: weight m reads lag (l0 - 1 - m) * d
    pad = (l0 - 1) * dilation, 0
    if taps.shape[0] == 2:
        weight = torch.cat([weight, taps[1]], dim=-1)
        pad = (l0 - 1) * dilation, l0 * dilation
    return F.conv1d(F.pad(u, pad), weight.unsqueeze(1), dilation=dilation, groups=u.shape[1])


def branch_outputs(layer: MRConv, u: torch.Tensor, impl: str) -> torch.Tensor:
    """``k_i * u`` for every branch, (B, N, D, L), with ``impl`` ``fft`` or ``toeplitz`` (dilated: direct)."""
    if layer.kernel_type == "dilated":
        return torch.stack([dilated_conv(u, layer.dilated_taps[:, i], 2**i) for i in range(layer.num_branches)], 1)
    length = u.shape[-1]
    fwd, bwd = K.truncate(layer.branch_kernels(), length)
    if impl == "toeplitz":
        return K.toeplitz_conv(u, gathered_toeplitz(fwd, bwd, length))
    n = K.fft_size(length, fwd.shape[-1], 0 if bwd is None else bwd.shape[-1])
    spectrum = K.kernel_spectrum(fwd, bwd, n)
    return torch.fft.irfft(torch.fft.rfft(u, n=n).unsqueeze(1) * spectrum, n=n)[..., :length]


def reference_forward(layer: MRConv, u: torch.Tensor, impl: str = "fft") -> torch.Tensor:
    """``sum_i alpha_i * BN_i(k_i * u)`` with ``layer``'s parameters and BatchNorm (running statistics updated in
    training mode, exactly as ``nn.BatchNorm1d`` does)."""
    b, d, length = u.shape
    bn = layer.norm
    c = branch_outputs(layer, u, impl).reshape(b, layer.num_branches * d, length)
    c = torch.nn.BatchNorm1d.forward(bn, c).view(b, layer.num_branches, d, length)
    return torch.einsum("bndl,nd->bdl", c, layer.alpha)
