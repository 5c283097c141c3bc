"""Run a function on W CPU processes joined in one gloo process group (the TP tests' stand-in for a server's
TP group).

The rendezvous is a FileStore in a test's temporary directory, not a TCP store: no port to race for, and no
store-server thread in rank 0 that must outlive the other ranks (a TCP store run once aborted rank 0 in CI
with "terminate called without an active exception" at exit). Gloo's own pairs use the loopback interface,
so the test does not depend on how the machine's hostname resolves. Every rank meets a barrier before the
group is destroyed, so no rank tears down while another still talks to it.
"""

import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_gloo_ranks(fn: Callable[..., None], world: int, rendezvous_dir: Path, *args) -> None:
    """Call fn(rank, world, *args) on `world` spawned processes; raises if any of them fails. fn must be a
    module-level function (spawn pickles it by name)."""
    store_file = Path(rendezvous_dir) / "gloo-store"
    store_file.unlink(missing_ok=True)  # a FileStore file is single use
    mp.spawn(_rank_main, args=(fn, world, str(store_file), args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world: int, store_file: str, args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
