"""The fixed-order all-reduce on W GPUs against the backend's own all-reduce: bits and time, written as JSON.

    python3 -m benchmarks.tp_allreduce --out benchmarks/results/tp_allreduce_<card>.json [--world 2]
    NCCL_ALGO=Tree python3 -m benchmarks.tp_allreduce --out .../tp_allreduce_<card>_tree.json  # one per variant

Issue 8's all-reduce measurement (docs/alignment.md, "Tensor parallelism"). Per token count T, bf16 [T, D]
partials (rank r's from seed r), on every rank:
  ranks_equal        fixed_order_all_reduce gives the same bits on every rank;
  split_invariant    reducing rows [0, 1) and [1, T) in two calls gives the bits of the one [T, D] call
                     (T = 1: the row alone);
  equal_to_all_reduce  the same bits as dist.all_reduce (SUM) under this run's NCCL settings (expected at W = 2,
                     where one addition of two terms commutes; not expected at W >= 3);
  fixed_us, all_reduce_us  median wall time per call over --iters calls (after a warm-up), rank 0's clock.
NCCL's algorithm, protocol and channels are picked per process from the environment (NCCL_ALGO, NCCL_PROTO,
NCCL_MIN_NCHANNELS / NCCL_MAX_NCHANNELS); the JSON records them. NVLink multicast (NVLS) reduces in the switch
at its own precision, so the run keeps NCCL_NVLS_ENABLE=0 and refuses another value. --backend gloo runs the
same on CPU processes (the CPU test). Exit code 2 when the backend needs more GPUs than there are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_microturn.alignment.fixed_order_allreduce import fixed_order_all_reduce
from sglang_microturn.cli.server_process import free_port

NCCL_ENV = ("NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_NVLS_ENABLE")


class NvlsEnabledError(ValueError):
    """NCCL_NVLS_ENABLE is set to something other than 0."""


def partial(rank: int, tokens: int, hidden: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)  # [T, D]


def median_us(fn, iters: int, sync) -> float:
    fn()  # warm-up: NCCL sets up its channels on the first call of a size
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def measure(rank: int, world: int, tokens: int, hidden: int, iters: int, device: str, sync) -> dict:
    x = partial(rank, tokens, hidden, device)
    fixed = fixed_order_all_reduce(x)
    parts = [fixed_order_all_reduce(x[:1])] + ([fixed_order_all_reduce(x[1:])] if tokens > 1 else [])
    every = fixed.new_empty(world * fixed.numel())
    dist.all_gather_into_tensor(every, fixed.reshape(-1))  # a gather copies: rank r's bits as they are
    reduced = x.clone()
    dist.all_reduce(reduced)

    def backend_all_reduce():
        dist.all_reduce(x.clone())

    return {
        "tokens": tokens,
        "bytes_per_rank": x.numel() * x.element_size(),
        "ranks_equal": all(torch.equal(row, fixed.reshape(-1)) for row in every.view(world, -1)),
        "split_invariant": torch.equal(torch.cat(parts), fixed),
        "equal_to_all_reduce": torch.equal(reduced, fixed),
        "fixed_us": round(median_us(lambda: fixed_order_all_reduce(x), iters, sync), 1),
        "all_reduce_us": round(median_us(backend_all_reduce, iters, sync), 1),
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    nccl = args.backend == "nccl"
    if nccl:
        torch.cuda.set_device(rank)
    device = f"cuda:{rank}" if nccl else "cpu"
    sync = torch.cuda.synchronize if nccl else (lambda: None)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = [measure(rank, world, t, args.hidden, args.iters, device, sync) for t in args.tokens]
        # Every rank's booleans must hold, not only rank 0's: AND them over the group.
        for row in rows:
            for key in ("ranks_equal", "split_invariant", "equal_to_all_reduce"):
                flag = torch.tensor([int(row[key])], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                row[key] = bool(flag.item())
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()



def run(args: argparse.Namespace) -> dict:
    nvls = os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # set before the workers start: they inherit it
    if nvls != "0":
        raise NvlsEnabledError(f"NCCL_NVLS_ENABLE={nvls}: NVLS reduces in the switch at its own precision;"
                               " unset it or set NCCL_NVLS_ENABLE=0")
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = f"{tmp}/rows.json"
        mp.spawn(_worker, args=(args.world, free_port(), args, rows_file), nprocs=args.world, join=True)
        rows = json.loads(Path(rows_file).read_text())
    return {
        "backend": args.backend,
        "world": args.world,
        "hidden": args.hidden,
        "dtype": "bfloat16",
        "device": torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu",
        "nccl_env": {k: os.environ.get(k) for k in NCCL_ENV},
        "rows": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--hidden", type=int, default=2048, help="D (Qwen3-30B-A3B: 2048)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 32, 512, 4096], help="T: decode to prefill")
    p.add_argument("--iters", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        print(f"--world {args.world} with nccl needs {args.world} GPUs, found {torch.cuda.device_count()}")
        return 2
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
