"""pipelines.plot: joins of timm's results and benchmark CSVs, the Pareto front, and PNGs of the expected size
from small inputs (accuracy vs throughput, alpha heat maps, kernels)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.utils import reparameterize_model

import models  # noqa: F401
from pipelines import plot

RESULTS = [  # timm's results-imagenet.csv columns; a published row with its tag, one at another size
    {"model": "convnext_tiny.fb_in1k", "img_size": "224", "top1": "82.1", "top1_err": "17.9", "top5": "95.9",
     "top5_err": "4.1", "param_count": "28.59", "crop_pct": "0.875", "interpolation": "bicubic"},
    {"model": "convnext_tiny.fb_in1k_384", "img_size": "384", "top1": "83.1", "top1_err": "16.9", "top5": "96",
     "top5_err": "4", "param_count": "28.59", "crop_pct": "1.0", "interpolation": "bicubic"},
    {"model": "convnext_small", "img_size": "224", "top1": "83.1", "top1_err": "16.9", "top5": "96.4",
     "top5_err": "3.6", "param_count": "50.22", "crop_pct": "0.875", "interpolation": "bicubic"},
    {"model": "mrconvnext_tiny", "img_size": "224", "top1": "83.0", "top1_err": "17.0", "top5": "96.3",
     "top5_err": "3.7", "param_count": "28.2", "crop_pct": "0.95", "interpolation": "bicubic"},
    {"model": "resnet50.a1_in1k", "img_size": "224", "top1": "80.4", "top1_err": "19.6", "top5": "95",
     "top5_err": "5", "param_count": "25.56", "crop_pct": "0.95", "interpolation": "bicubic"},
]
BENCH = [  # timm's benchmark CSV columns; both forms of MRConvNeXt-T in one run, and a row without accuracy
    {"model": "mrconvnext_tiny@fused", "infer_img_size": "224", "infer_samples_per_sec": "40", "infer_step_time":
     "400", "infer_batch_size": "16", "param_count": "28.2", "infer_gmacs": "4.6", "infer_macts": ""},
    {"model": "mrconvnext_tiny@unfused", "infer_img_size": "224", "infer_samples_per_sec": "12",
     "infer_step_time": "1333", "infer_batch_size": "16", "param_count": "28.4", "infer_gmacs": "9.0",
     "infer_macts": ""},
    {"model": "convnext_tiny", "infer_img_size": "224", "infer_samples_per_sec": "45", "infer_step_time": "355",
     "infer_batch_size": "16", "param_count": "28.59", "infer_gmacs": "4.47", "infer_macts": "13.44"},
    {"model": "convnext_small", "infer_img_size": "224", "infer_samples_per_sec": "25", "infer_step_time": "640",
     "infer_batch_size": "16", "param_count": "50.22", "infer_gmacs": "8.71", "infer_macts": "21.56"},
    {"model": "convnext_base", "infer_img_size": "224", "infer_samples_per_sec": "15", "infer_step_time": "1066",
     "infer_batch_size": "16", "param_count": "88.59", "infer_gmacs": "15.38", "infer_macts": "28.75"},
]


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # a truncated file fails here
        return img.size


def test_names_and_families():
    assert plot.base_name("convnext_tiny.fb_in1k") == "convnext_tiny"
    assert plot.base_name("mrconvnext_tiny@fused") == "mrconvnext_tiny"
    assert plot.family("mrconvnext_tiny@unfused") == "mrconvnext" and plot.family("convnext_small") == "convnext"
    assert plot.family("resnet50.a1_in1k") == "resnet"


def test_join_prefers_the_fused_form_and_lists_what_it_could_not_join():
    points, notes = plot.join(RESULTS, BENCH)
    by_label = {p.label: p for p in points}
    assert set(by_label) == {"convnext_tiny.fb_in1k", "convnext_small", "mrconvnext_tiny"}
    assert by_label["mrconvnext_tiny"].throughput == 40 and by_label["mrconvnext_tiny"].bench_model.endswith("@fused")
    assert by_label["mrconvnext_tiny"].family == "mrconvnext" and by_label["convnext_small"].gmacs == 8.71
    text = "\n".join(notes)
    assert "resnet50.a1_in1k" in text  # no throughput
    assert "convnext_tiny.fb_in1k_384 (384px" in text  # accuracy at another image size
    assert "convnext_base" in text  # throughput, no accuracy
    assert "not mrconvnext_tiny@unfused" in text


def test_pareto_front():
    P = plot.Point
    points = [P("a", "f", 80, 100, None, "a"), P("b", "f", 82, 50, None, "b"), P("c", "f", 79, 60, None, "c"),
              P("d", "g", 83, 10, None, "d"), P("e", "g", 82, 40, None, "e")]
    assert [points[i].label for i in plot.pareto_front(points)] == ["d", "b", "a"]


def test_accuracy_throughput_png_from_the_cli(tmp_path, capsys):
    out = tmp_path / "fig" / "acc.png"
    code = plot.main(["--results", write_csv(tmp_path / "r.csv", RESULTS), "--bench",
                      write_csv(tmp_path / "b.csv", BENCH), "--out", str(out), "--size", "640x480", "--title", "t"])
    assert code == 0 and png_size(out) == (640, 480)
    printed = capsys.readouterr().out
    assert "note: 1 results rows not benchmarked: resnet50.a1_in1k" in printed
    assert "Pareto fronts: convnext: convnext_small, convnext_tiny.fb_in1k; mrconvnext: mrconvnext_tiny" in printed


def test_figure_returns_both_families_their_fronts_and_the_unfused_throughput():
    points, _ = plot.join(RESULTS, BENCH)
    fig, drawn = plot.accuracy_throughput_figure(points, caption="NVIDIA H200, torch 2.11: batch 16, 224px, fp32")
    assert drawn["fronts"] == {"convnext": ["convnext_small", "convnext_tiny.fb_in1k"],
                               "mrconvnext": ["mrconvnext_tiny"]}
    by_label = {p["label"]: p for p in drawn["points"]}
    assert by_label["mrconvnext_tiny"]["throughput"] == 40 and by_label["mrconvnext_tiny"]["unfused_throughput"] == 12
    assert by_label["convnext_small"]["unfused_throughput"] is None
    assert by_label["convnext_small"]["area"] > by_label["convnext_tiny.fb_in1k"]["area"]  # 8.71 vs 4.47 GMACs
    ax = fig.axes[0]
    assert "NVIDIA H200" in ax.get_xlabel() and "CPU" not in ax.get_xlabel()
    assert ax.get_xlim()[0] < 12 and ax.get_xlim()[1] > 45  # the unfused point is inside
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert labels == [], "minor ticks carry no labels (they overlapped: '9000 10000')"
    assert [t.get_text() for t in ax.get_xticklabels()] == [plot._tick_label(v) for v in drawn["xticks"]]
    plot.plt.close(fig)


def test_accuracy_range_spans_at_least_one_point():
    lo, hi = plot.accuracy_limits([90.53, 90.54])  # the quickstart's pair: equal for all practical purposes
    assert hi - lo >= 1.0 and lo < 90.53 and hi > 90.54 and abs((lo + hi) / 2 - 90.535) < 1e-9
    lo, hi = plot.accuracy_limits([70.0, 80.0, 75.0])  # a real spread keeps its own scale, with label room
    assert (lo, hi) == pytest.approx((68.8, 81.2))
    points, _ = plot.join(RESULTS, BENCH)
    fig, drawn = plot.accuracy_throughput_figure(points)
    assert fig.axes[0].get_ylim() == pytest.approx(drawn["ylim"])
    assert all(drawn["ylim"][0] < p["top1"] < drawn["ylim"][1] for p in drawn["points"])
    plot.plt.close(fig)


@pytest.mark.parametrize("lo, hi", [(847, 1479), (9.6, 56), (2000, 120_000), (7000, 12_000), (8000, 100_000),
                                    (2500, 2800), (50, 5e6)])
def test_log_ticks_are_round_few_and_apart(lo, hi):
    ticks = plot.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 7, ticks
    assert all(lo <= t <= hi for t in ticks)
    gaps = np.diff(np.log10(ticks)) / np.log10(hi / lo)
    assert gaps.min() >= plot.MIN_TICK_GAP, ticks
    assert all(float(f"{t:.1g}") == t or t == round(t, -2) for t in ticks), ticks  # 1-2 significant digits


def test_caption_and_reference_family_from_the_cli(tmp_path, capsys):
    import json

    bench = write_csv(tmp_path / "b.csv", BENCH)
    (tmp_path / "b.csv.json").write_text(json.dumps({"machine": "NVIDIA H200, torch 2.11", "settings": {
        "batch_size": 256, "img_size": 224, "amp": "bf16", "channels_last": True, "compile": False, "threads": 0}}))
    assert plot.bench_caption([bench]) == "NVIDIA H200, torch 2.11: batch 256, 224px, bf16, channels_last"
    published = [dict(r, top1=str(float(r["top1"]) - 1)) for r in RESULTS[:3]]
    ref_bench = write_csv(tmp_path / "ref.csv", [dict(BENCH[2], infer_samples_per_sec="30"),
                                                 dict(BENCH[3], infer_samples_per_sec="20")])
    out = tmp_path / "acc.png"
    assert plot.main(["--results", write_csv(tmp_path / "r.csv", RESULTS), "--bench", bench, "--out", str(out),
                      "--reference-results", write_csv(tmp_path / "pub.csv", published), "--reference-bench",
                      ref_bench, "--size", "640x480"]) == 0
    printed = capsys.readouterr().out
    assert "convnext (reference): convnext_small, convnext_tiny.fb_in1k" in printed
    assert f"{ref_bench}: device and settings not recorded" in plot.bench_caption([bench, ref_bench])
    with pytest.raises(SystemExit, match="go together"):
        plot.main(["--results", str(tmp_path / "r.csv"), "--bench", bench, "--out", str(out),
                   "--reference-results", str(tmp_path / "pub.csv")])


def test_nothing_to_join_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no point to plot"):
        plot.main(["--results", write_csv(tmp_path / "r.csv", RESULTS[4:]), "--bench",
                   write_csv(tmp_path / "b.csv", BENCH), "--out", str(tmp_path / "x.png")])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=32, num_classes=10, min_l0=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv_dw.alpha"):
                p.uniform_(0, 1)  # distinct per block and resolution, as after training
    unfused, fused = root / "u.pth", root / "f.safetensors"
    torch.save(model.state_dict(), unfused)
    save_file({k: v.contiguous() for k, v in reparameterize_model(model).state_dict().items()}, str(fused))
    return model, str(unfused), str(fused)


MODEL = ["--model", "mrconvnext_atto", "--model-kwargs", '{"img_size": 32, "min_l0": 2}']


def test_alpha_norms_and_heat_map(checkpoints, tmp_path):
    model, unfused, _ = checkpoints
    stages, lengths = plot.alpha_norms(model)
    assert [s.shape[0] for s in stages] == [2, 2, 6, 2]  # atto depths
    layer = model.stages[2].blocks[1].conv_dw
    assert stages[2].shape[1] == layer.num_branches and lengths[2] == layer.lengths
    np.testing.assert_allclose(stages[2][1], layer.alpha.detach().pow(2).sum(1).numpy(), rtol=1e-6)
    out = tmp_path / "alpha.png"
    assert plot.main(["alpha", *MODEL, "--checkpoint", unfused, "--out", str(out), "--size", "800x300"]) == 0
    assert png_size(out) == (800, 300)


def test_kernels_of_unfused_and_fused_checkpoints(checkpoints, tmp_path):
    _, unfused, fused = checkpoints
    for name, ckpt, extra in (("u", unfused, []), ("f", fused, ["--inference-mode"])):
        out = tmp_path / f"k{name}.png"
        assert plot.main(["kernels", *MODEL, "--checkpoint", ckpt, *extra, "--out", str(out),
                          "--layer", "stages.1.blocks.0.conv_dw", "--size", "500x400"]) == 0
        assert png_size(out) == (500, 400)
    with pytest.raises(SystemExit, match="no MRConv layer 'nope'"):
        plot.main(["kernels", *MODEL, "--checkpoint", unfused, "--layer", "nope", "--out", str(tmp_path / "x.png")])


def test_lag_axis_puts_backward_lags_before_forward():
    kernel = np.array([[[1.0, 2.0, 3.0]], [[-1.0, -2.0, -3.0]]])  # (dirs, D, l): kb[0] is lag -1
    lags, values = plot.lag_axis(kernel)
    assert lags.tolist() == [-3, -2, -1, 0, 1, 2] and values[0].tolist() == [-3, -2, -1, 1, 2, 3]
