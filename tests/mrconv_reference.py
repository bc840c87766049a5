"""The MRConv training form as it was first written, kept as the reference the fast path is tested against.

It materialises every branch output ``(B, N, D, L)`` and lets autograd differentiate through the convolutions
(direct dilated convolutions, a gathered Toeplitz matrix or FFTs), ``F.batch_norm`` in training mode over
``(branch, channel)`` and the ``alpha``-weighted sum: the definition of section 1 of MRCONV.md, op by op.
"""
from __future__ import annotations

import copy

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


# ------------------------------------------------ helpers of the test modules that check layers against the above
def naive_conv(u: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor | None) -> torch.Tensor:
    """y[b, d, t] = sum_j fwd[d, j] u[t - j] + sum_j bwd[d, j] u[t + j + 1], zero outside [0, L)."""
    b, d, length = u.shape
    y = torch.zeros_like(u)
    for t in range(length):
        for j in range(fwd.shape[-1]):
            if 0 <= t - j < length:
                y[:, :, t] += fwd[:, j] * u[:, :, t - j]
        if bwd is not None:
            for j in range(bwd.shape[-1]):
                if t + j + 1 < length:
                    y[:, :, t] += bwd[:, j] * u[:, :, t + j + 1]
    return y



def moved_layer(kernel_type: str, bidirectional: bool, impl: str, dtype=torch.float64, dim=4, seed=0,
                seq_len=40, l0=5) -> MRConv:
    """A layer in train mode whose BatchNorm affine, running statistics and ``alpha`` are far from their init."""
    torch.manual_seed(seed)
    layer = MRConv(dim, seq_len, l0, kernel_type=kernel_type, bidirectional=bidirectional, conv_impl=impl, seed=seed)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2.0)
        layer.norm.num_batches_tracked.fill_(7)
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
        layer.alpha.normal_()
    return layer


def compare_with_reference(layer: MRConv, u: torch.Tensor, impl: str, rtol: float) -> None:
    """Output, input gradient, every parameter gradient and the running statistics of one training step."""
    layer.zero_grad(set_to_none=True)
    ref = copy.deepcopy(layer)
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    y, y_ref = layer(u1), reference_forward(ref, u2, impl)
    grad = torch.randn_like(y_ref)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()

    def close(a, b, what):
        assert (a - b).abs().max() <= rtol * b.abs().max(), what

    close(y, y_ref, "output")
    close(u1.grad, u2.grad, "input gradient")
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        close(p.grad, p_ref.grad, name)
    for name in ("running_mean", "running_var"):
        close(getattr(layer.norm, name), getattr(ref.norm, name), name)
    assert layer.norm.num_batches_tracked == ref.norm.num_batches_tracked


def compiled_forms_match_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The training form (custom autograd Function), its eval form and the fused form, each traced whole."""
    fused = copy.deepcopy(model).eval()
    fused.apply(lambda m: m.reparameterize() if hasattr(m, "reparameterize") else None)
    for m in (model, copy.deepcopy(model).eval(), fused):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        if m.training:
            y.sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(y.detach(), m(x), rtol=1e-4, atol=1e-4)
