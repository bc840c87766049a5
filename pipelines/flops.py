"""fvcore FLOP counting for any timm model, with the FFT ops counted.

Units: fvcore counts one multiply-add as one "flop"; timm's CSVs call the same number GMACs. fvcore counts FFTs
as zero; we register handles with this convention, in the same MAC units:

    a real FFT (``rfft``/``irfft``) of size n costs 1.25 * n * log2(n) MACs per transformed row
    (= 2.5 * n * log2(n) real flops, half of the textbook 5 n log2 n for a complex FFT),
    a complex FFT (``fft``/``ifft``) of size n costs 2.5 * n * log2(n) MACs per row.

The complex pointwise product in the frequency domain is elementwise, which fvcore leaves uncounted for every
model (as it does for activations and residual additions).

``python -m pipelines.flops`` prints params and GMACs of every MRConvNeXt variant, unfused and fused, beside the
matching ConvNeXt.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

FFT_CONVENTION = ("FFT ops counted as 1.25*n*log2(n) MACs per real FFT row (2.5*n*log2(n) per complex row); "
                  "1 MAC = 1 fvcore flop = timm's GMACs unit")
REAL_FFT_MACS = 1.25
COMPLEX_FFT_MACS = 2.5


def fft_macs(n: int, rows: int, per_point: float = REAL_FFT_MACS) -> float:
    """MACs of ``rows`` FFTs of size ``n`` under the convention above."""
    return per_point * rows * n * math.log2(n) if n > 1 else 0.0


def _fft_handle(per_point: float, output_is_real: bool):
    """fvcore handle for a 1D FFT op ``(input, n, dim, norm)``: the transform size is ``n`` when given, else the
    input length along ``dim`` (``irfft`` without ``n``: ``2 * (m - 1)``)."""
    from fvcore.nn.jit_handles import get_shape

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        shape_in, shape_out = get_shape(inputs[0]), get_shape(outputs[0])
        dim = inputs[2].toIValue() if len(inputs) > 2 else -1
        dim = dim if dim is not None else -1
        n = inputs[1].toIValue() if len(inputs) > 1 else None
        if n is None:
            n = shape_out[dim] if output_is_real else shape_in[dim]
        rows = math.prod(shape_out) // shape_out[dim]
        return fft_macs(int(n), rows, per_point)

    return handle


FFT_HANDLES = {
    "aten::fft_rfft": _fft_handle(REAL_FFT_MACS, output_is_real=False),
    "aten::fft_irfft": _fft_handle(REAL_FFT_MACS, output_is_real=True),
    "aten::fft_fft": _fft_handle(COMPLEX_FFT_MACS, output_is_real=False),
    "aten::fft_ifft": _fft_handle(COMPLEX_FFT_MACS, output_is_real=False),
}


@dataclass
class FlopReport:
    macs: float  # multiply-adds for one forward at the given input
    params: int
    unsupported: Counter  # ops fvcore saw but did not count (name -> occurrences)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_flops(model: torch.nn.Module, input_size: tuple[int, ...] = (3, 224, 224), batch_size: int = 1
                ) -> FlopReport:
    """Trace one eval-mode forward with fvcore and count MACs, FFTs included (see module docstring)."""
    from fvcore.nn import FlopCountAnalysis

    model = model.eval()
    x = torch.randn(batch_size, *input_size)
    with torch.no_grad():
        model(x)  # fill per-length caches (a fused MRConv's kernel spectrum is a constant at inference)
        analysis = FlopCountAnalysis(model, x).set_op_handle(**FFT_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        macs = analysis.total()
    return FlopReport(macs=float(macs), params=sum(p.numel() for p in model.parameters()),
                      unsupported=Counter(analysis.unsupported_ops()))


VARIANTS = ("atto", "femto", "pico", "nano", "tiny", "small", "base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)

    import timm
    from timm.utils import reparameterize_model

    import models  # noqa: F401  (registers mrconvnext_*)

    size = (3, args.img_size, args.img_size)
    print(f"Params and GMACs at {args.img_size}x{args.img_size}, batch 1. {FFT_CONVENTION}.")
    header = f"{'model':<28} {'params (M)':>10} {'GMACs':>8} {'vs ConvNeXt':>12}  not counted"
    print(header + "\n" + "-" * len(header))
    unsupported_all: Counter = Counter()
    for variant in args.variants:
        base = count_flops(timm.create_model(f"convnext_{variant}"), size)
        mr = timm.create_model(f"mrconvnext_{variant}", img_size=args.img_size)
        rows = [(f"convnext_{variant}", base), (f"mrconvnext_{variant}", count_flops(mr, size)),
                (f"mrconvnext_{variant} (fused)", count_flops(reparameterize_model(copy.deepcopy(mr)), size))]
        for name, rep in rows:
            unsupported_all.update(rep.unsupported)
            rel = f"{rep.params / base.params:>5.3f}x / {rep.macs / base.macs:.2f}x" if rep is not base else ""
            skipped = ", ".join(sorted(rep.unsupported)) or "-"
            print(f"{name:<28} {rep.params / 1e6:>10.2f} {rep.gmacs:>8.2f} {rel:>12}  {skipped}")
    print(f"summary: {len(args.variants)} variants; ops left uncounted everywhere (elementwise): "
          f"{', '.join(sorted(unsupported_all)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
