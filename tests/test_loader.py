"""pipelines.data.loader: the assignment math at ImageNet scale, and real loaders with worker processes on tiny
shards."""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
import torch

from pipelines.data import loader as data
from tests.shard_helpers import write_split


def epoch_targets(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [t for _, targets in loader for t in targets.tolist()]


# ----------------------------------------------------------------------------------------------------------
# pure math


def test_imagenet_scale_assignment_every_shard_once_and_equal_batches():
    num_samples, nodes, gpus = 1_281_167, 32, 8
    world = nodes * gpus
    for shard_size, workers in ((1000, 4), (625, 8)):  # 1,282 shards / 1,024 readers; 2,050 / 2,048
        num_shards = -(-num_samples // shard_size)
        names = [f"train-{i:06d}.tar" for i in range(num_shards)]
        assert num_shards >= world * workers
        for epoch in (0, 1):
            counts = Counter()
            for rank in range(world):
                for worker in range(workers):
                    counts.update(data.assign_shards(names, epoch, 0, rank, world, workers, worker))
            assert len(counts) == num_shards and set(counts.values()) == {1}
        rank_batches = data.batches_per_rank(num_samples, 256, world)
        assert rank_batches == num_samples // (256 * world) == 19
        for rank in range(world):  # workers' quotas add up to the same count on every rank
            assert sum(data.batches_per_worker(rank_batches, workers, w) for w in range(workers)) == rank_batches
    epoch0 = data.assign_shards(names, 0, 0, 5, world, 8, 3)
    assert epoch0 == data.assign_shards(names, 0, 0, 5, world, 8, 3) != data.assign_shards(names, 1, 0, 5,
                                                                                          world, 8, 3)
    # 1,000-sample shards on 32 x 8 GPUs x 8 workers: 1,282 shards for 2,048 readers fails at start
    with pytest.raises(ValueError, match="1282 shards but 256 ranks x 8 workers = 2048 readers"):
        data.check_readers("imagenet", "train", 1282, world, 8)


def test_eval_batches_count_partial_batches_per_worker():
    names = [f"v{i}" for i in range(5)]
    lengths = dict(zip(names, [10, 10, 10, 10, 3]))
    # 2 ranks x 2 workers: rank 0 reads v0+v4 (13 -> 4 batches of 4) and v1 (3), rank 1 v2 (3) and v3 (3)
    assert data.eval_batches(lengths, names, 4, 0, 2, 2) == 7
    assert data.eval_batches(lengths, names, 4, 1, 2, 2) == 6


# ----------------------------------------------------------------------------------------------------------
# real loaders


def test_two_ranks_read_disjoint_shards_equal_lengths_and_seeded_order(tmp_path):
    write_split(tmp_path, "train", [4] * 16)
    loaders = [data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=16, rank=r,
                                        world_size=2, num_workers=2, seed=7, label_smoothing=0.0)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 8 and loaders[0].num_samples == 64
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=16,
                                           num_workers=0)))
    first = [epoch_targets(loader, 0) for loader in loaders]
    assert [len(t) for t in first] == [32, 32]
    assert not set(first[0]) & set(first[1]) and set(first[0]) | set(first[1]) == set(range(16))
    assert epoch_targets(loaders[0], 0) == first[0]  # same seed and epoch: same order
    second = [epoch_targets(loader, 1) for loader in loaders]
    assert second[0] != first[0] and not set(second[0]) & set(second[1])
    images, targets = next(iter(loaders[0]))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    # the pixels too (augmentation and the batch's erasing are seeded by position): what exact resume needs
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loaders[1], loaders[1]))


def test_train_skips_corrupt_samples_and_truncated_members(tmp_path, caplog):
    write_split(tmp_path, "train", [6] * 4, corrupt={(0, 1), (2, 4)})
    path = tmp_path / "train-000003.tar"
    path.write_bytes(path.read_bytes()[:2500])  # a member cut short
    loader = data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=4, num_workers=2,
                                      label_smoothing=0.0, shuffle_buffer=8)
    assert "train-000003.tar" in caplog.text and "do not end like a complete tar" in caplog.text
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # the short worker re-reads its own shards
    assert loader.stats["corrupt_skipped"] >= 2 and loader.stats["shard_read_errors"] >= 1
    assert loader.stats["short_samples"] >= 1


def test_loader_fails_at_start_with_the_fix_in_the_message(tmp_path):
    with pytest.raises(data.DataError, match="python -m pipelines.data.shards"):
        data.read_info(str(tmp_path))
    write_split(tmp_path, "train", [4] * 3)
    with pytest.raises(data.DataError, match="3 shards but 2 ranks x 2 workers = 4 readers need at least 4.*"
                                             "--shard-size.*--set data.resampled=true"):
        data.create_train_loader(str(tmp_path), batch_size=2, img_size=32, num_classes=3, world_size=2)
    loader = data.create_train_loader(str(tmp_path), batch_size=2, img_size=32, num_classes=3, world_size=2,
                                      resampled=True, label_smoothing=0.0)
    assert epoch_targets(loader, 3) == epoch_targets(loader, 3) and len(loader) == 3
    with pytest.raises(ValueError, match="even batch size"):
        data.create_train_loader(str(tmp_path), batch_size=3, img_size=32, num_classes=3, num_workers=1,
                                 mixup=0.8)
    os.remove(tmp_path / "train-000001.tar")
    with pytest.raises(data.DataError, match="train-000001.tar"):
        data.create_train_loader(str(tmp_path), batch_size=2, img_size=32, num_classes=3, num_workers=1)


def test_eval_reads_every_sample_once_across_ranks_and_workers(tmp_path):
    lengths = [5, 3, 7, 2, 4]
    write_split(tmp_path, "validation", lengths, label_is_shard=True)
    seen = Counter()
    for rank in range(3):
        loader = data.create_eval_loader(str(tmp_path), batch_size=2, img_size=32, rank=rank, world_size=3,
                                         num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, targets in batches:
            assert images.shape[1:] == (3, 32, 32)
            seen.update(targets.tolist())
    assert seen == Counter({s: n for s, n in enumerate(lengths)})


class _StuckStream(data._ShardStream):
    """A fake, named as such: a worker that never answers, which is what a worker stuck after its fork looks like
    (a fault that cannot be caused on purpose)."""

    def __iter__(self):
        time.sleep(3600)
        yield from ()


def test_a_stuck_worker_makes_the_loader_raise_instead_of_waiting_forever(tmp_path, monkeypatch):
    write_split(tmp_path, "validation", [4])
    loader = data.create_eval_loader(str(tmp_path), batch_size=2, img_size=32, num_workers=1)
    loader._stream.__class__ = _StuckStream
    monkeypatch.setattr(data, "WORKER_TIMEOUT_S", 2)
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        next(iter(loader))


def test_grayscale_mixup_and_label_smoothing_targets(tmp_path):
    write_split(tmp_path, "train", [4] * 4, label_is_shard=False, num_classes=10)
    mixed = data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=10, in_chans=1,
                                     num_workers=1, mixup=0.8, cutmix=1.0)
    mixed.set_epoch(0)
    images, targets = next(iter(mixed))
    assert images.shape == (4, 1, 32, 32) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    smooth = data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=10, num_workers=0)
    smooth.set_epoch(0)
    _, targets = next(iter(smooth))
    assert targets.shape == (4, 10) and abs(targets.max().item() - (0.9 + 0.01)) < 1e-6
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 16


def test_train_transform_survives_randaugment_posterize_to_zero_bits():
    from PIL import Image

    transform = data.train_transform(32, in_chans=1)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude_std = 1.0, 0.0
    posterize.magnitude = 10  # the level timm's mstd noise reaches: 0 bits kept
    out = posterize(Image.new("L", (8, 8), 200))
    assert out.mode == "L" and max(out.getdata()) == 0


def cut_at_member_boundary(path, samples_kept: int) -> None:
    """Cut a shard right after its first ``samples_kept`` samples (2 members each): no member is broken, so
    the tar reader sees a clean, early end."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[2 * samples_kept - 1]
    end = last.offset_data + -(-last.size // 512) * 512
    with open(path, "r+b") as f:
        f.truncate(end)


def test_shard_cut_at_a_member_boundary_is_named_and_its_shortfall_counted(tmp_path, caplog):
    write_split(tmp_path, "validation", [25, 25])
    cut_at_member_boundary(tmp_path / "validation-000001.tar", 4)
    loader = data.create_eval_loader(str(tmp_path), batch_size=8, img_size=32, num_workers=0)
    assert "validation-000001.tar" in caplog.text  # named at start: the tar has no end-of-archive blocks
    caplog.clear()
    seen = Counter(t for _, targets in loader for t in targets.tolist())
    assert seen == {0: 25, 1: 4}
    assert loader.stats == {"corrupt_skipped": 0, "shard_read_errors": 0, "short_samples": 21,
                            "shards_given_up": 0}
    assert "validation-000001.tar ended after 4 of its 25 samples" in caplog.text


def test_a_shard_with_no_decodable_sample_is_given_up_after_one_pass(tmp_path, caplog):
    """The train worker reads both shards and re-reads to fill its quota: the all-corrupt shard is read once
    (its samples counted once), its warnings stay within the budget; a worker holding only that shard fails at
    once instead of re-reading it 10,000 times."""
    write_split(tmp_path, "train", [20, 20], corrupt={(1, i) for i in range(20)})
    loader = data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=2, num_workers=0,
                                      label_smoothing=0.0, shuffle_buffer=0)
    loader.set_epoch(0)
    targets = [t for _, batch in loader for t in batch.tolist()]
    assert len(targets) == 40 and set(targets) == {0}  # 10 batches from the good shard, re-read
    assert loader.stats == {"corrupt_skipped": 20, "shard_read_errors": 0, "short_samples": 0,
                            "shards_given_up": 1}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == data.WARN_LIMIT + 1 and "further ones are counted" in warnings[-1].getMessage()
    caplog.clear()
    reads = [data.assign_shards(["a", "b"], 0, 0, r, 2, 1, 0) for r in range(2)]
    bad = data.create_train_loader(str(tmp_path), batch_size=4, img_size=32, num_classes=2,
                                   rank=reads.index(["b"]), world_size=2, num_workers=1, label_smoothing=0.0,
                                   shuffle_buffer=8)
    bad.set_epoch(0)
    with pytest.raises(data.DataError) as failed:  # raised in the worker process, one line here
        list(bad)
    assert str(failed.value).startswith("no decodable sample in the shards of train worker 0 on rank")
    assert "train-000001.tar" in str(failed.value) and "\n" not in str(failed.value)


@pytest.mark.slow
def test_trainer_reports_bad_data_in_epoch_line_summary_and_tensorboard(tmp_path):
    """A real single-process run: an all-corrupt train shard and a validation shard cut short are counted in the
    epoch line, summary.json and TensorBoard, not only in warnings."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards_dir, run_dir = tmp_path / "wds", tmp_path / "run"
    write_split(shards_dir, "train", [8] * 4, corrupt={(1, i) for i in range(8)}, num_classes=10)
    write_split(shards_dir, "validation", [8] * 2, num_classes=10)
    cut_at_member_boundary(shards_dir / "validation-000001.tar", 4)
    sets = [f"data.dir={shards_dir}", "data.num_workers=0", "data.batch_size=8", "data.img_size=32",
            "model.kwargs.img_size=32", "model.kwargs.depths=[1,1,1,1]", "schedule.epochs=1",
            "schedule.warmup_epochs=0", "logging.progress_bar=false", "deepspeed.precision=fp32",
            "data.shuffle_buffer=0"]  # no buffer: every corrupt sample reaches decoding before the quota
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "fashion_mnist", "--run-dir", str(run_dir),
                           *[a for s in sets for a in ("--set", s)]], cwd=os.path.dirname(os.path.dirname(
                               os.path.abspath(__file__))), env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch_line = next(line for line in proc.stderr.splitlines() if "epoch 1/1" in line)
    assert ("bad data: train corrupt_skipped 8, train shards_given_up 1, val short_samples 4" in epoch_line)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_bad_data_this_start"] == {"corrupt_skipped": 8, "shard_read_errors": 0,
                                                    "short_samples": 0, "shards_given_up": 1}
    assert summary["metrics"]["val/short_samples"] == 4 and summary["metrics"]["val/count"] == 12
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/train_corrupt_skipped")] == [8]
    assert [e.value for e in events.Scalars("val/short_samples")] == [4]
