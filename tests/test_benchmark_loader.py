"""python -m pipelines.benchmark loader: shard writing, then our loader beside ImageFolder, on a few tiny images."""
from __future__ import annotations

from pipelines.benchmark import loader as bench


def test_loader_benchmark_reports_gpu_decode_beside_cpu_and_imagefolder(capsys):
    assert bench.main(["--num-images", "16", "--batch-size", "4", "--img-size", "32", "--shard-size", "4",
                       "--workers", "1", "--rounds", "1", "--decode", "gpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
            if line.startswith(("shards", "ImageFolder"))}
    assert set(rows) == {"shards (ours)", "ImageFolder", "shards, gpu decode"}
    assert "cores" in out and "gpu decode:" in out and "CPU cores used" in out
