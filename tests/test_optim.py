"""train/optim.py: the optimizer's parameter groups on a real (tiny) MRConvNeXt."""
from __future__ import annotations

import timm

import models  # noqa: F401
from train.optim import param_groups


def test_param_groups_separate_mrconv_kernels_from_norms_and_weights():
    model = timm.create_model("mrconvnext_atto", img_size=32, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.05, kernel_lr=1e-4)}
    names = {id(p): n for n, p in model.named_parameters()}
    kernel = {names[id(p)] for p in groups["kernel"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert "stages.0.blocks.0.conv_dw.alpha" in kernel and "stages.0.blocks.0.conv_dw.fourier_modes" in kernel
    assert "stages.0.blocks.0.conv_dw.norm.weight" in no_decay and "head.fc.bias" in no_decay
    assert "stages.0.blocks.0.mlp.fc1.weight" in decay and "head.fc.weight" in decay
    assert (groups["kernel"]["lr"], groups["kernel"]["weight_decay"]) == (1e-4, 0.0)
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(kernel) + len(no_decay) + len(decay) == len(list(model.parameters()))
