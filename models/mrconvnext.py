"""MRConvNeXt: ConvNeXt with every 7x7 depthwise conv replaced by a bidirectional MRConv over the row-major
flattened feature map.

Paper: "Reparameterized Multi-Resolution Convolutions for Long Sequence Modelling" (Cunningham, Giannone, Zhang,
Deisenroth; NeurIPS 2024) - https://arxiv.org/abs/2408.09453

Everything but the token mixer is timm's ConvNeXt (stem, downsampling, blocks, heads, feature extraction,
gradient checkpointing), so the model keeps the whole timm interface. The kernels are laid out for the input size
of the model's config (``img_size``); other input sizes work (kernels are truncated or see part of the sequence).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .mrconv import KERNEL_PARAM_NAMES, MRConv

__all__ = ["MRConvNeXt", "MRConv2d", "STAGE_L0", "KERNEL_PARAM_NAMES", "default_l0", "check_state_dict"]

# The paper's initial kernel lengths at 224x224 (stage sequence lengths 3136, 784, 196, 49).
STAGE_L0 = (196, 49, 28, 28)


def default_l0(seq_lens: Sequence[int], max_resolutions: int = 5, min_l0: int = 28) -> tuple[int, ...]:
    """Initial kernel length per stage: enough to reach the global length in ``max_resolutions`` doublings,
    but at least ``min_l0`` taps (clipped to the sequence). Gives ``STAGE_L0`` at 224."""
    return tuple(min(max(math.ceil(n / 2 ** (max_resolutions - 1)), min_l0), n) for n in seq_lens)


class MRConv2d(MRConv):
    """MRConv over a ``(B, C, H, W)`` feature map flattened row-major to ``(B, C, H*W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.ndim != 4:
            raise ValueError(f"MRConv2d expects (batch, {self.dim}, height, width), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        return super().forward(x.reshape(b, c, h * w)).view(b, c, h, w)


class MRConvNeXt(ConvNeXt):
    """ConvNeXt with MRConv token mixers.

    Args (beyond timm's ``ConvNeXt``):
        img_size: input size the kernels are laid out for (``int`` or ``(H, W)``).
        kernel_type: MRConv kernel parameterization (``fourier_sparse`` by default, as the paper's best).
        l0: initial kernel length per stage; ``None`` derives it from the stage lengths (``default_l0``).
        max_resolutions: at most this many branches per layer.
        min_l0: smallest initial kernel when ``l0`` is derived.
        n_modes, n_sparse, conv_impl: passed to every ``MRConv``.
        inference_mode: build the fused (reparameterized) form, to load a fused checkpoint.
        device, dtype: as timm's ``ConvNeXt``; the MRConv layers are created there too (``device="meta"``
            builds the whole model without memory).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        kernel_type: str = "fourier_sparse",
        l0: Sequence[int] | None = None,
        max_resolutions: int = 5,
        min_l0: int = 28,
        n_modes: int = 8,
        n_sparse: int = 8,
        conv_impl: str = "auto",
        inference_mode: bool = False,
        patch_size: int = 4,
        output_stride: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        if output_stride != 32:
            raise ValueError("MRConvNeXt supports output_stride=32 only (the kernels follow the stage lengths)")
        super().__init__(patch_size=patch_size, output_stride=output_stride, device=device, dtype=dtype, **kwargs)
        height, width = to_2tuple(img_size)
        # Each stage's real stride (timm's stem + stage-0 downsample reach 4 whatever the patch size).
        reductions = [info["reduction"] for info in self.feature_info]
        seq_lens = [max(height // r, 1) * max(width // r, 1) for r in reductions]
        l0 = tuple(l0) if l0 is not None else default_l0(seq_lens, max_resolutions, min_l0)
        if len(l0) != len(self.stages):
            raise ValueError(f"MRConvNeXt: l0 needs one value per stage ({len(self.stages)}), got {l0}")
        self.img_size, self.kernel_type, self.l0 = (height, width), kernel_type, l0
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage.blocks):
                dim = block.conv_dw.in_channels
                block.conv_dw = MRConv2d(
                    dim, seq_lens[s], min(l0[s], seq_lens[s]), kernel_type=kernel_type, bidirectional=True,
                    max_resolutions=max_resolutions, n_modes=n_modes, n_sparse=n_sparse, seed=1000 * s + b,
                    conv_impl=conv_impl, inference_mode=inference_mode, device=device, dtype=dtype)

    @property
    def inference_mode(self) -> bool:
        return all(m.inference_mode for m in self.modules() if isinstance(m, MRConv))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_state_dict(model: MRConvNeXt, state_dict: Mapping[str, torch.Tensor], ignore_prefix: str | None = None
                     ) -> None:
    """Fail with a message that says what is wrong when a checkpoint does not fit the model: the other form
    (fused vs training branches), or another model (different keys or shapes). Keys under ``ignore_prefix`` (the
    classifier, when timm adapts it to another ``num_classes``) are not compared."""
    own = model.state_dict()
    if ignore_prefix:
        own = {k: v for k, v in own.items() if not k.startswith(ignore_prefix)}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefix)}
    fused_ckpt = any(k.endswith("conv_dw.weight") and v.ndim == 3 for k, v in state_dict.items())
    branch_ckpt = any(k.endswith("conv_dw.alpha") for k in state_dict)
    if model.inference_mode and branch_ckpt and not fused_ckpt:
        raise ValueError("checkpoint holds the training form (MRConv branches) but the model was built with "
                         "inference_mode=True: build it with inference_mode=False, or export the fused weights "
                         "first (python -m train.export)")
    if not model.inference_mode and fused_ckpt and not branch_ckpt:
        raise ValueError("checkpoint holds the fused (reparameterized) form but the model was built for training: "
                         "build it with inference_mode=True")
    details = state_dict_mismatch(own, state_dict)
    if details:
        raise ValueError(f"checkpoint is for a different model than {_model_name(model)!r} "
                         f"({model.kernel_type}, img_size {model.img_size}): {details}")


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> str:
    """How a checkpoint's keys and shapes differ from a model's, in one line ('' when they fit)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    return "; ".join(filter(None, [
        f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
        f"{len(shapes)} with other shapes (e.g. {shapes[0]})" if shapes else ""]))


def _model_name(model: MRConvNeXt) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MRConvNeXt) -> Mapping[str, torch.Tensor]:
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    check_state_dict(model, state_dict, ignore_prefix=model.pretrained_cfg.get("classifier"))
    return state_dict


def _create_mrconvnext(variant: str, pretrained: bool = False, **kwargs) -> MRConvNeXt:
    if "img_size" in kwargs:  # the config's input size follows the layout, so timm's data config picks it
        height, width = to_2tuple(kwargs["img_size"])
        reduction = 32  # ConvNeXt's total stride, whatever the patch size
        overlay = dict(input_size=(kwargs.get("in_chans", 3), height, width),
                       pool_size=(max(height // reduction, 1), max(width // reduction, 1)))
        kwargs["pretrained_cfg_overlay"] = overlay | (kwargs.get("pretrained_cfg_overlay") or {})
    return build_model_with_cfg(
        MRConvNeXt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.95, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head.fc", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "mrconvnext_atto.untrained": _cfg(),
    "mrconvnext_femto.untrained": _cfg(),
    "mrconvnext_pico.untrained": _cfg(),
    "mrconvnext_nano.untrained": _cfg(),
    "mrconvnext_tiny.untrained": _cfg(),
    "mrconvnext_small.untrained": _cfg(),
    "mrconvnext_base.untrained": _cfg(),
})



@register_model
def mrconvnext_atto(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-Atto (timm's ConvNeXt-Atto layout): small, for CPU work and tests. Cunningham et al., 2024."""
    args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_atto", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_femto(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-Femto (timm's ConvNeXt-Femto layout). Cunningham et al., 2024."""
    args = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_femto", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_pico(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-Pico (timm's ConvNeXt-Pico layout). Cunningham et al., 2024."""
    args = dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_pico", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_nano(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-Nano (timm's ConvNeXt-Nano layout). Cunningham et al., 2024."""
    args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_nano", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_tiny(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-T: ConvNeXt-T depths/widths, l0 = (196, 49, 28, 28) at 224. Cunningham et al., NeurIPS 2024."""
    args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_mrconvnext("mrconvnext_tiny", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_small(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-S: ConvNeXt-S depths/widths, l0 = (196, 49, 28, 28) at 224. Cunningham et al., NeurIPS 2024."""
    args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_mrconvnext("mrconvnext_small", pretrained, **dict(args, **kwargs))


@register_model
def mrconvnext_base(pretrained: bool = False, **kwargs) -> MRConvNeXt:
    """MRConvNeXt-B: ConvNeXt-B depths/widths, l0 = (196, 49, 28, 28) at 224. Cunningham et al., NeurIPS 2024."""
    args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_mrconvnext("mrconvnext_base", pretrained, **dict(args, **kwargs))
