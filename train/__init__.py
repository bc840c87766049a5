"""DeepSpeed training of timm image models (MRConvNeXt first): ``python -m train --config CONFIG``.

config.py (the run's config tree), distributed.py (world info from the launcher), engine.py (DeepSpeed config
and engine), optim.py (param groups, AdamW, schedule), loop.py (one epoch), evaluate.py (distributed top-1/5),
checkpoint.py (crash-safe save/resume), logger.py (TensorBoard, progress), main.py (orchestration),
export.py (fold and write safetensors), files.py (files replaced whole).
"""
