"""Helpers for the multi-process tests: spawn 2 gloo ranks on the CPU, and skip with the reason
where torch.distributed cannot run them."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import pytest
import torch

WORLD = 2


def require_gloo() -> None:
    """Skip unless torch.distributed with the gloo backend is available."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")


def free_port() -> int:
    """A TCP port nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn, *args) -> None:
    fn(rank, *args)
    # The rank's work is done and its results are on disk: leave without running C++ static
    # destructors. There torch's gloo/TCPStore teardown aborts now and then ("terminate called
    # without an active exception" after the process group was destroyed: about 1 run of
    # test_ddp.py in 15 on this machine, with lionkit's code of any age), failing a test whose
    # results are all in. An exception in fn still reaches the parent with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args) -> None:
    """Run ``fn(rank, port, *args)`` in WORLD fresh processes; a failure in any rank fails the test
    with that rank's traceback. Processes are slow to start, so each test batches its checks."""
    import torch.multiprocessing as mp

    mp.start_processes(_child, args=(fn, free_port(), *args), nprocs=WORLD, join=True, start_method="spawn")


def init(rank: int, port: int) -> None:
    """Join the gloo process group (in a spawned rank) with one thread per rank (2 ranks share a
    2-core machine). A rank that fails leaves the other waiting in a collective: the timeout
    turns that into an error instead of a hang."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
