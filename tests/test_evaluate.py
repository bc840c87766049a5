"""pipelines.evaluate: timm's results CSV schema, checkpoint formats, and fused == unfused top-1 on real shards."""
from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.utils import reparameterize_model

import models  # noqa: F401
from pipelines import evaluate, tables
from pipelines.data import shards

NUM_CLASSES = 10
TIMM_RESULTS_COLUMNS = ["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct",
                        "interpolation"]


def class_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB images whose colour tells the class (learnable in a few steps), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    colours = np.random.default_rng(0).integers(0, 255, (NUM_CLASSES, 3))
    images = np.clip(colours[labels][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3)), 0, 255)
    return images.astype(np.uint8), labels


def write_shards(root: str, images: np.ndarray, labels: np.ndarray, per_shard: int = 16) -> None:
    """Tar members ``{key}.png`` + ``{key}.cls`` and a timm-style ``_info.json``, with the real shard writer."""
    names, lengths = [], []
    for s, start in enumerate(range(0, len(images), per_shard)):
        members = []
        for i in range(start, min(start + per_shard, len(images))):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            members += [(f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.cls", str(int(labels[i])).encode())]
        names.append(shards.shard_name("validation", s))
        lengths.append(len(members) // 2)
        shards.write_tar(os.path.join(root, names[-1]), members)
    shards.update_info(root, "validation", {"name": "validation", "num_samples": len(images), "filenames": names,
                                            "shard_lengths": lengths}, [f"c{c}" for c in range(NUM_CLASSES)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards + an unfused .pth (under 'state_dict') and a fused .safetensors of a model trained a few steps
    (BN statistics moved, layer scale 1.0 so the MRConv mixers matter)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "shards")
    os.makedirs(data)
    images, labels = class_images(40, seed=1)
    write_shards(data, images, labels)
    model = timm.create_model("mrconvnext_atto", img_size=32, num_classes=NUM_CLASSES, ls_init_value=1.0, min_l0=2)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(6):
        idx = torch.randperm(len(x))[:20]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    bn = model.stages[0].blocks[0].conv_dw.norm
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # statistics really moved
    unfused = str(root / "unfused.pth")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, unfused)
    fused = str(root / "fused.safetensors")
    save_file({k: v.contiguous() for k, v in reparameterize_model(model).state_dict().items()}, fused)
    return {"data": data, "unfused": unfused, "fused": fused, "root": root}


COMMON = ["--model", "mrconvnext_atto", "--model-kwargs", '{"img_size": 32, "ls_init_value": 1.0, "min_l0": 2}',
          "--img-size", "32", "--crop-pct", "1.0", "--batch-size", "16", "--workers", "0"]


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_fused_and_unfused_checkpoints_give_the_same_top1(trained, capsys):
    out = str(trained["root"] / "results.csv")
    runs = [("unfused", ["--checkpoint", trained["unfused"]]),
            ("unfused-reparam", ["--checkpoint", trained["unfused"], "--reparam"]),
            ("fused", ["--checkpoint", trained["fused"], "--inference-mode"])]
    for name, extra in runs:
        assert evaluate.main(COMMON + extra + ["--data", trained["data"], "--results", out, "--name", name]) == 0
    assert "summary:" in capsys.readouterr().out
    columns, rows = read_rows(out)
    assert columns == TIMM_RESULTS_COLUMNS  # header written once, timm's exact columns
    assert [r["model"] for r in rows] == ["unfused", "unfused-reparam", "fused"]
    assert len({r["top1"] for r in rows}) == 1 and len({r["top5"] for r in rows}) == 1
    top1 = float(rows[0]["top1"])
    assert top1 > 100.0 / NUM_CLASSES  # the model learned something: a same top-1 by chance is unlikely
    assert float(rows[0]["top1_err"]) == pytest.approx(100 - top1)
    assert rows[0]["img_size"] == "32" and rows[0]["crop_pct"] == "1.000" and rows[0]["interpolation"] == "bicubic"
    assert float(rows[2]["param_count"]) < float(rows[0]["param_count"])  # the fused form has fewer params


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_loading_a_fused_checkpoint_into_the_training_form_fails_clearly(trained, capsys):
    assert evaluate.main(COMMON + ["--checkpoint", trained["fused"], "--data", trained["data"]]) == 2
    assert "inference_mode=True" in one_line_error(capsys)


def test_missing_checkpoint_or_data_fail_clearly(trained, tmp_path, capsys):
    assert evaluate.main(COMMON + ["--checkpoint", str(tmp_path / "none.pth"), "--data", trained["data"]]) == 2
    assert "checkpoint" in one_line_error(capsys)
    assert evaluate.main(COMMON + ["--checkpoint", trained["unfused"], "--data", str(tmp_path / "nodata")]) == 2
    assert "data folder" in one_line_error(capsys)
    os.makedirs(tmp_path / "empty")
    assert evaluate.main(COMMON + ["--checkpoint", trained["unfused"], "--data", str(tmp_path / "empty")]) == 2
    assert "_info.json not found" in one_line_error(capsys)


def test_another_models_checkpoint_or_a_pickle_fail_in_one_line(trained, tmp_path, capsys):
    other = ["--model", "convnext_atto", "--img-size", "32", "--workers", "0"]
    assert evaluate.main(other + ["--checkpoint", trained["unfused"], "--data", trained["data"]]) == 2
    assert "different model than 'convnext_atto'" in one_line_error(capsys)
    assert evaluate.main(COMMON[:1] + ["mrconvnext_atoo"] + COMMON[2:] + ["--checkpoint", trained["unfused"],
                                                                         "--data", trained["data"]]) == 2
    assert "did you mean 'mrconvnext_atto'" in one_line_error(capsys)
    crafted = str(tmp_path / "crafted.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": os.getcwd}, crafted)  # a callable: code on load
    assert evaluate.main(COMMON + ["--checkpoint", crafted, "--data", trained["data"]]) == 2
    assert "refused" in one_line_error(capsys)


def test_state_dict_wrappers_are_unwrapped(tmp_path):
    sd = {"w": torch.ones(2)}
    for i, wrapped in enumerate(({"model": sd}, {"module": {"module.w": torch.ones(2)}}, sd)):
        path = str(tmp_path / f"{i}.pt")
        torch.save(wrapped, path)
        assert list(evaluate.read_state_dict(path)) == ["w"]


def test_results_row_matches_timm_and_header_is_written_once(tmp_path):
    row = evaluate.results_row("m.tag", 224, 821, 959, 1000, 28_589_128, 0.95, "bicubic")
    assert list(row) == TIMM_RESULTS_COLUMNS
    assert (row["top1"], row["top1_err"], row["top5_err"], row["param_count"]) == ("82.100", "17.900", "4.100",
                                                                                   "28.59")
    path = str(tmp_path / "r.csv")
    tables.append_rows(path, tables.RESULTS_COLUMNS, [row])
    tables.append_rows(path, tables.RESULTS_COLUMNS, [row])
    with open(path) as f:
        assert f.read().count("model,img_size") == 1
    with pytest.raises(ValueError, match="columns"):
        tables.append_rows(path, ("model", "x"), [{"model": "a", "x": 1}])


def test_export_side_file_supplies_the_defaults(trained, tmp_path, capsys):
    """Next to a checkpoint written by ``python -m train.export``: model kwargs, form and preprocessing come from
    its side file, so the command needs only model, checkpoint and data."""
    import json
    import shutil

    ckpt = str(tmp_path / "exported.safetensors")
    shutil.copy(trained["fused"], ckpt)
    (tmp_path / "exported.json").write_text(json.dumps({
        "model": "mrconvnext_atto", "kwargs": {"img_size": 32, "ls_init_value": 1.0, "min_l0": 2},
        "num_classes": NUM_CLASSES, "in_chans": 3, "img_size": 32, "mean": None, "std": None,
        "interpolation": "bicubic", "crop_pct": 1.0, "inference_mode": True}))
    out = str(tmp_path / "r.csv")
    assert evaluate.main(["--model", "mrconvnext_atto", "--checkpoint", ckpt, "--data", trained["data"],
                          "--workers", "0", "--results", out]) == 0
    reference = str(tmp_path / "ref.csv")
    evaluate.main(COMMON + ["--checkpoint", trained["unfused"], "--data", trained["data"], "--results", reference])
    assert read_rows(out)[1][0]["top1"] == read_rows(reference)[1][0]["top1"]
    assert "(fused," in capsys.readouterr().out
    # the side file names the model: another --model would report another model's accuracy for these weights
    assert evaluate.main(["--model", "mrconvnext_femto", "--checkpoint", ckpt, "--data", trained["data"],
                          "--workers", "0"]) == 2
    assert "holds mrconvnext_atto weights" in one_line_error(capsys)
