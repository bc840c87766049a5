"""``python -m pipelines.benchmark layer``: MRConv training form vs fused form vs a 7x7 depthwise Conv2d.

At the four flattened ConvNeXt-T stage shapes at 224 (L = 3136, 784, 196, 49; C = 96 .. 768; l0 of MRCONV.md),
forward time in eval mode under ``torch.inference_mode``, all variants interleaved in one run.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

from models import MRConv
from models.mrconvnext import STAGE_L0

from .timing import interleaved, machine_description

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-T channels and feature map side at 224


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kernel-type", default="fourier_sparse")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"MRConv layer forward, batch {args.batch_size}, {args.kernel_type}, bidirectional, "
          f"on {machine_description(device)}")
    header = (f"{'L':>5} {'C':>4} {'N':>2} | {'branches':>10} {'fused':>10} {'fused fft':>10} {'fused toep':>10} "
              f"{'dw7x7':>10} | {'branch/fused':>12} {'fused/dw7x7':>11}")
    print(header + "\n" + "-" * len(header))
    worst = []
    for (dim, side), l0 in zip(STAGES, STAGE_L0):
        length = side * side
        torch.manual_seed(0)
        layer = MRConv(dim, length, l0, kernel_type=args.kernel_type).to(device).eval()
        fused = {impl: copy.deepcopy(layer) for impl in ("auto", "fft", "toeplitz")}
        for impl, m in fused.items():
            m.conv_impl = impl
            m.reparameterize()
        dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim).to(device).eval()
        x = torch.randn(args.batch_size, dim, length, device=device)
        x2d = x.view(args.batch_size, dim, side, side)
        with torch.inference_mode():
            fns = {"branches": lambda: layer(x), "fused": lambda: fused["auto"](x),
                   "fft": lambda: fused["fft"](x), "toeplitz": lambda: fused["toeplitz"](x), "dw": lambda: dw(x2d)}
            t = interleaved(fns, device=device, iters=args.iters, rounds=args.rounds)
        ms = {k: v * 1e3 for k, v in t.items()}
        speedup, vs_dw = t["branches"] / t["fused"], t["fused"] / t["dw"]
        worst.append((speedup / layer.num_branches, vs_dw))
        print(f"{length:>5} {dim:>4} {layer.num_branches:>2} | {ms['branches']:>8.2f}ms {ms['fused']:>8.2f}ms "
              f"{ms['fft']:>8.2f}ms {ms['toeplitz']:>8.2f}ms {ms['dw']:>8.2f}ms | "
              f"{speedup:>11.1f}x {vs_dw:>10.2f}x")
    ok_n = all(s >= 1 for s, _ in worst)
    ok_dw = all(r <= 2 for _, r in worst)
    print(f"summary: fused >= N x faster than branches at every stage: {'yes' if ok_n else 'NO'}; "
          f"fused within 2x of a 7x7 depthwise conv at every stage: {'yes' if ok_dw else 'NO'} "
          f"(worst fused/dw7x7 {max(r for _, r in worst):.2f}x)")
    return 0
