"""The trainer's DataLoader workers start from a fork server (``train.workers``), not as forks of the threaded rank:
the same batches as forked workers, a single-threaded parent that keeps the stop signals blocked, and nothing left
behind when the process that started them is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch

from pipelines.data import loader as data
from tests.shard_helpers import write_split
from train import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_MASK = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGTERM - 1))


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = _status(int(entry))
            except OSError:
                continue  # gone meanwhile
            if int(status["PPid"]) == pid and status["State"][0] != "Z":
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return _status(pid)["State"][0] != "Z"
    except OSError:
        return False


def _batches(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


def test_forkserver_workers_give_the_forked_workers_batches_from_a_single_threaded_server(tmp_path):
    write_split(tmp_path, "train", [6, 6])
    write_split(tmp_path, "validation", [5], num_classes=2)
    kw = dict(batch_size=2, img_size=32, num_classes=2, num_workers=2, seed=3, label_smoothing=0.0)
    server = workers.context("forkserver")
    assert workers.context("fork") is None
    busy = threading.Event()
    thread = threading.Thread(target=busy.wait, daemon=True)  # this process is threaded, as a rank is
    thread.start()
    try:
        forked = _batches(data.create_train_loader(str(tmp_path), **kw))
        served_loader = data.create_train_loader(str(tmp_path), multiprocessing_context=server, **kw)
        served = _batches(served_loader)
        assert len(served) == len(forked) == 12
        for (a, ya), (b, yb) in zip(forked, served):
            assert torch.equal(a, b) and torch.equal(ya, yb)
        evaluated = [_batches(data.create_eval_loader(str(tmp_path), batch_size=2, img_size=32, num_workers=1, **c),
                              epochs=(0,)) for c in ({}, {"multiprocessing_context": server})]
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(*evaluated))

        # while a worker runs: its parent is the fork server, a child of this process with one thread (numpy's
        # OpenBLAS pool, started by the preload, is stopped by OpenBLAS's fork handler at the server's first fork)
        # and the stop signals blocked (SLURM's SIGTERM reaches every process of a job step; the rank handles it)
        served_loader.set_epoch(2)
        it = iter(served_loader)
        next(it)
        server_pids = [p for p in _children(os.getpid()) if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(server_pids) == 1
        status = _status(server_pids[0])
        assert status["Threads"] == "1" and int(status["SigBlk"], 16) & STOP_MASK == STOP_MASK
        worker_pids = _children(server_pids[0])
        assert len(worker_pids) == 2
        for pid in worker_pids:
            assert int(_status(pid)["SigBlk"], 16) & STOP_MASK == STOP_MASK
        del it
    finally:
        busy.set()


KILLED = r"""
import os, sys, time
from pipelines.data import loader as data
from train import workers
loader = data.create_eval_loader(sys.argv[1], batch_size=1, img_size=32, num_workers=2,
                                 multiprocessing_context=workers.context("forkserver"))
it = iter(loader)
next(it)
print("started", flush=True)
time.sleep(600)
"""


def test_a_killed_process_leaves_neither_server_nor_workers_behind(tmp_path):
    write_split(tmp_path, "validation", [4, 4])
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "started"
        helpers = _children(proc.pid)  # multiprocessing's resource tracker and the fork server
        servers = [p for p in helpers if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(helpers) == 2 and len(servers) == 1
        started = helpers + _children(servers[0])
        assert len(started) == 4  # and the server's 2 workers
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, started)), [(p, _status(p)["Name"]) for p in started if _alive(p)]
    finally:
        proc.kill()
