"""Helpers to run a function on N spawned CPU ranks (gloo) and collect results."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = fn(rank, world_size, port, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(fn, world_size: int, *args, timeout: float = 300):
    """Run fn(rank, world_size, port, *args) on world_size spawned processes;
    return the list of what each returned (via torch.save)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, port, fn, args, out_dir), nprocs=world_size, join=False, start_method="spawn"
        )
        while not ctx.join(timeout=timeout):
            pass
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
