"""train.export's pure parts (the end-to-end export of a trained run is in tests/test_train.py, which owns the
run fixtures)."""
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
