"""train/checkpoint.py on its own (no launch): tags, pruning and the `latest` pointer. Resuming from real
checkpoints (truncated, crafted, of another config) is end to end in tests/test_train.py."""
from __future__ import annotations

import os

from train import checkpoint as ckpt


def test_prune_keeps_latest_and_ignores_unfinished(tmp_path):
    d = str(tmp_path)
    for step in (4, 8, 12, 16):
        os.makedirs(os.path.join(d, ckpt.tag_for(step)))
        if step != 16:  # 16: a save that crashed before meta.json/latest were written
            open(os.path.join(d, ckpt.tag_for(step), ckpt.META), "w").write("{}")
    open(os.path.join(d, ckpt.LATEST), "w").write(ckpt.tag_for(12))
    ckpt.prune(d, keep=2)
    assert sorted(os.listdir(d)) == ["latest", ckpt.tag_for(8), ckpt.tag_for(12), ckpt.tag_for(16)]
    assert ckpt.latest_tag(d) == ckpt.tag_for(12)
