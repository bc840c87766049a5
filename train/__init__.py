"""DeepSpeed training of timm image models (MRConvNeXt first): ``python -m train --config CONFIG``.

config.py (the run's config tree), distributed.py (world info from the launcher), engine.py (DeepSpeed config
and engine), optim.py (param groups, AdamW, schedule), loop.py (one epoch), evaluate.py (distributed top-1/5),
checkpoint.py (crash-safe save/resume), logger.py (TensorBoard, progress), loaders.py (the data section to the
loaders), workers.py and worker_server.py (how the loaders' workers start), main.py (orchestration), export.py (fold
and write safetensors). Data comes from the library in ``pipelines/data/``.
"""
