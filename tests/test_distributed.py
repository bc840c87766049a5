"""World info from each launcher's environment (train/distributed.py), without a launcher."""
import os

import pytest

from tests.conftest import require
from train.distributed import WorldInfo, first_host, master_port_for_job, world_info_from_env


@pytest.mark.parametrize("nodelist, host", [
    ("n1", "n1"),
    ("n[1-2]", "n1"),
    ("gpu[01-03,07],cpu5", "gpu01"),
    ("gpu[07,01-03]", "gpu07"),
    ("cpu5,gpu[01-03]", "cpu5"),
    ("node-a,node-b", "node-a"),
    ("rack[2-3]-gpu[08-09]", "rack2-gpu08"),
    ("a[001-100]-ib", "a001-ib"),
    (" x[3] ", "x3"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "n[1-2", "n[a-b]"])
def test_first_host_rejects_malformed_lists(bad):
    with pytest.raises(ValueError):
        first_host(bad)


def test_torchrun():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc"}
    assert world_info_from_env(env) == WorldInfo(5, 1, 8, "node0", 29400, "torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_SIZE": "4", "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert world_info_from_env(env) == WorldInfo(3, 3, 4, "127.0.0.1", 29500, "deepspeed")


def test_torchrun_inside_a_slurm_job_is_torchrun():
    env = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert world_info_from_env(env) == WorldInfo(2, 0, 4, "h", 1, "torchrun")


def test_srun_task():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5", "SLURM_JOB_ID": "123456"}
    info = world_info_from_env(env)
    assert info == WorldInfo(9, 1, 16, "gpu01", master_port_for_job(123456), "slurm")
    assert info.master_port == 15000 + 123456 % 20000


def test_srun_step_size_wins_over_job_size():
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "3"}
    assert world_info_from_env(env).world_size == 2


def test_srun_master_overrides():
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_ID": "42", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456"}
    assert world_info_from_env(env) == WorldInfo(1, 0, 2, "127.0.0.1", 23456, "slurm")


def test_exported_slurm_env_reads_back_as_slurm():
    # What init_distributed() leaves in os.environ under srun: calling again must give the same answer.
    slurm = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
             "SLURM_JOB_ID": "42"}
    info = world_info_from_env(slurm)
    exported = {**slurm, "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": info.master_addr,
                "MASTER_PORT": str(info.master_port)}
    assert world_info_from_env(exported) == info


def test_single_process():
    assert world_info_from_env({}) == WorldInfo(0, 0, 1, "127.0.0.1", 29500, "single")
    assert world_info_from_env({"SLURM_JOB_ID": "5"}).launcher == "single"  # salloc shell without srun


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        world_info_from_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


def test_single_process_init_distributed_is_idempotent(monkeypatch):
    """One process, gloo through DeepSpeed: what the trainer does on a laptop."""
    import torch.distributed as dist

    import train.distributed as td

    require(not dist.is_initialized(), "a process group already exists in this test process")
    saved = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(key, None)
    os.environ["MASTER_PORT"] = str(20000 + os.getpid() % 10000)
    monkeypatch.setattr(td, "_initialized", None)
    try:
        info = td.init_distributed()
        assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
        assert td.init_distributed() is info
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
