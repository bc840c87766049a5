"""python -m pipelines.benchmark models: timm's benchmark CSV schema and side file, on a tiny model at 32px."""
from __future__ import annotations

import csv
import json

import pytest

from pipelines.benchmark import models as bench
from pipelines.flops import FFT_CONVENTION

TIMM_BENCH_COLUMNS = ["model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                      "param_count", "infer_gmacs", "infer_macts"]
TINY = ["--img-size", "32", "--batch-size", "2", "--warmup", "1", "--iters", "1", "--rounds", "1"]


def read(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_cli_writes_timm_columns_with_both_forms_side_by_side(tmp_path, capsys):
    out = tmp_path / "b.csv"
    argv = ["--models", "mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto", *TINY, "--train",
            "--channels-last",  # the unfused MRConv has a 5D parameter
            "--csv", str(out)]
    assert bench.main(argv) == 0
    columns, rows = read(out)
    assert columns == TIMM_BENCH_COLUMNS + ["train_samples_per_sec", "train_step_time"]
    assert [r["model"] for r in rows] == ["mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto"]
    for r in rows:
        assert float(r["infer_samples_per_sec"]) > 0 and float(r["train_samples_per_sec"]) > 0
        assert r["infer_img_size"] == "32" and r["infer_batch_size"] == "2"
    fused, unfused = rows[0], rows[1]
    assert float(fused["param_count"]) < float(unfused["param_count"])
    assert fused["infer_gmacs"] != "" and fused["train_step_time"] == unfused["train_step_time"]  # same train form
    meta = json.loads((tmp_path / "b.csv.json").read_text())
    assert meta["fft_convention"] == FFT_CONVENTION and "CPU" in meta["machine"]
    assert meta["settings"]["batch_size"] == 2 and meta["forms"]["convnext_atto"] == "-"
    printed = capsys.readouterr().out
    assert "vs first" in printed and "mrconvnext_atto fused vs unfused" in printed and "summary:" in printed


def test_reparam_without_train_and_without_flops(tmp_path):
    out = tmp_path / "b.csv"
    assert bench.main(["--models", "mrconvnext_atto", *TINY, "--reparam", "--no-flops", "--csv", str(out)]) == 0
    columns, rows = read(out)
    assert columns == TIMM_BENCH_COLUMNS and rows[0]["infer_gmacs"] == ""
    assert json.loads((tmp_path / "b.csv.json").read_text())["forms"]["mrconvnext_atto"] == "fused"


def test_bad_model_specs_fail_clearly():
    with pytest.raises(ValueError, match="fused, unfused"):
        bench.parse_spec("convnext_atto@folded")
    with pytest.raises(SystemExit, match="no fused form"):
        bench.main(["--models", "convnext_atto@fused", *TINY, "--no-flops"])
    with pytest.raises(SystemExit, match="listed twice"):
        bench.main(["--models", "convnext_atto", "convnext_atto", *TINY])
