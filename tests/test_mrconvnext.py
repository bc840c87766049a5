"""MRConvNeXt as a timm model family: registration, the timm interface, exact fusion, checkpoints of both forms."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import reparameterize_model

import models
from models import MRConv, MRConvNeXt

torch.set_num_threads(2)
VARIANTS = ["atto", "femto", "pico", "nano", "tiny", "small", "base"]
PAPER_PARAMS_M = {"tiny": 28.6, "small": 50.2, "base": 88.6}  # ConvNeXt-T/S/B


SMALL = dict(img_size=32, num_classes=5, depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), ls_init_value=1.0, min_l0=2,
             conv_mlp=True)


def small_model(**kwargs) -> MRConvNeXt:
    """A 4-stage model at 32x32 whose mixers matter (layer scale 1, not 1e-6), for fast exact tests."""
    return MRConvNeXt(**(SMALL | kwargs))


def train_steps(model: torch.nn.Module, steps: int = 3, size: int = 32) -> torch.nn.Module:
    """Real optimizer steps in train mode so weights and every BN's running statistics move."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, size, size) * 2 + 0.5
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, model.num_classes, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_registered_and_trains_at_a_small_size(variant):
    name = f"mrconvnext_{variant}"
    assert name in timm.list_models("mrconvnext_*")
    model = timm.create_model(name, num_classes=7, img_size=32, drop_path_rate=0.1, kernel_type="fourier_sparse")
    assert model.pretrained_cfg["architecture"] == name and model.default_cfg["num_classes"] == 1000
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_paper_sizes_follow_convnext(variant):
    model = timm.create_model(f"mrconvnext_{variant}")
    assert model.l0 == (196, 49, 28, 28)
    first = model.stages[0].blocks[0].conv_dw
    assert isinstance(first, MRConv) and first.kernel_type == "fourier_sparse" and first.bidirectional
    assert [b.conv_dw.num_branches for b in (s.blocks[0] for s in model.stages)] == [5, 5, 4, 2]
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m / PAPER_PARAMS_M[variant] - 1) < 0.05, params_m


@pytest.mark.parametrize("img_size, patch_size", [(64, 4), (64, 2), (96, 4)])
def test_kernels_are_laid_out_for_the_real_stage_lengths(img_size, patch_size):
    model = timm.create_model("mrconvnext_atto", img_size=img_size, patch_size=patch_size).eval()
    _, feats = model.forward_intermediates(torch.randn(1, 3, img_size, img_size))
    for stage, feat in zip(model.stages, feats):
        assert stage.blocks[0].conv_dw.seq_len == feat.shape[-2] * feat.shape[-1]


def test_default_l0_reproduces_the_paper_at_224():
    assert models.default_l0([3136, 784, 196, 49]) == (196, 49, 28, 28)


@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated", "dense"])
def test_reparameterize_model_gives_the_same_outputs(kernel_type):
    model = train_steps(small_model(kernel_type=kernel_type))
    fused = reparameterize_model(model)
    assert fused.inference_mode and not model.inference_mode  # a copy; the original keeps its branches
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert rel_err(out, ref) <= 1e-5
        # other input sizes than the layout size work, fused and not
        x = torch.randn(2, 3, 48, 40)
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_fused_checkpoint_loads_through_timm_in_inference_mode(tmp_path):
    model = train_steps(small_model())
    fused = reparameterize_model(model)
    path = tmp_path / "fused.safetensors"
    save_file(fused.state_dict(), str(path))
    args = dict(img_size=32, num_classes=5, depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), ls_init_value=1.0, min_l0=2)
    assert set(args) | {"conv_mlp"} == set(SMALL)  # the same architecture as small_model()
    # num_classes in the overlay: timm keeps the checkpoint's classifier (otherwise it re-initializes it)
    loaded = timm.create_model("mrconvnext_atto", pretrained=True, inference_mode=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **args)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), fused(x))

    with pytest.raises(ValueError, match="fused .* built for training: build it with inference_mode=True"):
        timm.create_model("mrconvnext_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args)
    unfused_path = tmp_path / "unfused.safetensors"
    save_file(model.state_dict(), str(unfused_path))
    with pytest.raises(ValueError, match="training form .* inference_mode=True"):
        timm.create_model("mrconvnext_atto", pretrained=True, inference_mode=True,
                          pretrained_cfg_overlay=dict(file=str(unfused_path)), **args)
    with pytest.raises(ValueError, match="different model than 'mrconvnext_femto'"):
        timm.create_model("mrconvnext_femto", pretrained=True, inference_mode=True, img_size=32, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_features_only_and_intermediates_have_the_right_shapes():
    feats = timm.create_model("mrconvnext_atto", features_only=True, out_indices=(1, 3), img_size=64)
    outs = feats(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 80, 8, 8), (2, 320, 2, 2)]
    assert feats.feature_info.channels() == [80, 320] and feats.feature_info.reduction() == [8, 32]

    model = timm.create_model("mrconvnext_atto", img_size=64, num_classes=3)
    final, inter = model.forward_intermediates(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in inter] == [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
    assert final.shape == (2, 320, 2, 2)
    assert model.forward_head(final, pre_logits=True).shape == (2, 320)
    assert [i["num_chs"] for i in model.feature_info] == [40, 80, 160, 320]


def test_config_follows_the_layout_size_and_channels_last_works():
    model = timm.create_model("mrconvnext_atto", img_size=96, patch_size=2, in_chans=1, num_classes=3)
    assert model.pretrained_cfg["input_size"] == (1, 96, 96) and model.pretrained_cfg["pool_size"] == (3, 3)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (1, 96, 96)
    model = model.to(memory_format=torch.channels_last).eval()  # timm's --channels-last
    x = torch.randn(2, 1, 96, 96).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(timm.utils.reparameterize_model(model)(x), ref, rtol=1e-5, atol=1e-5)


def test_head_and_grouping_interface():
    model = timm.create_model("mrconvnext_atto", img_size=32, num_classes=4)
    assert model.get_classifier().out_features == 4
    model.reset_classifier(9)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 9)
    groups = model.group_matcher()
    assert "stem" in groups and "blocks" in groups


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_kernel_parameters_are_named_for_optimizer_groups():
    model = small_model()
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in models.KERNEL_PARAM_NAMES]
    assert names and all(".conv_dw." in n for n in names)
    assert any(n.endswith("conv_dw.alpha") for n in names) and any(n.endswith("fourier_modes") for n in names)


def test_bad_arguments_say_what_is_expected():
    with pytest.raises(ValueError, match="unknown kernel_type"):
        timm.create_model("mrconvnext_atto", kernel_type="gaussian")
    with pytest.raises(ValueError, match="one value per stage"):
        timm.create_model("mrconvnext_atto", l0=(28, 28))
    with pytest.raises(ValueError, match="output_stride=32"):
        timm.create_model("mrconvnext_atto", output_stride=16)
    with torch.no_grad():
        assert math.isfinite(float(small_model().eval()(torch.randn(1, 3, 32, 32)).sum()))  # batch size 1


@pytest.mark.parametrize("inference_mode", [False, True])
def test_factory_device_and_dtype_reach_every_parameter(inference_mode):
    """As timm's ConvNeXt: create_model(..., device="meta") allocates nothing, dtype=float64 builds in float64."""
    meta = timm.create_model("mrconvnext_atto", img_size=32, device="meta", inference_mode=inference_mode)
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    model = timm.create_model("mrconvnext_atto", img_size=32, dtype=torch.float64, inference_mode=inference_mode)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
