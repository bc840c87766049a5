"""pipelines.compare end to end: real trainings (torchrun, DeepSpeed over gloo, 1 rank), exports, evaluations
on real Fashion-MNIST shards (conftest's `shards`), one benchmark run and the plot, with tiny models at 32px and
8 optimizer steps each. The SLURM test submits the array on the real local cluster (tests/test_slurm.py's
fixtures) and collects it."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import compare, plot
from tests.slurm_cluster import deepspeed_ops_built, read_log, slurm_env, wait_job  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
MR, PEER = "mrconvnext_atto", "convnext_atto"
# 256 training samples / 32 = 8 steps on one rank.
TINY = ["model.kwargs={img_size: 32, depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], min_l0: 2}", "data.img_size=32",
        "data.batch_size=32", "data.num_workers=0", "schedule.epochs=1", "schedule.warmup_epochs=0.5",
        "logging.progress_bar=false", "checkpoint.every_steps=4", "deepspeed.precision=fp32"]
STEPS = 8


def args(shards: str, out: Path, models: str, *extra: str) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
    return ["--config", "fashion_mnist", "--models", models, "--data", shards, "--out", str(out), *sets,
            "--bench-batch-size", "8", "--bench-args", "--warmup 1 --iters 1 --rounds 1", *extra]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stamps(run_dir: Path) -> dict[str, int]:
    """mtime of every file of a run: a run retrained, re-exported or re-evaluated changes them. Not recipe.yaml,
    which every call writes again (same content)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name != "recipe.yaml"}


@pytest.fixture(scope="module")
def half_done(shards, tmp_path_factory) -> Path:
    """A sweep of which only the MRConvNeXt has run (trained, exported, evaluated, benchmarked, plotted)."""
    out = tmp_path_factory.mktemp("compare") / "sweep"
    assert compare.main(args(shards, out, MR)) == 0
    return out


def test_recipes_share_everything_but_the_model(shards, tmp_path):
    from train.config import load_config

    cfg = load_config("fashion_mnist", [f"data.dir={shards}", *TINY])
    paths = compare.write_configs(cfg, [MR, PEER], str(tmp_path))
    mr, peer = (yaml.safe_load(Path(paths[n]).read_text()) for n in (MR, PEER))
    assert mr["model"]["name"] == MR and peer["model"]["name"] == PEER
    assert peer["model"]["kwargs"] == {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}  # no img_size, min_l0
    assert mr["model"]["kwargs"]["min_l0"] == 2
    for key in ("data", "optim", "schedule", "deepspeed", "seed"):
        assert mr[key] == peer[key], key
    assert compare.bench_entries([MR, PEER]) == [f"{MR}@fused", f"{MR}@unfused", PEER]


def test_sweep_resumes_without_retraining_merges_and_plots(shards, half_done, capfd):
    out = half_done
    before = stamps(out / MR)
    assert json.loads((out / MR / "summary.json").read_text())["step"] == STEPS
    assert len(rows(out / "results.csv")) == 1
    capfd.readouterr()

    assert compare.main(args(shards, out, f"{MR},{PEER}")) == 0
    printed = capfd.readouterr().out
    assert f"{MR}: finished in {out / MR}, not retrained" in printed
    assert stamps(out / MR) == before, "the finished run was neither retrained nor re-exported nor re-evaluated"
    assert json.loads((out / PEER / "summary.json").read_text())["step"] == STEPS
    assert yaml.safe_load((out / PEER / "config.yaml").read_text())["model"]["name"] == PEER

    results = rows(out / "results.csv")
    assert [r["model"] for r in results] == [f"{MR}@fused", PEER]  # one row per model
    assert all(0 <= float(r["top1"]) <= 100 and r["img_size"] == "32" for r in results)
    bench = rows(out / "bench.csv")
    assert [r["model"] for r in bench] == [f"{MR}@fused", f"{MR}@unfused", PEER]  # one benchmark run
    assert {r["infer_img_size"] for r in bench} == {"32"}
    assert (out / "accuracy_throughput.png").stat().st_size > 0

    points, _ = plot.join(rows(out / "results.csv"), bench)
    fig, drawn = plot.accuracy_throughput_figure(points, caption=plot.bench_caption([str(out / "bench.csv")]))
    plot.plt.close(fig)
    assert drawn["fronts"] == {"convnext": [PEER], "mrconvnext": [MR]}
    by_label = {p["label"]: p for p in drawn["points"]}
    speed = {r["model"]: float(r["infer_samples_per_sec"]) for r in bench}
    assert by_label[MR]["throughput"] == speed[f"{MR}@fused"]
    assert by_label[MR]["unfused_throughput"] == speed[f"{MR}@unfused"]
    assert by_label[PEER]["top1"] == float(results[1]["top1"])
    assert "CPU" in drawn["caption"] and "batch 8, 32px" in drawn["caption"]


def test_user_mistakes_end_in_one_line(shards, tmp_path, capsys):
    assert compare.main(args(shards, tmp_path, " , ")) == 2
    assert compare.main(args(shards, tmp_path, f"{MR},{MR}")) == 2
    assert compare.main(args(str(tmp_path / "nowhere"), tmp_path, MR)) == 2
    assert compare.main(args(shards, tmp_path / "empty", MR, "--collect")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("compare: error: ") for e in errors), errors
    assert "no finished run" in errors[3] and "no shards" in errors[2]


def test_sweep_dry_run_renders_the_array(shards, tmp_path):
    res = subprocess.run([sys.executable, "-m", "slurm.submit", "--sweep", "fashion_mnist", "--models",
                          f"{MR},{PEER}", *args(shards, tmp_path, f"{MR},{PEER}")[4:], "--gpus-per-node", "4",
                          "--partition", "gpu", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip().splitlines()[-1].split()
    for flag in ("--array=0-1", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--requeue", f"--output={tmp_path}/logs/%x-%A_%a.out"):
        assert flag in cmd, flag
    assert cmd[-3:] == [str(REPO / "slurm" / "sweep.sbatch"), str(tmp_path / "sweep.txt"), str(tmp_path)]
    listing = (tmp_path / "sweep.txt").read_text().splitlines()
    assert listing == [f"{tmp_path / MR / 'recipe.yaml'} {MR}", f"{tmp_path / PEER / 'recipe.yaml'} {PEER}"]


def test_slurm_array_then_collect(slurm_env, shards, tmp_path):
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "pipelines.compare", *args(shards, out, f"{MR},{PEER}"), "--slurm"],
                         env=slurm_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    array_id = re.search(r"submitted job array (\d+)", res.stdout).group(1)
    for i, name in enumerate((MR, PEER)):
        log = out / "logs" / f"mrconv-sweep-{array_id}_{i}.out"
        assert wait_job(slurm_env, f"{array_id}_{i}", log)["JobState"] == "COMPLETED", read_log(log)
        assert json.loads((out / name / "summary.json").read_text())["step"] == STEPS
    collect = subprocess.run([sys.executable, "-m", "pipelines.compare", *args(shards, out, f"{MR},{PEER}"),
                              "--collect"], env=slurm_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, collect.stdout[-4000:] + collect.stderr[-4000:]
    assert [r["model"] for r in rows(out / "results.csv")] == [f"{MR}@fused", PEER]
    assert (out / "accuracy_throughput.png").exists()
