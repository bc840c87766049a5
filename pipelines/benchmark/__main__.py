"""``python -m pipelines.benchmark SUBCOMMAND [options]``: dispatch to the subcommand's module in this folder (named
so that none shadows the top-level ``models`` or ``train`` package)."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {  # name: (module, what it measures)
    "layer": ("layer", "MRConv layer: training form vs fused form vs a 7x7 depthwise conv, at ConvNeXt's stage shapes"),
    "loader": ("loader", "WebDataset loader vs torchvision ImageFolder throughput, and shard writing speed"),
    "models": ("model_speed", "inference (and training) throughput of timm models, timm benchmark.py style, CSV out"),
    "train": ("train_speed", "DeepSpeed training images/s: 1 vs 2 ranks, MRConvNeXt vs ConvNeXt"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: python -m pipelines.benchmark {%s} [options]\n" % ",".join(SUBCOMMANDS))
        for name, (_, what) in SUBCOMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"pipelines.benchmark.{SUBCOMMANDS[argv[0]][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
