"""pipelines/quickstart.py on small inputs."""
from __future__ import annotations

import json

from pipelines import quickstart
from pipelines.benchmark.__main__ import main as benchmark
from tests.test_benchmark import TINY


def test_quickstart_summary_and_plot_title_name_the_benchmarks_device(tmp_path):
    out = tmp_path / "b.csv"
    assert benchmark(["models", "--models", "mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto",
                      *TINY, "--no-flops", "--csv", str(out)]) == 0
    title, line = quickstart.throughput_summary(str(out), "mrconvnext_atto", "convnext_atto")
    assert "CPU inference throughput" in title and line.startswith("throughput (CPU)")
    meta = json.loads((tmp_path / "b.csv.json").read_text())
    (tmp_path / "b.csv.json").write_text(json.dumps(dict(meta, device="NVIDIA H200")))  # as a GPU run writes it
    title, line = quickstart.throughput_summary(str(out), "mrconvnext_atto", "convnext_atto")
    assert "NVIDIA H200 inference throughput" in title and "CPU" not in title + line
    assert line.startswith("throughput (NVIDIA H200) fused") and "x unfused" in line and "x convnext_atto" in line
