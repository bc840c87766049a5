"""World info from the launcher's environment: torchrun, the `deepspeed` launcher, or `srun` (one task per GPU).

`world_info_from_env` is pure (it reads a mapping) so every launcher's variables can be tested without one;
`init_distributed` exports the result as the env:// variables and starts DeepSpeed's process group.
DeepSpeed does not read SLURM variables itself, hence the mapping here (the pattern of timm/open_clip).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from train.host import retain_freed_memory

__all__ = ["WorldInfo", "first_host", "master_port_for_job", "free_port", "world_info_from_env", "init_distributed"]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 15000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun' | 'deepspeed' | 'slurm' | 'single'

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'n[1-2]' -> 'n1', 'gpu[01-03,07],cpu5' -> 'gpu01',
    'rack[2-3]-gpu[08-09]' -> 'rack2-gpu08'. Zero padding is kept, as SLURM does."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    host, depth = [], 0
    for i, ch in enumerate(nodelist):
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth += 1
            close = nodelist.find("]", i)
            if close < 0:
                raise ValueError(f"unbalanced '[' in SLURM node list {nodelist!r}")
            first = re.split(r"[,-]", nodelist[i + 1:close], maxsplit=1)[0]
            if not first.isdigit():
                raise ValueError(f"bad range {nodelist[i:close + 1]!r} in SLURM node list {nodelist!r}")
            host.append(first)
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            host.append(ch)
    return "".join(host)


def master_port_for_job(job_id: int) -> int:
    """A port every task of a job derives alike, different for jobs that may share a node."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_RANGE


def free_port() -> int:
    """A TCP port free on this host now, for a local launcher's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _env_launcher(env: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "LOCAL_SIZE" in env:  # set by deepspeed/launcher/launch.py
        return "deepspeed"
    # RANK with nothing else: either plain env:// or a previous init_distributed() under srun.
    if "SLURM_PROCID" in env and env.get("SLURM_PROCID") == env.get("RANK"):
        return "slurm"
    return "torchrun"


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Who am I, from env (default os.environ).

    Precedence: RANK/WORLD_SIZE (torchrun, deepspeed launcher, or already exported), then an srun task
    (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; MASTER_ADDR = first host of SLURM_JOB_NODELIST unless the
    MASTER_ADDR variable overrides it, e.g. with the node's NodeAddr; MASTER_PORT from SLURM_JOB_ID unless
    set), else a single process. Note that a batch script itself has SLURM_PROCID=0 and SLURM_NTASKS of the
    whole job: start the trainer with `srun`, one task per GPU, not directly in the batch script.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT,
            launcher=_env_launcher(env),
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            addr = DEFAULT_MASTER_ADDR
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = master_port_for_job(_int(env, "SLURM_JOB_ID"))
        else:
            port = DEFAULT_MASTER_PORT
        return WorldInfo(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=_int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return WorldInfo(0, 0, 1, env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
                     _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT, "single")


_initialized: WorldInfo | None = None


def init_distributed(backend: str | None = None) -> WorldInfo:
    """Export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, pick the device (CPU ranks keep freed host memory:
    ``train.host``), start DeepSpeed's process group (also for one process: deepspeed.initialize expects one).
    Idempotent."""
    global _initialized
    if _initialized is not None:
        return _initialized
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = world_info_from_env()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} outside world size {info.world_size} ({info.launcher} environment)")
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    accelerator = get_accelerator()
    # DeepSpeed's CPU accelerator names oneCCL when its bindings are installed; CPU ranks keep gloo.
    on_device = accelerator.device_name() != "cpu"
    if on_device:
        # Before the process group: NCCL (and its kin) binds each rank to the current device. The modulo covers
        # clusters that bind one device per task (each task then sees device 0 only).
        accelerator.set_device(info.local_rank % accelerator.device_count())
    else:
        retain_freed_memory()
    deepspeed.init_distributed(dist_backend=backend or (accelerator.communication_backend_name() if on_device
                                                        else "gloo"),
                               auto_mpi_discovery=False, verbose=False)
    _initialized = info
    return info
