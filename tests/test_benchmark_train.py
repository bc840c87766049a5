"""python -m pipelines.benchmark train: real torchrun + DeepSpeed (gloo) launches for 1 and 2 ranks, a MRConvNeXt
beside its ConvNeXt peer, one timed step each at 32px; the table's figures follow from the JSON it writes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import timm

import models  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tiny(results_json, *args: str) -> subprocess.CompletedProcess:
    """The CLI on atto at 32 px, batch 2, one timed step, 10 classes (real torchrun + DeepSpeed launches)."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "train", "--models", "mrconvnext_atto",
                           "--batch-size", "2", "--img-size", "32", "--steps", "1", "--warmup", "1", "--num-classes",
                           "10", "--json", str(results_json), *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


@pytest.mark.slow
def test_cli_measures_each_model_and_its_peer_at_each_world_size(tmp_path):
    results_json = tmp_path / "r.json"
    proc = run_tiny(results_json, "--ranks", "1,2")
    results = json.loads(results_json.read_text())
    assert [(r["model"], r["ranks"]) for r in results] == [("mrconvnext_atto", 1), ("mrconvnext_atto", 2),
                                                           ("convnext_atto", 1), ("convnext_atto", 2)]
    assert all(r["images_per_sec"] > 0 and r["step_ms"] > 0 for r in results)
    speed = {(r["model"], r["ranks"]): r["images_per_sec"] for r in results}
    for r in results:  # the models the workers built: the benchmark's sizes, not the defaults
        kwargs = {"img_size": 32} if r["model"].startswith("mrconvnext_") else {}
        model = timm.create_model(r["model"], num_classes=10, **kwargs)
        assert r["params"] == sum(p.numel() for p in model.parameters()), r

    out = proc.stdout
    for (name, ranks), images_per_sec in speed.items():
        assert f"  {name} x{ranks} rank(s): {images_per_sec:.1f} img/s" in out
    assert "batch 2/rank, 32px, ZeRO-0, fp32, 1 timed steps after 1 warm-up" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "params", "1", "rank", "img/s", "2", "rank", "img/s", "eff@2",
                                     "vs", "convnext"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2:header + 4]}
    mrconv, convnext = rows["mrconvnext_atto"], rows["convnext_atto"]
    for name, row in rows.items():
        assert row[1:4] == [f"{speed[(name, 1)]:.1f}", f"{speed[(name, 2)]:.1f}",
                            f"{speed[(name, 2)] / (2 * speed[(name, 1)]):.2f}"], (name, row)
    assert mrconv[4] == f"{speed[('mrconvnext_atto', 2)] / speed[('convnext_atto', 2)]:.2f}x"
    assert len(convnext) == 4  # the peer is not compared with itself
    assert re.fullmatch(r"[\d,]+", mrconv[0]) and int(mrconv[0].replace(",", "")) == results[0]["params"]


def test_table_takes_medians_over_rounds_and_pairs_ratios_within_a_round():
    from pipelines.benchmark.train_speed import peer_ratios, table

    def row(model, rnd, speed):
        return {"model": model, "ranks": 2, "round": rnd, "images_per_sec": speed, "params": 7, "step_ms": 1.0}
    # round 1 ran on a slow machine: both models slowed down, their ratio did not
    results = [row("mrconvnext_atto", 0, 80.0), row("convnext_atto", 0, 100.0),
               row("convnext_atto", 1, 50.0), row("mrconvnext_atto", 1, 40.0),
               row("mrconvnext_atto", 2, 90.0), row("convnext_atto", 2, 100.0)]
    assert peer_ratios(results, "mrconvnext_atto", 2) == [0.8, 0.8, 0.9]
    lines = table(results, [2]).splitlines()
    mr = lines[2].split()
    assert mr[0] == "mrconvnext_atto" and mr[2] == "80.0" and mr[3] == "0.80x"  # medians, not 80/100 of the rows
    assert lines[3].split()[2] == "100.0"


@pytest.mark.slow
def test_cli_rounds_alternate_the_model_order(tmp_path):
    results_json = tmp_path / "r.json"
    proc = run_tiny(results_json, "--ranks", "1", "--rounds", "2")
    results = json.loads(results_json.read_text())
    assert [(r["model"], r["round"]) for r in results] == [("mrconvnext_atto", 0), ("convnext_atto", 0),
                                                           ("convnext_atto", 1), ("mrconvnext_atto", 1)]
    speed = {(r["model"], r["round"]): r["images_per_sec"] for r in results}
    ratios = [speed[("mrconvnext_atto", k)] / speed[("convnext_atto", k)] for k in (0, 1)]
    assert (f"mrconvnext_atto vs convnext_atto per round: {ratios[0]:.2f} {ratios[1]:.2f} "
            f"(median {(ratios[0] + ratios[1]) / 2:.2f})") in proc.stdout
    assert "2 round(s) (medians)" in proc.stdout


def test_cli_rejects_zero_rounds_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "train", "--rounds", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "--rounds must be at least 1, got 0"


@pytest.mark.slow
def test_cli_compiles_with_inductor(tmp_path):
    """--compile: each rank's engine compiles its model with inductor (C++ code generated and built on the CPU, in a
    cache of its own here so nothing earlier is reused) before the timed step, and the header says so."""
    results_json = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "train", "--models", "mrconvnext_atto",
                           "--batch-size", "2", "--img-size", "32", "--steps", "1", "--warmup", "1", "--num-classes",
                           "10", "--ranks", "1", "--compile", "--json", str(results_json)], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                                   TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(results_json.read_text())
    assert [(r["model"], r["compiled"]) for r in results] == [("mrconvnext_atto", True), ("convnext_atto", True)]
    assert all(r["images_per_sec"] > 0 for r in results)
    assert "batch 2/rank, 32px, ZeRO-0, fp32, compiled, 1 timed steps after 1 warm-up" in proc.stdout
    assert any(name.endswith(".so") for _, _, files in os.walk(tmp_path / "inductor") for name in files)
