"""MRConv: reparameterized multi-resolution long convolution (Cunningham et al., NeurIPS 2024).

Training form: ``y = sum_i alpha_i * BN_i(k_i * u)`` over ``N`` branches whose kernels grow as ``l0 * 2**i``,
computed by ``branch_norm`` with exact batch statistics but without keeping the branch outputs for backward; in eval
mode it applies its folded kernel. Inference form (``reparameterize()`` or ``inference_mode=True``): one depthwise
long kernel per channel and direction plus a bias, applied with a cached kernel spectrum (FFT) or a cached Toeplitz
matrix for short inputs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from . import kernels as K
from .branch_norm import BranchBatchNorm

# Inputs up to this length use a per-channel Toeplitz matmul instead of FFTs, by device type. Measured side by
# side (fused layer, batch 16, README "Measured figures"): on CPU the matmul wins up to L = 100 and loses from 144;
# on an H200 it still wins at 196 (0.10 vs 0.25 ms) and loses at 784.
TOEPLITZ_MAX_LEN = {"cpu": 128, "cuda": 256}
# The same choice for the training form (forward + backward in train mode). On CPU the FFT won or tied at every
# ConvNeXt stage shape at batch 16 (fft vs toeplitz, side by side: L=256 0.23x, 196 0.23x, 144 0.27x, 100 0.62x,
# 49 0.87x, 16 0.75x, 4 0.99x of the Toeplitz time; only L=64 went the other way, 1.15x), so CPU trains with FFTs.
# CUDA keeps the inference threshold until a GPU measurement says otherwise.
TOEPLITZ_MAX_LEN_TRAIN = {"cpu": 0, "cuda": 256}
# Short inputs train by the branches' Toeplitz matrices directly (``branch_norm.ToeplitzBatchNorm``: a few batched
# matmuls, where the merged-kernel path takes some 200 small operations), up to this length by device type and by
# whether the layer has one branch or several. CPU, one layer forward + backward, 1 thread, time against the FFT
# path side by side (batch 16 / 64): one branch, L = 4 0.90 / 0.86, 9 0.79 / 0.78, 16 0.69 / 0.56, 25 0.58 / 0.56,
# 36 0.69 / 0.55, 49 0.92 / 0.65, 64 0.92 / 0.80, 100 1.49 / 0.85; several (l0 = 28), L = 36 0.70 / 0.64, 49 1.19 /
# 0.88, 64 1.45 / 1.33, 100 2.30 / 1.32. CUDA: single-branch layers as its Toeplitz threshold (no GPU figure yet).
DIRECT_MAX_LEN_TRAIN = {"cpu": (64, 36), "cuda": (256, 0)}  # (one branch, several)
CONV_IMPLS = ("auto", "fft", "toeplitz", "triton")
# The layer's kernel parameters and branch weights (no weight decay; the optional kernel learning rate). The
# per-branch BatchNorm is not among them: it is an ordinary norm layer.
KERNEL_PARAM_NAMES = ("fourier_modes", "sparse_values", "beta", "dense_kernels", "dilated_taps", "alpha")


class MRConv(nn.Module):
    """Multi-resolution depthwise long convolution over ``(B, dim, L)``.

    Args:
        dim: channels ``D``; every convolution is depthwise.
        seq_len: the sequence length the kernels are laid out for (the longest branch is clipped to it).
            Other lengths work at run time: taps that cannot reach the input are dropped.
        l0: length of the shortest kernel; branch ``i`` has length ``l0 * 2**i``.
        kernel_type: ``dilated``, ``fourier``, ``sparse``, ``fourier_sparse`` (default) or ``dense``.
        bidirectional: forward and backward kernels (images); ``False`` is causal.
        max_resolutions: cap on the number of branches ``N``.
        n_modes: complex Fourier modes per branch and channel (``fourier``, ``fourier_sparse``).
        n_sparse: non-zero taps per branch and channel (``sparse``, ``fourier_sparse``).
        seed: seed of the sparse tap positions (a buffer saved with the model, never resampled).
        conv_impl: ``auto`` (Toeplitz matmul up to ``TOEPLITZ_MAX_LEN`` of the device type, FFT above; in training
            ``TOEPLITZ_MAX_LEN_TRAIN``, and up to ``DIRECT_MAX_LEN_TRAIN`` the branches' matrices directly), ``fft``,
            ``toeplitz`` or ``triton`` (Triton Toeplitz tiles up to ``kernels.TRITON_MAX_LEN``, the fused Triton FFT
            above; on CUDA, or the CPU under ``TRITON_INTERPRET=1``; elsewhere, as on a CPU copy of the model that
            fvcore counts, what ``auto`` picks).
        inference_mode: build the fused single-kernel form directly (to load a fused ``state_dict``).
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        l0: int,
        kernel_type: str = "fourier_sparse",
        bidirectional: bool = True,
        max_resolutions: int | None = None,
        n_modes: int = 8,
        n_sparse: int = 8,
        seed: int = 0,
        conv_impl: str = "auto",
        inference_mode: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_type not in K.KERNEL_TYPES:
            raise ValueError(f"MRConv: unknown kernel_type {kernel_type!r}; expected one of "
                             f"{', '.join(K.KERNEL_TYPES)}")
        for name, value in (("dim", dim), ("seq_len", seq_len), ("l0", l0), ("n_modes", n_modes),
                            ("n_sparse", n_sparse)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MRConv: {name} must be an integer >= 1, got {value!r}")
        if max_resolutions is not None and max_resolutions < 1:
            raise ValueError(f"MRConv: max_resolutions must be >= 1 or None, got {max_resolutions!r}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"MRConv: conv_impl must be one of {', '.join(CONV_IMPLS)}, got {conv_impl!r}")
        if conv_impl == "triton":
            # imported here, not first inside a forward that torch.compile may be tracing
            from . import triton_fft, triton_toeplitz  # noqa: F401
        self.dim, self.seq_len, self.l0 = dim, seq_len, l0
        self.kernel_type, self.bidirectional, self.conv_impl = kernel_type, bidirectional, conv_impl
        self.dirs = 2 if bidirectional else 1
        if kernel_type == "dilated":  # l0 taps at dilation 2**i span l0 * 2**i lags, whatever the input length
            self.lengths = [l0 * 2**i for i in range(K.num_resolutions(seq_len, l0, max_resolutions))]
        else:
            self.lengths = K.resolution_lengths(seq_len, l0, max_resolutions)
        self.num_branches = len(self.lengths)
        self.kernel_len = max(self.lengths)
        self.n_modes = min(n_modes, self.lengths[0] // 2 + 1)
        self.n_sparse = min(n_sparse, self.lengths[0])
        self.seed = seed
        self.inference_mode = inference_mode
        self._cache: tuple[tuple, K.LongConv] | None = None
        dd = dict(device=device, dtype=dtype)
        if inference_mode:
            self._init_fused(dd)
        else:
            self._init_branches(dd)

    # ----------------------------------------------------------------------------------------------- construction
    def _init_branches(self, dd: dict) -> None:
        dirs, n, d = self.dirs, self.num_branches, self.dim
        kt = self.kernel_type
        if kt in ("fourier", "fourier_sparse"):
            m = self.n_modes
            # (real, imag) pairs interleaved on the last dim; kept 4-D so `model.to(memory_format=channels_last)`
            # (timm's --channels-last) accepts the model
            self.fourier_modes = nn.Parameter(torch.randn(dirs, n, d, 2 * m, **dd) / math.sqrt(2 * m))
            # derived from the layout, so not saved: every branch's kernel is one matmul with it
            basis = K.fourier_basis(self.lengths, m, self.kernel_len)
            self.register_buffer("fourier_basis", basis.to(device=dd["device"], dtype=dd["dtype"] or
                                                           torch.get_default_dtype()), persistent=False)
        if kt in ("sparse", "fourier_sparse"):
            k = self.n_sparse
            gen = torch.Generator().manual_seed(self.seed)
            index = [[torch.randperm(length, generator=gen)[:k].sort().values for length in self.lengths]
                     for _ in range(dirs)]
            self.register_buffer("sparse_index", torch.stack([torch.stack(row) for row in index]).to(dd["device"]))
            self.sparse_values = nn.Parameter(torch.randn(dirs, n, d, k, **dd) / math.sqrt(k))
        if kt == "fourier_sparse":
            self.beta = nn.Parameter(torch.ones(dirs, n, 2, **dd))
        if kt == "dense":
            self.dense_kernels = nn.ParameterList(
                [nn.Parameter(torch.randn(dirs, d, length, **dd) / math.sqrt(length)) for length in self.lengths])
        if kt == "dilated":
            self.dilated_taps = nn.Parameter(torch.randn(dirs, n, d, self.l0, **dd) / math.sqrt(self.l0))
        self.norm = BranchBatchNorm(n, d, **dd)  # BN_i of every branch as one BN over (branch, channel)
        self.alpha = nn.Parameter(torch.full((n, d), 1.0 / math.sqrt(n), **dd))

    def _init_fused(self, dd: dict) -> None:
        self.weight = nn.Parameter(torch.zeros(self.dirs, self.dim, self.kernel_len, **dd))
        self.bias = nn.Parameter(torch.zeros(self.dim, **dd))

    # ------------------------------------------------------------------------------------------------- kernels
    def branch_kernels(self) -> torch.Tensor:
        """Dense kernels of every branch, zero padded to the longest: (dirs, N, D, kernel_len)."""
        if self.inference_mode:
            raise RuntimeError("MRConv: the fused form has no branches left (it was built or folded with "
                               "inference_mode=True)")
        kt, length = self.kernel_type, self.kernel_len
        if kt == "dilated":
            return torch.stack([K.dilated_dense(self.dilated_taps[:, i], 2**i, length)
                                for i in range(self.num_branches)], dim=1)
        if kt == "dense":
            return K.pad_to(list(self.dense_kernels), length)
        if kt == "sparse":
            return K.sparse_kernel(self.sparse_values, self.sparse_index, length)
        modes, values = self.fourier_modes, None
        if kt == "fourier_sparse":  # beta scales the few modes and taps, not the dense kernels
            modes = modes * self.beta[:, :, 0, None, None]
            values = self.sparse_values * self.beta[:, :, 1, None, None]
        kernels = torch.matmul(modes, self.fourier_basis)  # (dirs, N, D, 2m) @ (N, 2m, l)
        if values is None:
            return kernels
        return kernels.scatter_add(-1, self.sparse_index.unsqueeze(-2).expand_as(values), values)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single kernel (dirs, D, kernel_len) and bias (D) this layer computes in eval mode.

        Also the learnable kernel decay diagnostic: at lag ``t`` only branches longer than ``|t|`` contribute, so
        ``alpha`` and the BN scales shape the envelope (see ``kernel_envelope``).
        """
        if self.inference_mode:
            return self.weight, self.bias
        return self.norm.fold(self.branch_kernels(), self.alpha)

    @torch.no_grad()
    def kernel_envelope(self) -> torch.Tensor:
        """Mean absolute value over channels of the fused kernel at every lag: (dirs, kernel_len)."""
        return self.fused_kernel()[0].abs().mean(dim=1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the branches into one kernel and bias in place (timm's convention; idempotent)."""
        if self.inference_mode:
            return
        weight, bias = self.fused_kernel()
        for name in (*KERNEL_PARAM_NAMES, "norm"):
            if hasattr(self, name):
                delattr(self, name)
        for name in ("sparse_index", "fourier_basis"):
            self._buffers.pop(name, None)
        self.inference_mode = True
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self._cache = None

    # ------------------------------------------------------------------------------------------------- forward
    def _impl(self, length: int, device: torch.device, training: bool = False) -> str:
        """How to convolve a length-``length`` input: ``fft``, ``toeplitz`` or ``triton`` (``kernels.LongConv``), or in
        training ``direct`` (``branch_norm.ToeplitzBatchNorm``)."""
        if training and self.conv_impl == "toeplitz" and self.num_branches == 1:
            return "direct"  # one branch's Toeplitz matrix needs no merged kernel
        if self.conv_impl in ("fft", "toeplitz") or (self.conv_impl == "triton" and K.triton_runs_on(device)):
            return self.conv_impl  # LongConv picks the Triton kernel by length
        if training:
            direct = DIRECT_MAX_LEN_TRAIN.get(device.type, DIRECT_MAX_LEN_TRAIN["cpu"])
            if length <= direct[0 if self.num_branches == 1 else 1]:
                return "direct"
        table = TOEPLITZ_MAX_LEN_TRAIN if training else TOEPLITZ_MAX_LEN
        return "toeplitz" if length <= table.get(device.type, table["cpu"]) else "fft"

    def _long_conv(self, kernels: torch.Tensor, length: int) -> K.LongConv:
        """Kernels (dirs, K, D, l) as an operator on length-``length`` inputs."""
        return K.LongConv(*K.truncate(kernels, length), length, self._impl(length, kernels.device))

    def _fused_operator(self, length: int) -> K.LongConv:
        weight = self.weight.unsqueeze(1)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._long_conv(weight, length)  # being trained: no cache, gradients flow
        key = (length, self.conv_impl, self.weight.device, self.weight.dtype, self.weight.data_ptr(),
               self.weight._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._long_conv(weight, length))
        return self._cache[1]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[1] != self.dim:
            raise ValueError(f"MRConv expects input of shape (batch, dim={self.dim}, length), "
                             f"got {tuple(u.shape)}")
        dtype, device_type = u.dtype, u.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # FFTs and the BN statistics run in fp32 even under bf16/fp16 autocast (cuFFT has no bf16 path); the
        # training form keeps the input in its own dtype for backward and converts it itself.
        with torch.autocast(device_type=device_type, enabled=False):
            length = int(u.shape[-1])
            if self.inference_mode:
                op = self._fused_operator(length)
                # the Triton kernels read bf16/fp16 (fp32 accumulation): under autocast the input is cast as
                # autocast casts a depthwise conv's, else taken as given
                on_triton = op.impl in ("triton", "triton_fft")
                if on_triton:
                    x = u if autocast is None else u.to(autocast)
                else:
                    x = u.to(torch.promote_types(self.weight.dtype, torch.float32))
                y = op.conv(op.prepare(x))[:, 0] + self.bias[:, None]
            else:
                impl = self._impl(length, u.device, training=self.training)
                y = self.norm(u, self.branch_kernels(), self.alpha, impl)
        return y.to(dtype)

    def extra_repr(self) -> str:
        form = "fused" if self.inference_mode else f"{self.kernel_type}, branches={self.lengths}"
        return (f"dim={self.dim}, seq_len={self.seq_len}, l0={self.l0}, {form}, "
                f"{'bidirectional' if self.bidirectional else 'causal'}")


@torch.no_grad()
def alpha_energy(model: nn.Module) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``||alpha_i||^2`` of every training-form MRConv layer, grouped by stage (the name before ``.blocks.``), as in
    the paper's Figure 3b: stage -> (blocks x resolutions matrix, NaN where a block has fewer branches; the branch
    lengths of the stage's longest layer). Fused layers have no ``alpha`` and are left out."""
    groups: dict[str, list[MRConv]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MRConv) and not module.inference_mode:
            groups.setdefault(name.split(".blocks.")[0] or "all", []).append(module)
    out = {}
    for stage, layers in groups.items():
        energy = np.full((len(layers), max(m.num_branches for m in layers)), np.nan)
        for b, m in enumerate(layers):
            energy[b, :m.num_branches] = m.alpha.detach().float().pow(2).sum(dim=1).cpu().numpy()
        out[stage] = (energy, list(max(layers, key=lambda m: m.num_branches).lengths))
    return out
