"""``python -m pipelines.benchmark SUBCOMMAND [options]``: dispatch to ``pipelines/benchmark/<subcommand>.py``."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "layer": "MRConv layer: training form vs fused form vs a 7x7 depthwise conv, at the ConvNeXt stage shapes",
    "loader": "WebDataset loader vs torchvision ImageFolder throughput, and shard writing speed",
    "models": "inference (and training) throughput of timm models, timm benchmark.py style, CSV out",
    "train": "DeepSpeed training images/s: 1 vs 2 ranks, MRConvNeXt vs ConvNeXt",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: python -m pipelines.benchmark {%s} [options]\n" % ",".join(SUBCOMMANDS))
        for name, what in SUBCOMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"pipelines.benchmark.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
