"""MRConv layers and MRConvNeXt backbones. ``import models`` registers the ``mrconvnext_*`` family in timm."""
from .mrconv import MRConv

__all__ = ["MRConv"]
