"""Shared by the end-to-end tests: a real shard folder (a slice of the packaged Fashion-MNIST, written by
pipelines.data.shards) and the comparison of a run's final weights with another run's."""
from __future__ import annotations

import os

# Without a GPU the Triton kernels run under Triton's interpreter. It is chosen when a kernel (and Triton's own
# library functions) are decorated, so it must be set before anything imports triton (torch may, on import).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint as ckpt

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# `pipelines.benchmark models` at its smallest: one timed iteration at 32 px, batch 2
BENCH_TINY = ["--img-size", "32", "--batch-size", "2", "--warmup", "1", "--iters", "1", "--rounds", "1"]
TRAIN_SAMPLES, VAL_SAMPLES, SHARD_SIZE = 256, 96, 32


def require(ok: bool, reason: str) -> None:
    """Skip when a system prerequisite is missing, except in CI (CI set), where that would hide the tests
    that need it: scripts/setup.sh installs the Debian packages there."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: these tests must not be skipped)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def fashion_mnist_train() -> tuple[np.ndarray, np.ndarray]:
    from pipelines.data.shards import read_idx
    require(os.path.isdir(FASHION_MNIST),
            f"{FASHION_MNIST} missing (Debian package dataset-fashion-mnist; scripts/setup.sh installs it)")
    return (read_idx(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")),
            read_idx(os.path.join(FASHION_MNIST, "train-labels-idx1-ubyte.gz")))


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """A real shard folder: TRAIN_SAMPLES/VAL_SAMPLES Fashion-MNIST images as class folders, written with
    pipelines.data.shards in shards of SHARD_SIZE."""
    from pipelines.data.shards import main as shards_main
    images, labels = fashion_mnist_train()
    root = tmp_path_factory.mktemp("fmnist")
    out = str(root / "wds")
    for split, start, n in (("train", 0, TRAIN_SAMPLES), ("validation", 10_000, VAL_SAMPLES)):
        for i in range(start, start + n):
            folder = root / "src" / split / f"c{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
        assert shards_main(["imagefolder", str(root / "src" / split), out, "--split", split, "--shard-size",
                            str(SHARD_SIZE), "--workers", "1", "--no-progress"]) == 0
    return out


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    ckpt_dir = ckpt.checkpoint_dir(str(run_dir))
    return ckpt.model_weights(ckpt_dir, ckpt.latest_tag(ckpt_dir))


def assert_same_model(a: dict, b: dict) -> None:
    """Weights: max abs diff <= 1e-6 (in practice bit-identical: a resumed run and an uninterrupted one; each ZeRO
    stage and ZeRO-0). BN running statistics: relative 1e-6, because the SIGUSR1 stop saves off the every_steps
    schedule, and every save averages BN statistics across ranks in place (as timm does): averaging commutes with
    the running-average update, so the final statistics agree up to re-associated float sums (1 ulp, e.g. 6e-5 on
    a running_var of 1,175)."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        if "running_" in k:
            assert diff <= 1e-6 * max(1.0, a[k].double().abs().max().item()), (k, diff)
        else:
            assert diff <= 1e-6, (k, diff)
