"""What the MoE benchmarks (moe_decode, moe_breakdown) share: SGLang's one-process setup, CUDA-graph timing,
random routing and a streaming-read kernel for bandwidth floors."""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

ROUTING_SETS = 8  # routings a graph rotates through, so consecutive calls touch different experts
CALLS_PER_GRAPH = 16
REPLAYS = 7


def setup_sglang():
    from sglang.srt.runtime_context import get_context

    get_context().override_server_args().install()
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:29555", backend="nccl"
    )
    initialize_model_parallel(1)


def time_graph(fn_for_call, calls=CALLS_PER_GRAPH, replays=REPLAYS) -> float:
    """Median microseconds per call: `calls` calls (fn_for_call(i)) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, ROUTING_SETS)):  # compile, autotune caches, torch.compile warm-up
            fn_for_call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn_for_call(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


def routing(M, E, K, seed, device="cuda"):
    """(topk_weights fp32, topk_ids int32, router logits) for M tokens over E experts, top-K, seeded."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(M, E, device=device, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous(), logits


@triton.jit
def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Streams x[:n] once (each program BLOCK * STEPS elements) and writes one sum per program."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * STEPS
    for s in tl.static_range(STEPS):
        offs = base + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def expert_weights(E, K, D, I, device="cuda"):
    """Seeded bf16 expert weights in SGLang's layout and the runner config SGLang's fused MoE is called with:
    (w13 [E, 2I, D], w2 [E, D, I], bytes of one expert, MoeRunnerConfig)."""
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig

    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device=device, dtype=torch.bfloat16).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, device=device, dtype=torch.bfloat16).mul_(I**-0.5)
    runner = MoeRunnerConfig(
        num_experts=E, num_local_experts=E, hidden_size=D, intermediate_size_per_partition=I, top_k=K,
        params_dtype=torch.bfloat16, activation="silu", is_gated=True, inplace=False,
    )  # fmt: skip
    return w13, w2, (w13[0].numel() + w2[0].numel()) * 2, runner
