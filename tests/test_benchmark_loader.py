"""python -m pipelines.benchmark loader: shard writing, then our loader beside ImageFolder, on a few tiny images."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from pipelines.benchmark import loader as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loader_benchmark_reports_gpu_decode_beside_cpu_and_imagefolder(capsys):
    assert bench.main(["--num-images", "16", "--batch-size", "4", "--img-size", "32", "--shard-size", "4",
                       "--workers", "1", "--rounds", "1", "--decode", "gpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
            if line.startswith(("shards", "ImageFolder"))}
    assert set(rows) == {"shards (ours)", "ImageFolder", "shards, gpu decode"}
    assert "cores" in out and "gpu decode:" in out and "CPU cores used" in out


def test_cli_writes_shards_and_times_both_loaders_in_a_work_folder_it_removes(tmp_path):
    """The real command line, CPU decode: the shard summary, one row per loader with a figure per round, the
    summary against the goals, and --dir left as it was found."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "loader", "--num-images", "12", "--batch-size",
                           "4", "--img-size", "32", "--shard-size", "4", "--workers", "1", "--rounds", "2", "--dir",
                           str(work)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "generated 12 JPEGs" in out
    assert re.search(r"^train: 3 shards \(0 kept from an earlier run\), 12 samples \(12 written\), 0 skipped", out,
                     re.M), out
    assert "(2 epochs of 12 images, 32px RandAugment" in out
    rows = {line[:18].strip(): [float(v) for v in line[18:].split()] for line in out.splitlines()
            if line.startswith(("shards", "ImageFolder"))}
    assert set(rows) == {"shards (ours)", "ImageFolder"}
    for name, values in rows.items():  # images/s, per worker, per CPU-s, cores, then one images/s per round
        assert len(values) == 4 + 2 and all(v > 0 for v in values), (name, values)
    assert re.search(r"^summary: writing [\d,]+ images/s \(goal >= 1,000: (met|MISSED)\); loading [\d.]+ vs [\d.]+ "
                     r"images/s per worker .*x ImageFolder \(goal >= 1.3: (met|MISSED)\); counting this process too "
                     r".*: [\d.]+ vs [\d.]+ images per CPU-second, [\d.]+x$", out, re.M), out
    assert "gpu decode:" not in out
    assert os.listdir(work) == []
