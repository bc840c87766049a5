"""python -m pipelines.benchmark layer: both modes run at the real ConvNeXt-T stage shapes and print one row each."""
from __future__ import annotations

import pytest
import torch

from pipelines.benchmark import layer, timing

TINY = ["--batch-size", "1", "--iters", "1", "--rounds", "1", "--threads", "1"]


@pytest.mark.parametrize("mode", [[], ["--train"], ["--conv-impl", "fft", "--amp", "bf16"]])
def test_layer_benchmark_prints_every_stage_and_a_summary(mode, capsys):
    assert layer.main([*TINY, *mode]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split("|")[0].split()[:1] in (["3136"], ["784"], ["196"], ["49"])]
    assert len(rows) == 4
    assert out[-1].startswith("summary:") and out[-1].count("x") >= 4
    if "--train" in mode:  # the peak memory of a step, from the tensors on the CPU (timing.LiveBytes)
        for row in rows:
            train_mib, dw_mib = map(float, row.split("|")[-2].split())
            assert train_mib > dw_mib > 0  # N branches' transients against one conv's
            train_ops, dw_ops = (int(v.replace(",", "")) for v in row.split("|")[-1].split())
            assert train_ops > dw_ops > 0  # the operations a step runs (timing.count_ops)


def test_live_bytes_count_the_tensors_made_and_their_peak():
    before = torch.ones(1000)  # made outside: not counted
    with timing.LiveBytes() as live:
        a = torch.empty(1000)  # 4,000 bytes
        b = a * 2  # 8,000 live
        a.mul_(3)  # in place: nothing new
        view = b[10:].view(-1, 10)  # a view: nothing new
        del b  # the view keeps its storage
        c = before + 1  # 12,000: the peak
        assert live.live == 12_000
        del a, c, view
        d = torch.empty(500, dtype=torch.float64)  # 4,000
    assert (live.live, live.peak) == (4_000, 12_000)
    del d


def test_count_ops_counts_what_computes():
    """Views and empty allocations run no kernel; every other operation, in place or not, counts once."""
    a, b = torch.randn(4, 5), torch.randn(4, 5)

    def step():
        c = a + b  # 1
        v = c.view(-1)[2:].unsqueeze(0)  # views: 0
        v.mul_(2)  # 1
        torch.empty(3)  # 0
        return (c * b).sum(dim=0)  # 2

    assert timing.count_ops(step) == 4
    assert timing.count_ops(lambda: torch.nn.functional.linear(a, b)) == 1  # the transpose is a view


def test_lengths_pick_the_stages(capsys):
    assert layer.main([*TINY, "--train", "--conv-impl", "toeplitz", "--lengths", "49"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[3:-1]] == ["49"] and out[-1].startswith("summary: training form / 7x7 "
                                                                                     "depthwise conv at L = 49: ")


def test_peak_bandwidth():
    """The peak the achieved GB/s are set against: an H100 SXM's reported memory clock and bus width give its
    published 3.35 TB/s; the CPU states none."""
    assert timing.memory_bandwidth_gbs(2_619_000, 5120) == pytest.approx(3352.3, abs=0.1)
    assert timing.peak_bandwidth_gbs(torch.device("cpu")) is None


def test_fp32_precision_reaches_the_kernels(monkeypatch, capsys):
    """``--fp32-precision`` sets the constant both Triton launchers read for fp32 inputs, here checked through the
    FFT kernel's launch parameters (the GPU figures compare 3xTF32 with FMAs through it)."""
    from models import kernels as K
    from models import triton_fft

    monkeypatch.setattr(K, "TRITON_FP32_PRECISION", K.TRITON_FP32_PRECISION)  # restored after the test
    assert triton_fft._meta(8192, 16, torch.float32)["PREC"] == "tf32x3"
    assert layer.main([*TINY, "--conv-impl", "fft", "--fp32-precision", "ieee"]) == 0
    assert K.TRITON_FP32_PRECISION == "ieee"
    assert triton_fft._meta(8192, 16, torch.float32)["PREC"] == "ieee"
    assert triton_fft._meta(8192, 16, torch.bfloat16)["PREC"] == "tf32"
