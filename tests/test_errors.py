"""A user's mistakes through the real command lines (subprocesses): each ends with exit code 2 and one line on
stderr that says what is wrong and how to fix it, never a traceback; the trainer's ones before any process group
or DeepSpeed starts (seconds, not minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
from safetensors.torch import save_file

import models  # noqa: F401
from tests.shard_helpers import write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
BAD_YAML = "model:\n  name: mrconvnext_atto\n  kwargs: {img_size: 48\ndata:\n  dir: x\n"


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def make_export(root) -> tuple[str, str]:
    """A fused mrconvnext_atto export with its side file, as train.export writes them, and the same weights as
    a plain .pth without one."""
    kwargs = {"img_size": 32, "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
    model = timm.create_model("mrconvnext_atto", num_classes=10, inference_mode=True, **kwargs)
    path = str(root / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    (root / "model.json").write_text(json.dumps({
        "model": "mrconvnext_atto", "kwargs": kwargs, "num_classes": 10, "in_chans": 3, "img_size": 32,
        "mean": None, "std": None, "interpolation": "bicubic", "crop_pct": 1.0, "inference_mode": True}))
    torch.save({"state_dict": model.state_dict()}, str(root / "plain.pth"))
    return path, str(root / "plain.pth")


# case -> (command after 'python -m', with {data}, {broken}, {empty}, {recipe}, {export}, {plain}, {fm} filled in;
#          what its one line must say)
TRAIN = ["train", "--config", "fashion_mnist", "--run-dir", "{root}/run", "--set", "data.num_workers=0"]
CASES = {
    "unknown model": (TRAIN + ["--set", "data.dir={data}", "--set", "model.name=mrconvnext_atoo"],
                      ["'mrconvnext_atoo' is not a timm model; did you mean 'mrconvnext_atto'"]),
    "negative num_workers": (TRAIN + ["--set", "data.dir={data}", "--set", "data.num_workers=-1"],
                             ["data.num_workers must be >= 0, got -1"]),
    "model.kwargs typo": (TRAIN + ["--set", "data.dir={data}", "--set", "model.kwargs.kernel_typ=fft"],
                          ["model.kwargs.kernel_typ: mrconvnext_atto takes no such argument; did you mean "
                           "'kernel_type'?"]),
    "too few shards": (TRAIN + ["--set", "data.dir={data}", "--set", "data.num_workers=5"],
                       ["4 shards but 1 ranks x 5 workers = 5 readers", "--set data.resampled=true"]),
    "missing split": (TRAIN + ["--set", "data.dir={data}", "--set", "data.val_split=test"],
                      ["split 'test' not in"]),
    "YAML syntax error": (["train", "--config", "{recipe}", "--set", "data.dir={data}"],
                          ["{recipe} is not valid YAML: line 4, column 5: expected ',' or '}}'"]),
    "missing _info.json": (TRAIN + ["--set", "data.dir={empty}"], ["{empty}/_info.json not found"]),
    "missing shard": (TRAIN + ["--set", "data.dir={broken}"],
                      ["train-000002.tar of split 'train' is missing", "python -m pipelines.data.shards"]),
    "evaluate another model's checkpoint": (
        ["pipelines.evaluate", "--model", "convnext_atto", "--checkpoint", "{plain}", "--data", "{data}",
         "--workers", "0"], ["different model than 'convnext_atto'", "missing"]),
    "evaluate another model's export": (
        ["pipelines.evaluate", "--model", "mrconvnext_femto", "--checkpoint", "{export}", "--data", "{data}",
         "--workers", "0"], ["holds mrconvnext_atto weights", "--model mrconvnext_atto"]),
    "shards into another dataset": (
        ["pipelines.data.shards", "fashion-mnist", "{fm}", "{data}", "--no-progress"],
        ["{data} holds another dataset (10 classes: 0, 1, 2, ...;", "nothing was written"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Every case run once, three at a time (each is mostly imports), against real folders and files."""
    from tests.shard_helpers import fashion_mnist_idx

    root = tmp_path_factory.mktemp("errors")
    paths = {"root": str(root), "data": str(root / "wds"), "broken": str(root / "broken"),
             "empty": str(root / "empty"), "recipe": str(root / "broken.yaml"), "fm": str(root / "fm")}
    for folder in (paths["data"], paths["broken"]):
        write_split(folder, "train", [8] * 4, num_classes=10)
        write_split(folder, "validation", [8] * 2, num_classes=10)
    os.remove(os.path.join(paths["broken"], "train-000002.tar"))
    os.makedirs(paths["empty"])
    (root / "broken.yaml").write_text(BAD_YAML)
    fashion_mnist_idx(root / "fm")
    paths["export"], paths["plain"] = make_export(root)
    with ThreadPoolExecutor(3) as pool:
        procs = {name: pool.submit(run_cli, [a.format(**paths) for a in argv]) for name, (argv, _) in CASES.items()}
        return {name: (proc.result(), [e.format(**paths) for e in CASES[name][1]]) for name, proc in procs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_mistake_ends_in_one_line_and_exit_2(results, case):
    proc, expected = results[case]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr
