"""MRConv layers and MRConvNeXt backbones. ``import models`` registers the ``mrconvnext_*`` family in timm."""
from .mrconv import KERNEL_PARAM_NAMES, MRConv
from .mrconvnext import MRConv2d, MRConvNeXt, check_state_dict, default_l0

__all__ = ["MRConv", "MRConv2d", "MRConvNeXt", "KERNEL_PARAM_NAMES", "check_state_dict", "default_l0"]
