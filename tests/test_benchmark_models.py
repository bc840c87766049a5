"""python -m pipelines.benchmark models: timm's benchmark CSV schema and side file, on a tiny model at 32px."""
from __future__ import annotations

import csv
import json

import pytest

from pipelines.benchmark import model_speed as bench
from pipelines.flops import FFT_CONVENTION
from tests.conftest import BENCH_TINY

TIMM_BENCH_COLUMNS = ["model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                      "param_count", "infer_gmacs", "infer_macts"]
PEAK_MEM = ["infer_peak_mem_gib"]  # after timm's columns


def read(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_cli_writes_timm_columns_with_both_forms_side_by_side(tmp_path, capsys):
    out = tmp_path / "b.csv"
    argv = ["--models", "mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto", *BENCH_TINY, "--train",
            "--channels-last",  # the unfused MRConv has a 5D parameter
            "--csv", str(out)]
    assert bench.main(argv) == 0
    columns, rows = read(out)
    assert columns == TIMM_BENCH_COLUMNS + PEAK_MEM + ["train_samples_per_sec", "train_step_time",
                                                       "train_peak_mem_gib", "train_ops"]
    assert [r["model"] for r in rows] == ["mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto"]
    for r in rows:
        assert float(r["infer_samples_per_sec"]) > 0 and float(r["train_samples_per_sec"]) > 0
        assert r["infer_img_size"] == "32" and r["infer_batch_size"] == "2"
        # the CPU's figures count tensors (timing.LiveBytes): at least the weights, more when training
        assert 0 < float(r["infer_peak_mem_gib"]) < float(r["train_peak_mem_gib"])
    fused, unfused = rows[0], rows[1]
    assert float(fused["param_count"]) < float(unfused["param_count"])
    assert fused["infer_gmacs"] != "" and fused["train_step_time"] == unfused["train_step_time"]  # same train form
    # the operations a step runs: N branches, per-branch BatchNorm and their transforms against one 7x7 conv
    assert fused["train_ops"] == unfused["train_ops"] and int(unfused["train_ops"]) > int(rows[2]["train_ops"]) > 0
    meta = json.loads((tmp_path / "b.csv.json").read_text())
    assert meta["fft_convention"] == FFT_CONVENTION and "CPU" in meta["machine"]
    assert meta["settings"]["batch_size"] == 2 and meta["forms"]["convnext_atto"] == "-"
    printed = capsys.readouterr().out
    assert "vs first" in printed and "mrconvnext_atto fused vs unfused" in printed and "summary:" in printed


def test_reparam_without_train_and_without_flops(tmp_path):
    out = tmp_path / "b.csv"
    assert bench.main(["--models", "mrconvnext_atto", *BENCH_TINY, "--reparam", "--no-flops", "--csv", str(out)]) == 0
    columns, rows = read(out)
    assert columns == TIMM_BENCH_COLUMNS + PEAK_MEM and rows[0]["infer_gmacs"] == ""
    assert json.loads((tmp_path / "b.csv.json").read_text())["forms"]["mrconvnext_atto"] == "fused"


def test_bad_model_specs_fail_clearly(capsys):
    with pytest.raises(ValueError, match="fused, unfused"):
        bench.parse_spec("convnext_atto@folded")
    assert bench.main(["--models", "convnext_atto@fused", *BENCH_TINY, "--no-flops"]) == 2
    assert "no fused form" in capsys.readouterr().err
    assert bench.main(["--models", "convnext_atto", "convnext_atto", *BENCH_TINY]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_model_kwargs_go_to_mrconv_models_or_to_the_named_model_only(tmp_path, capsys):
    """conv_impl is MRConv's: before, every kwarg also reached the ConvNeXt peer, which crashed on it."""
    out = tmp_path / "b.csv"
    assert bench.main(["--models", "mrconvnext_atto@fused", "convnext_atto", *BENCH_TINY, "--no-flops", "--csv",
                       str(out), "--model-kwargs", "conv_impl=fft", "min_l0=2", "convnext_atto:ls_init_value=0.5"]) == 0
    meta = json.loads((tmp_path / "b.csv.json").read_text())
    assert meta["kwargs"] == {"mrconvnext_atto@fused": {"conv_impl": "fft", "min_l0": 2},
                              "convnext_atto": {"ls_init_value": 0.5}}
    assert meta["device"] == "CPU"
    capsys.readouterr()
    assert bench.main(["--models", "convnext_atto", *BENCH_TINY, "--model-kwargs",
                       "convnext_tiny:depths=[1,1,1,1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'convnext_tiny' is not among --models" in err

