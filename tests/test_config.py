"""train/config.py: recipes, --set overrides and the batch plan, validated in process (no launch)."""
from __future__ import annotations

import pytest

from train.config import ConfigError, load_config, plan_batches


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'optim.weigth_decay'; did you mean 'optim.weight_decay'"):
        load_config("fashion_mnist", ["optim.weigth_decay=0.1"])
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer, got 'big'"):
        load_config("fashion_mnist", ["data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'; did you mean 'model'"):
        load_config("fashion_mnist", ["modle.name=x"])
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage must be 0, 1, 2 or 3"):
        load_config("fashion_mnist", ["deepspeed.zero_stage=4"])
    cfg = load_config("fashion_mnist", ["optim.global_batch_size=100", "data.batch_size=16"])
    with pytest.raises(ConfigError, match=r"16 x 2 = 32"):
        plan_batches(cfg, world_size=2)
    cfg = load_config("fashion_mnist", ["optim.global_batch_size=96", "optim.grad_accum_steps=2",
                                        "data.batch_size=16"])
    with pytest.raises(ConfigError, match=r"16 x 2 x 2 = 64, but optim.global_batch_size=96"):
        plan_batches(cfg, world_size=2)
    cfg = load_config("mrconvnext_tiny")  # 4096 = 128 x accum x 8 -> accum 4; lr 4e-3 at 4096
    assert plan_batches(cfg, 8).grad_accum_steps == 4
    assert cfg.optim.lr is None and cfg.optim.base_lr == 4e-3 and cfg.model.drop_path_rate == 0.1
    assert load_config("mrconvnext_base").model.drop_path_rate == 0.5


def test_config_decode_key():
    assert load_config("fashion_mnist", ["data.dir=x"]).data.decode == "cpu"
    assert load_config("fashion_mnist",
                       ["data.dir=x", "data.decode=gpu", "data.auto_augment=null"]).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode must be 'cpu' or 'gpu', got 'tpu'"):
        load_config("fashion_mnist", ["data.dir=x", "data.decode=tpu"])
    assert load_config("fashion_mnist", ["data.dir=x"]).data.worker_start == "forkserver"
    with pytest.raises(ConfigError, match="data.worker_start must be one of forkserver, fork, spawn, got 'thread'"):
        load_config("fashion_mnist", ["data.dir=x", "data.worker_start=thread"])
    assert load_config("fashion_mnist", ["data.dir=x", "data.decode=gpu",
                                         "data.auto_augment=rand-m9-mstd0.5"]).data.auto_augment == "rand-m9-mstd0.5"
    with pytest.raises(ConfigError, match=r"data.decode=gpu runs RandAugment \('rand-...'\) on the device, not"):
        load_config("fashion_mnist", ["data.dir=x", "data.decode=gpu", "data.auto_augment=original"])


def test_config_compile_section():
    """compile.*: off by default, modes and backends checked with one line, and resume-safe (how the model runs,
    not what it is): a run saved eager resumes compiled with the same fingerprint."""
    from train.config import check_compile_backend, config_diff, fingerprint, to_dict

    eager = load_config("fashion_mnist", ["data.dir=x"])
    assert not eager.compile.enabled and eager.compile.backend == "inductor" and eager.compile.mode is None
    compiled = load_config("fashion_mnist", ["data.dir=x", "compile.enabled=true", "compile.mode=max-autotune"])
    assert compiled.compile.enabled and compiled.compile.mode == "max-autotune"
    assert fingerprint(compiled) == fingerprint(eager) and config_diff(to_dict(eager), to_dict(compiled)) == []
    with pytest.raises(ConfigError, match=r"compile.mode must be one of default, reduce-overhead, max-autotune, "
                                          r"max-autotune-no-cudagraphs or null, got 'fast'"):
        load_config("fashion_mnist", ["data.dir=x", "compile.mode=fast"])
    check_compile_backend(load_config("fashion_mnist", ["data.dir=x", "compile.backend=aot_eager",
                                                        "compile.enabled=true"]))
    check_compile_backend(load_config("fashion_mnist", ["data.dir=x", "compile.backend=nope"]))  # not enabled
    with pytest.raises(ConfigError, match=r"compile.backend: 'indutor' is not a torch.compile backend; did you mean "
                                          r"'inductor'\?"):
        check_compile_backend(load_config("fashion_mnist", ["data.dir=x", "compile.enabled=true",
                                                            "compile.backend=indutor"]))
