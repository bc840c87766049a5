"""Shard writing: real image trees and idx files in tmp_path, real tars, timm's own wds reader."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines.data import shards
from tests.shard_helpers import fashion_mnist_idx, jpeg_bytes, write_idx


def make_imagefolder(root, classes=("n01", "n02", "n03"), per_class: int = 8, bad: bool = True) -> dict:
    """``root/<class>/<image>.JPEG``; returns {file stem: (bytes, class index)} of the good images.
    With ``bad``: a truncated JPEG, text named .JPEG, and a non-image file name are added to the first class."""
    good = {}
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            stem = f"{name}_{i}"
            data = jpeg_bytes(c * 1000 + i)
            with open(os.path.join(root, name, stem + ".JPEG"), "wb") as f:
                f.write(data)
            good[stem] = (data, c)
    if bad:
        first = os.path.join(root, classes[0])
        with open(os.path.join(first, "truncated.JPEG"), "wb") as f:
            f.write(jpeg_bytes(99)[:-200])  # header intact: only the end-of-image check notices
        with open(os.path.join(first, "text.JPEG"), "wb") as f:
            f.write(b"this is not an image")
        with open(os.path.join(first, "notes.txt"), "wb") as f:
            f.write(b"readme")
    return good


def read_shard(path) -> dict:
    """{key: {ext: bytes}} of a tar shard."""
    samples: dict = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def folder_files(root) -> dict:
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def test_imagefolder_shards_hold_original_bytes_and_skip_bad_files(tmp_path, capsys):
    good = make_imagefolder(tmp_path / "src")
    out = tmp_path / "out"
    assert shards.main(["imagefolder", str(tmp_path / "src"), str(out), "--shard-size", "5", "--workers", "2",
                        "--no-progress"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for bad in ("truncated.JPEG", "text.JPEG", "notes.txt"):
        assert bad in text
    assert "truncated JPEG" in text and "24 samples" in text and "3 skipped" in text and "images/s" in text

    info = json.loads((out / "_info.json").read_text())
    split = info["splits"]["train"]
    assert info["classes"] == ["n01", "n02", "n03"]
    assert split["name"] == "train" and split["num_samples"] == 24
    assert split["filenames"] == [f"train-{i:06d}.tar" for i in range(6)]  # 27 planned / 5 per shard
    assert sorted(os.listdir(out)) == sorted(split["filenames"] + ["_info.json"])

    seen = {}
    for name, length in zip(split["filenames"], split["shard_lengths"]):
        samples = read_shard(out / name)
        assert len(samples) == length
        seen.update(samples)
    assert len(seen) == 24
    for key, sample in seen.items():
        stem = key.split("_", 1)[1]
        data, label = good[stem]
        assert sample["jpg"] == data  # byte-identical, never re-encoded
        assert sample["cls"] == str(label).encode()
    labels_in_order = [int(s["cls"]) for s in read_shard(out / "train-000000.tar").values()]
    assert len(set(labels_in_order)) > 1  # shuffled before sharding


def test_timm_wds_reader_reads_our_shards(tmp_path):
    from timm.data import create_dataset

    make_imagefolder(tmp_path / "src", bad=False)
    out = tmp_path / "out"
    shards.main(["imagefolder", str(tmp_path / "src"), str(out), "--shard-size", "5", "--workers", "1",
                 "--no-progress"])
    ds = create_dataset("wds/tiny", root=str(out), split="train", is_training=False)
    items = list(ds)
    assert len(items) == 24
    assert all(isinstance(img, Image.Image) and img.size == (32, 32) for img, _ in items)
    assert sorted(t for _, t in items) == sorted([0] * 8 + [1] * 8 + [2] * 8)


def test_resume_after_interruption_is_byte_identical(tmp_path, capsys):
    make_imagefolder(tmp_path / "src")
    args = ["--shard-size", "4", "--workers", "2", "--no-progress"]
    shards.main(["imagefolder", str(tmp_path / "src"), str(tmp_path / "a"), *args])
    reference = folder_files(tmp_path / "a")

    b = tmp_path / "b"
    shards.main(["imagefolder", str(tmp_path / "src"), str(b), *args])
    os.remove(b / "train-000002.tar")
    with open(b / "train-000004.tar", "r+b") as f:
        f.truncate(2000)  # cut inside a member
    (b / "train-000001.tar.tmp").write_bytes(b"half a shard")
    (b / "_info.json").unlink()
    capsys.readouterr()

    shards.main(["imagefolder", str(tmp_path / "src"), str(b), *args])
    assert "5 of 7 shards already complete" in capsys.readouterr().out
    assert folder_files(b) == reference


def test_flat_validation_folder_with_label_file_reuses_train_classes(tmp_path):
    make_imagefolder(tmp_path / "train", bad=False)
    out = tmp_path / "out"
    common = ["--shard-size", "3", "--workers", "1", "--no-progress"]
    shards.main(["imagefolder", str(tmp_path / "train"), str(out), *common])
    val = tmp_path / "val"
    val.mkdir()
    lines = []
    for i, (wnid, label_text) in enumerate([("n03", "n03"), ("n01", "0"), ("n02", "n02"), ("n03", "2")]):
        (val / f"ILSVRC_val_{i}.JPEG").write_bytes(jpeg_bytes(500 + i))
        lines.append(f"ILSVRC_val_{i}.JPEG {label_text}")
    (val / "unlabelled.JPEG").write_bytes(jpeg_bytes(600))
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    shards.main(["imagefolder", str(val), str(out), "--split", "validation", "--labels",
                 str(tmp_path / "val.txt"), "--classes-from", str(out), *common])

    info = json.loads((out / "_info.json").read_text())
    assert sorted(info["splits"]) == ["train", "validation"]  # train kept by the merge
    assert info["splits"]["train"]["num_samples"] == 24
    assert info["splits"]["validation"]["num_samples"] == 4
    labels = {}
    for name in info["splits"]["validation"]["filenames"]:
        for key, sample in read_shard(out / name).items():
            labels[key.split("_", 1)[1]] = int(sample["cls"])
    assert labels == {"ILSVRC_val_0": 2, "ILSVRC_val_1": 0, "ILSVRC_val_2": 1, "ILSVRC_val_3": 2}


def test_fashion_mnist_idx_files_become_grayscale_png_splits(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "fm"
    src.mkdir()
    arrays = {"train": rng.integers(0, 255, (30, 28, 28)), "t10k": rng.integers(0, 255, (10, 28, 28))}
    for prefix, images in arrays.items():
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(len(images)) % 10)
    out = tmp_path / "out"
    assert shards.main(["fashion-mnist", str(src), str(out), "--shard-size", "8", "--workers", "2",
                        "--no-progress"]) == 0
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"][0] == "T-shirt/top" and len(info["classes"]) == 10
    assert info["splits"]["train"]["num_samples"] == 30
    assert info["splits"]["validation"]["num_samples"] == 10
    samples = read_shard(out / "validation-000000.tar")
    for key, sample in samples.items():
        index = int(key.split("_")[-1])
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), arrays["t10k"][index])
        assert int(sample["cls"]) == index % 10


def test_check_image_rejects_bad_bytes_without_decoding():
    assert shards.check_image(jpeg_bytes(1)) == "jpg"
    for data, reason in ((b"", "empty"), (b"GIF89a-no", "not a readable image"),
                         (jpeg_bytes(1)[:-200], "truncated JPEG")):
        with pytest.raises(ValueError, match=reason):
            shards.check_image(data)


def test_writing_into_a_folder_of_another_dataset_is_refused_before_any_file_is_touched(tmp_path, capsys):
    make_imagefolder(tmp_path / "src", bad=False)
    fashion_mnist_idx(tmp_path / "fm")
    common = ["--shard-size", "5", "--workers", "1", "--no-progress"]
    folder, fm_folder = tmp_path / "out", tmp_path / "fm_out"
    assert shards.main(["imagefolder", str(tmp_path / "src"), str(folder), *common]) == 0
    assert shards.main(["fashion-mnist", str(tmp_path / "fm"), str(fm_folder), *common]) == 0
    before = {f: folder_files(f) for f in (folder, fm_folder)}
    capsys.readouterr()

    assert shards.main(["fashion-mnist", str(tmp_path / "fm"), str(folder), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"imagefolder {tmp_path / 'src'}" in err and "n01, n02, n03" in err
    assert "another folder" in err and "--classes-from" not in err  # fashion-mnist has no such option
    # an imagefolder split whose classes are not the folder's: by default and with another --classes-from
    assert shards.main(["imagefolder", str(tmp_path / "src"), str(fm_folder), "--split", "validation",
                        *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"fashion-mnist {tmp_path / 'fm'}" in err and "T-shirt/top" in err
    assert shards.main(["imagefolder", str(tmp_path / "src"), str(fm_folder), "--split", "validation",
                        "--classes-from", str(folder), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--classes-from {fm_folder}" in err
    assert {f: folder_files(f) for f in (folder, fm_folder)} == before  # byte-identical, nothing added
