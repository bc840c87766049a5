"""train.engine: DeepSpeed's config from the run's deepspeed section, batch plan and clipping."""
import torch

from train.config import BatchPlan, DeepSpeedConfig, load_config
from train.engine import autocast_dtype, deepspeed_config


def test_deepspeed_config_from_the_sections():
    plan = BatchPlan(micro_batch_size=16, grad_accum_steps=2, world_size=4)
    ds = deepspeed_config(DeepSpeedConfig(zero_stage=2, precision="bf16", extra={"steps_per_print": 7}), plan, 1.5)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (128, 16, 2)
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.5
    # bf16 through torch autocast (weights and BatchNorm statistics stay fp32), never DeepSpeed's bf16 block.
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["steps_per_print"] == 7  # extra is merged last
    fp32 = deepspeed_config(DeepSpeedConfig(precision="fp32"), plan)
    assert "torch_autocast" not in fp32 and fp32["gradient_clipping"] == 0.0
    assert autocast_dtype(DeepSpeedConfig(precision="bf16")) is torch.bfloat16
    assert autocast_dtype(DeepSpeedConfig(precision="fp32")) is None


def test_deepspeed_config_of_a_recipe():
    cfg = load_config("fashion_mnist", ["data.dir=unused", "deepspeed.zero_stage=3", "optim.clip_grad=2.0"])
    ds = deepspeed_config(cfg.deepspeed, BatchPlan(cfg.data.batch_size, 1, 2), cfg.optim.clip_grad)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == 2 * cfg.data.batch_size
