"""The trainer end to end: real processes (torchrun and the deepspeed launcher, 2 ranks, gloo), real DeepSpeed,
real WebDataset shards (the `shards` fixture of conftest.py: a slice of the packaged Fashion-MNIST), real
TensorBoard event files. Runs share one shard folder and keep to a few optimizer steps on a small model at 32px."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from tests.conftest import VAL_SAMPLES, assert_same_model, final_weights
from tests.trainer_runs import launch, ok
from train import checkpoint as ckpt
from train.logger import TENSORBOARD_SUBDIR

def scalars(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(str(run_dir), TENSORBOARD_SUBDIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def zero0_run(shards, tmp_path_factory):
    """ZeRO-0, bf16 autocast, MRConvNeXt-atto (BatchNorm in every MRConv layer), EMA: the reference run."""
    run_dir = tmp_path_factory.mktemp("zero0") / "run"
    out = ok(launch(run_dir, shards, "deepspeed.zero_stage=0", "deepspeed.precision=bf16", "ema.enabled=true",
                    "ema.decay=0.9", "logging.progress_bar=true"))
    return run_dir, out


ZERO0_SETS = ("deepspeed.zero_stage=0", "deepspeed.precision=bf16", "ema.enabled=true", "ema.decay=0.9")


@pytest.mark.slow
def test_bf16_batchnorm_trains_loss_down_and_logs(zero0_run):
    run_dir, out = zero0_run
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0], losses
    for tag in ("train/lr", "train/images_per_sec", "train/grad_norm", "val/top1", "val/top5", "val_ema/top1"):
        assert scalars(run_dir, tag), tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(str(run_dir), TENSORBOARD_SUBDIR), size_guidance={"images": 0})
    acc.Reload()
    assert {f"alpha_energy/stage{i}" for i in range(4)} <= set(acc.Tags()["images"])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["step"] == 16 and summary["metrics"]["val/count"] == VAL_SAMPLES  # exactly the eval set
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert "epoch 2/2" in out
    # The output is a pipe, not a terminal: no progress bar redrawn with carriage returns, but one line per
    # logging interval (log_every_steps=2).
    assert "\r" not in out
    lines = re.findall(r"INFO step (\d+) epoch [\d.]+ loss [\d.]+ lr \S+ \d+ img/s data wait \d+%", out)
    assert [int(s) for s in lines] == list(range(2, 17, 2)), out[-3000:]


ZERO_STAGE_SETS = ("deepspeed.precision=fp32", "model.name=resnet10t", "model.kwargs={}", "schedule.epochs=1")


@pytest.fixture(scope="module")
def zero0_fp32_weights(shards, tmp_path_factory):
    """The final weights of a ZeRO-0 run of the ZeRO stage tests' setup: what each ZeRO stage must reproduce."""
    run_dir = tmp_path_factory.mktemp("zero0_fp32") / "run"
    ok(launch(run_dir, shards, "deepspeed.zero_stage=0", *ZERO_STAGE_SETS))
    return final_weights(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage,launcher", [(1, "torchrun"), (2, "torchrun"), (3, "deepspeed")])
def test_zero_stages_train(shards, tmp_path, zero0_fp32_weights, stage, launcher):
    run_dir = tmp_path / "run"
    ok(launch(run_dir, shards, f"deepspeed.zero_stage={stage}", *ZERO_STAGE_SETS, launcher=launcher))
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 4 and np.isfinite(losses).all()
    weights = final_weights(run_dir)
    assert weights["fc.weight"].shape == (10, 512)
    # Partitioning the optimizer state, the gradients or the parameters must not change the arithmetic: bit-identical
    # to ZeRO-0 here (gloo, 2 ranks); assert_same_model's 1e-6 leaves room for a reduction order that differs by an
    # ulp, while a stage that trains differently (lr 2e-3 -> 2.2e-3 in one run) is off by 1.5e-3.
    assert_same_model(zero0_fp32_weights, weights)


@pytest.mark.slow
def test_kill_and_term_to_everything_resume_exactly(shards, tmp_path):
    """fp32 ZeRO-1 with drop path, mixup/cutmix, EMA (with warm-up: its decay follows the step, which must resume)
    and a data worker per rank: SIGKILL once a checkpoint exists, resume, stop with `timeout -s TERM` around torchrun
    (SIGTERM to every rank and every data worker), resume again: the same weights as uninterrupted."""
    sets = ["deepspeed.zero_stage=1", "deepspeed.precision=fp32", "model.drop_path_rate=0.1", "data.mixup=0.8",
            "data.cutmix=1.0", "data.label_smoothing=0.1", "ema.enabled=true", "ema.decay=0.9",
            "ema.warmup=true", "data.num_workers=1", "checkpoint.every_steps=3", "checkpoint.keep=1",
            "logging.eval_every_epochs=2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    ok(launch(straight, shards, *sets))

    latest = os.path.join(ckpt.checkpoint_dir(str(broken)), ckpt.LATEST)

    def step_of_latest():
        return int(open(latest).read().strip()[len(ckpt.TAG_PREFIX):]) if os.path.isfile(latest) else 0

    def wait_for(proc, condition):
        deadline = time.time() + 240
        while not condition() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.stdout.read()[-4000:]}"
        assert condition(), "no new checkpoint after 240 s"

    # A node crash: SIGKILL to torchrun's process group and to each rank's (torchrun starts each in its own).
    proc = launch(broken, shards, *sets, wait=False)
    wait_for(proc, lambda: step_of_latest() >= 3)
    for pid in [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    killed_at = step_of_latest()
    assert 3 <= killed_at < 16

    # `timeout` at its limit (SIGALRM is its timer): SIGTERM to torchrun's group; torchrun sends SIGTERM to each
    # rank's process group, data workers included.
    proc = launch(broken, shards, *sets, wait=False, prefix=("timeout", "-s", "TERM", "3600"))
    wait_for(proc, lambda: step_of_latest() > killed_at)
    os.kill(proc.pid, signal.SIGALRM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 124, out[-4000:]  # timeout's own code for "the time limit was reached"
    assert "resumed from" in out and "DataLoader worker" not in out, out[-4000:]
    stop = re.search(r"stop requested \(SIGTERM [\d.]+ s ago\): checkpoint at step (\d+) saved, exiting with 3", out)
    assert stop, out[-4000:]
    stopped_at = step_of_latest()
    assert int(stop.group(1)) == stopped_at and killed_at < stopped_at < 16
    out = ok(launch(broken, shards, *sets))
    assert f"step {stopped_at}" in out

    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    assert_same_model(a, b)
    ema_a, ema_b = (ckpt.ema_weights(d, ckpt.latest_tag(d)) for d in map(ckpt.checkpoint_dir, (straight, broken)))
    assert_same_model(ema_a, ema_b)


def _signal_mask(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(field)


@pytest.mark.slow
def test_stop_signal_during_startup_stops_after_a_checkpoint(shards, tmp_path):
    """SIGUSR1 while `python -m train` still imports torch: recorded, not fatal (was: exit 138, no message)."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, "data.num_workers=1", launcher="python", wait=False)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    deadline = time.time() + 60
    while not _signal_mask(proc.pid, "SigCgt") & usr1:
        assert proc.poll() is None and time.time() < deadline, "no SIGUSR1 handler"
        time.sleep(0.002)
    maps = open(f"/proc/{proc.pid}/maps").read()
    assert "libtorch" not in maps, "the handler came only after torch was imported"
    os.kill(proc.pid, signal.SIGUSR1)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 3, out[-4000:]
    assert re.search(r"stop requested \(SIGUSR1 [\d.]+ s ago\): checkpoint at step 1 saved", out), out[-4000:]
    assert ckpt.latest_tag(ckpt.checkpoint_dir(str(run_dir))) == ckpt.tag_for(1)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous(zero0_run, shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero0_run[0], run_dir)
    ckpt_dir = ckpt.checkpoint_dir(str(run_dir))
    assert ckpt.complete_tags(ckpt_dir) == [ckpt.tag_for(12), ckpt.tag_for(16)]
    newest = ckpt.model_states_file(ckpt_dir, ckpt.tag_for(16))
    with open(newest, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(newest) // 2)
    out = ok(launch(run_dir, shards, *ZERO0_SETS))
    assert f"checkpoint file {newest} cannot be read" in out and "falling back" in out, out[-4000:]
    assert f"resumed from {ckpt_dir}/{ckpt.tag_for(12)}: " in out
    assert_same_model(final_weights(zero0_run[0]), final_weights(run_dir))


class _Payload:
    """What a crafted checkpoint holds: unpickling it runs a shell command (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_on_resume(zero0_run, shards, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(zero0_run[0], run_dir)
    crafted = ckpt.model_states_file(ckpt.checkpoint_dir(str(run_dir)), ckpt.tag_for(16))
    torch.save({"module": _Payload(marker)}, crafted)
    proc = launch(run_dir, shards, *ZERO0_SETS, launcher="python")
    assert proc.returncode == 2, proc.stdout[-4000:]
    assert f"checkpoint error: refusing to load {crafted}: it asks to call posix.system" in proc.stdout
    assert "Traceback" not in proc.stdout and not marker.exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_or_config_fails_clearly(zero0_run, shards):
    run_dir, _ = zero0_run
    proc = launch(run_dir, shards, "deepspeed.precision=bf16", "model.name=resnet10t", "model.kwargs={}",
                  launcher="python")
    assert proc.returncode == 2
    assert "of model 'mrconvnext_atto', this config trains 'resnet10t'; use a new --run-dir" in proc.stdout
    proc = launch(run_dir, shards, "deepspeed.precision=bf16", "ema.enabled=true", "ema.decay=0.9",
                  "optim.weight_decay=0.01", launcher="python")
    assert proc.returncode == 2
    assert "optim.weight_decay: 0.05 -> 0.01" in proc.stdout and "use a new --run-dir" in proc.stdout


@pytest.mark.slow
def test_export_loads_in_timm(zero0_run, shards, tmp_path):
    import timm

    import models  # noqa: F401
    from train.export import export
    run_dir, _ = zero0_run
    out = str(tmp_path / "m.safetensors")
    info = export(str(run_dir), out, data_dir=shards)
    assert info["fold_check"]["max_rel_diff"] <= 1e-4
    kwargs, size = info["kwargs"], info["img_size"]  # the recipe's model, as the export's side file records it
    model = timm.create_model("mrconvnext_atto", pretrained=True, inference_mode=True, num_classes=10, in_chans=1,
                              **kwargs, pretrained_cfg_overlay=dict(file=out, num_classes=10,
                                                                    input_size=(1, size, size))).eval()
    reference = timm.create_model("mrconvnext_atto", num_classes=10, in_chans=1, **kwargs)
    reference.load_state_dict(final_weights(run_dir))
    x = torch.randn(4, 1, size, size)
    with torch.no_grad():
        y, y_ref = model(x), reference.eval()(x)
    assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()


@pytest.mark.slow
def test_mrconvnext_training_form_under_zero3(shards, tmp_path):
    """The training form reads its per-branch BatchNorm inside a submodule call, so ZeRO-3 gathers those
    parameters: MRConvNeXt trains under ZeRO-3 and its running statistics move."""
    run_dir = tmp_path / "run"
    ok(launch(run_dir, shards, "deepspeed.zero_stage=3", "deepspeed.precision=fp32", "ema.enabled=false",
              "schedule.epochs=1", launcher="deepspeed"))
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 4 and np.isfinite(losses).all()
    weights = final_weights(run_dir)
    var = [v for k, v in weights.items() if k.endswith("conv_dw.norm.running_var")]
    assert var and all(not torch.allclose(v, torch.ones_like(v)) for v in var)


@pytest.mark.slow
def test_compiled_run_trains_as_the_eager_one(shards, tmp_path):
    """compile.enabled: DeepSpeed's engine.compile traces MRConvNeXt's training form (its autograd Functions) and
    the eval form its evaluation switches to, on 2 ranks; the weights after 8 updates and the validation top-1 are
    the eager run's. The backend is aot_eager (Dynamo and AOTAutograd, as inductor gets them, without the code
    generation that takes minutes on 2 cores; `pipelines.benchmark train --compile` runs inductor). That the model
    traces whole is test_triton's `test_compile_fullgraph_traces_mrconvnext`."""
    sets = ("deepspeed.precision=fp32", "schedule.epochs=1", "ema.enabled=false")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    ok(launch(eager, shards, *sets))
    out = ok(launch(compiled, shards, *sets, "compile.enabled=true", "compile.backend=aot_eager"))
    assert "torch.compile (backend aot_eager, mode default): the first training and evaluation steps" in out
    # the same ATen operations (engine.compile compiles in place: the same keys, no _orig_mod. prefix): the same
    # model as eager, bit-identical here
    assert_same_model(final_weights(eager), final_weights(compiled))
    assert scalars(compiled, "val/top1") == scalars(eager, "val/top1")
