"""train.export's pure parts (the end-to-end export of a trained run is in tests/test_train.py, which owns the
run fixtures)."""
import json
import os

import pytest
import timm
import torch

import models  # noqa: F401
from train.export import MAX_REL_DIFF, load_call, max_rel_diff


def test_max_rel_diff_is_relative_to_the_reference_scale():
    ref = torch.tensor([[100.0, -50.0]])
    assert abs(max_rel_diff(ref + 1e-3, ref) - 1e-5) < 1e-7  # fp32 rounding of 100.001
    assert max_rel_diff(ref, ref) == 0.0 and MAX_REL_DIFF == 1e-4


def test_load_call_carries_classes_and_channels(tmp_path):
    """The printed call round-trips: without num_classes/input_size in the overlay timm would drop the head
    (num_classes != 1000) and re-"adapt" a 1-channel stem."""
    model = timm.create_model("mrconvnext_atto", num_classes=10, in_chans=1, img_size=32).eval()
    fused = timm.utils.reparameterize_model(model)
    out = str(tmp_path / "m.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, out)
    call = load_call("mrconvnext_atto", out, 10, 1, 32, {"img_size": 32}, inference_mode=True)
    loaded = eval(call, {"timm": timm}).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert max_rel_diff(loaded(x), model(x)) <= MAX_REL_DIFF


class _Payload:
    """What a crafted checkpoint holds: unpickling it runs a shell command (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_is_refused_by_export_and_evaluate(tmp_path, capsys):
    """A run directory whose model states file runs a command when unpickled (as DeepSpeed's reader would):
    export and evaluation refuse it with one line, and the payload never runs."""
    from pipelines.evaluate import read_state_dict
    from train import checkpoint as ckpt
    from train.config import load_config, to_dict
    from train.export import main as export_main

    marker = tmp_path / "pwned"
    tag_dir = tmp_path / "run" / "checkpoints" / ckpt.tag_for(1)
    tag_dir.mkdir(parents=True)
    (tag_dir / ckpt.META).write_text(json.dumps({"step": 1, "config": to_dict(load_config("fashion_mnist"))}))
    (tag_dir.parent / ckpt.LATEST).write_text(ckpt.tag_for(1))
    crafted = ckpt.model_states_file(str(tag_dir.parent), ckpt.tag_for(1))
    torch.save({"module": _Payload(marker)}, crafted)

    assert export_main([str(tmp_path / "run"), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export: error: refusing to load {crafted}: it asks to call posix.system") and \
        err.count("\n") == 1, err
    with pytest.raises(ValueError, match=r"^refusing to load .*: it asks to call posix.system") as exc:
        read_state_dict(str(crafted))
    assert "\n" not in str(exc.value)
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()
