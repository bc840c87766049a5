"""``python -m pipelines.benchmark layer``: MRConv against a 7x7 depthwise Conv2d, for inference and for training.

At the four flattened ConvNeXt-T stage shapes at 224 (L = 3136, 784, 196, 49; C = 96 .. 768; l0 of MRCONV.md), all
variants interleaved in one run:

* inference (eval, ``torch.inference_mode``): the fused layer (``auto``, ``fft`` and ``toeplitz``) and the 7x7
  depthwise conv, with the fused layer's achieved bandwidth counting its input and output bytes once (beside the
  device's peak, on a GPU) and, where the fused layer runs the Triton FFT kernel, the tensor-core TFLOP/s of its
  DFT products (``triton_fft.row_macs``);
* training (``--train``: forward + backward in train mode): the training form (N branches, per-branch BatchNorm with
  batch statistics), the fused single kernel being trained, and the 7x7 depthwise conv, with the peak memory a step
  of the training form and of the depthwise conv allocates beyond its input, parameters and gradient (the
  allocator's on a GPU, the tensors' on the CPU: ``timing.peak_memory_gib``), and the operations a step runs
  (``timing.count_ops``: about one kernel launch each on a GPU, a host-side cost per step whatever the batch).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from models import MRConv
from models import kernels as K
from models.mrconv import CONV_IMPLS
from models.mrconvnext import STAGE_L0

from .timing import count_ops, interleaved, machine_description, peak_bandwidth_gbs, peak_memory_gib

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-T channels and feature map side at 224


def _train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        module(x).backward(grad)
    return step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kernel-type", default="fourier_sparse")
    parser.add_argument("--device", default=get_accelerator().device_name())
    parser.add_argument("--train", action="store_true", help="time forward + backward in train mode")
    parser.add_argument("--conv-impl", default="auto", choices=CONV_IMPLS,
                        help="MRConv conv_impl of the timed layer (the 'fused' and 'training' columns)")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast every variant")
    parser.add_argument("--fp32-precision", choices=("tf32x3", "ieee"),
                        help="conv_impl=triton: how its kernels multiply fp32 inputs (the training form's; default "
                             f"{K.TRITON_FP32_PRECISION}, models.kernels.TRITON_FP32_PRECISION)")
    parser.add_argument("--lengths", type=int, nargs="+", choices=[side * side for _, side in STAGES],
                        help="only these stages (default: all four)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fp32_precision:
        K.TRITON_FP32_PRECISION = args.fp32_precision
    device = torch.device(args.device)
    mode = "forward + backward, train mode" if args.train else "forward, eval mode"
    precision = "bf16 autocast" if args.amp == "bf16" else "fp32"
    peak = peak_bandwidth_gbs(device)
    print(f"MRConv layer {mode}, batch {args.batch_size}, {args.kernel_type}, bidirectional, {precision}, "
          f"conv_impl={args.conv_impl}"
          + (f" (fp32 products: {K.TRITON_FP32_PRECISION})" if args.conv_impl == "triton" and K.triton_runs_on(device)
             else " (the PyTorch path here)" if args.conv_impl == "triton" else "")
          + f", on {machine_description(device)}"
          + (f", peak memory bandwidth {peak:,.0f} GB/s" if peak else ""))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    if args.train:
        header = (f"{'L':>5} {'C':>4} {'N':>2} | {'training':>10} {'fused':>10} {'dw7x7':>10} | "
                  f"{'training/dw7x7':>14} {'training/fused':>14} | {'train MiB':>9} {'dw7x7 MiB':>9} | "
                  f"{'train ops':>9} {'dw7x7 ops':>9}")
    else:
        header = (f"{'L':>5} {'C':>4} {'N':>2} | {'fused':>10} {'fused fft':>10} {'fused toep':>10} {'dw7x7':>10} | "
                  f"{'fused/dw7x7':>11} {'fused GB/s':>10} {'of peak':>7} {'FFT TFLOP/s':>11}")
    print(header + "\n" + "-" * len(header))
    ratios = []
    for (dim, side), l0 in zip(STAGES, STAGE_L0):
        length = side * side
        if args.lengths and length not in args.lengths:
            continue
        torch.manual_seed(0)
        layer = MRConv(dim, length, l0, kernel_type=args.kernel_type, conv_impl=args.conv_impl).to(device)
        dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim).to(device)
        x = torch.randn(args.batch_size, dim, length, device=device)
        x2d = x.view(args.batch_size, dim, side, side)
        if args.train:
            fused = copy.deepcopy(layer).eval()
            fused.reparameterize()
            x = x.requires_grad_()
            x2d = x.detach().view(args.batch_size, dim, side, side).requires_grad_()
            grad = torch.randn_like(x)
            fns = {"training": _train_step(layer.train(), x, grad), "fused": _train_step(fused.train(), x, grad),
                   "dw": _train_step(dw.train(), x2d, grad.view_as(x2d))}
            with autocast:
                t = interleaved(fns, device=device, iters=args.iters, rounds=args.rounds)
                mib = {k: peak_memory_gib(fns[k], device, 0) for k in ("training", "dw")}
                ops = {k: count_ops(fns[k]) for k in ("training", "dw")}
            mib = {k: f"{'-':>9}" if v is None else f"{v * 1024:>9.1f}" for k, v in mib.items()}
            ms = {k: v * 1e3 for k, v in t.items()}
            ratio = t["training"] / t["dw"]
            ratios.append(ratio)
            print(f"{length:>5} {dim:>4} {layer.num_branches:>2} | {ms['training']:>8.2f}ms {ms['fused']:>8.2f}ms "
                  f"{ms['dw']:>8.2f}ms | {ratio:>13.2f}x {t['training'] / t['fused']:>13.2f}x | "
                  f"{mib['training']} {mib['dw']} | {ops['training']:>9,} {ops['dw']:>9,}")
            continue
        fused = {}
        for impl in (args.conv_impl, "fft", "toeplitz"):
            fused[impl] = copy.deepcopy(layer).eval()
            fused[impl].conv_impl = impl
            fused[impl].reparameterize()
        with torch.inference_mode(), autocast:
            fns = {"fused": lambda: fused[args.conv_impl](x), "fft": lambda: fused["fft"](x),
                   "toeplitz": lambda: fused["toeplitz"](x), "dw": lambda: dw.eval()(x2d)}
            t = interleaved(fns, device=device, iters=args.iters, rounds=args.rounds)
        ms = {k: v * 1e3 for k, v in t.items()}
        ratio = t["fused"] / t["dw"]
        ratios.append(ratio)
        gbps = 2 * x.numel() * x.element_size() / t["fused"] / 1e9  # input read + output written once
        of_peak = f"{gbps / peak:>7.1%}" if peak else f"{'-':>7}"
        with torch.no_grad():
            op = fused[args.conv_impl]._fused_operator(length)
        tflops = f"{'-':>11}"
        if op.impl == "triton_fft":
            from models import triton_fft
            macs = triton_fft.row_macs(op.n, length, dense=not triton_fft.factored_on(device))
            tflops = f"{2 * macs * args.batch_size * dim / t['fused'] / 1e12:>11.1f}"
        print(f"{length:>5} {dim:>4} {layer.num_branches:>2} | {ms['fused']:>8.2f}ms {ms['fft']:>8.2f}ms "
              f"{ms['toeplitz']:>8.2f}ms {ms['dw']:>8.2f}ms | {ratio:>10.2f}x {gbps:>10.1f} {of_peak} {tflops}")
    what = "training form" if args.train else "fused layer"
    lengths = [side * side for _, side in STAGES if not args.lengths or side * side in args.lengths]
    print(f"summary: {what} / 7x7 depthwise conv at L = {', '.join(map(str, lengths))}: "
          + ", ".join(f"{r:.2f}x" for r in ratios))
    return 0
