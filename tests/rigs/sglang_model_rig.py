"""Builds SGLang's MicroTurnForCausalLM on CPU (real SGLang layers, gloo world of one) in a fresh process, so
the parallel state it initializes never leaks into other tests. Prints one JSON object of findings.

    python tests/rigs/sglang_model_rig.py CHECKPOINT_DIR PORT
"""

import contextlib
import json
import sys
import types

import torch


@contextlib.contextmanager
def sglang_cpu_model(ckpt: str, port: int, dtype: torch.dtype = torch.float32):
    """Yields (MicroTurnForCausalLM built with `dtype` parameters and the checkpoint loaded, checkpoint
    tensors) inside a gloo world of one; the model classes are registered first."""
    # The CPU branch of SGLang's RotaryEmbedding imports vllm's rope kernel at construction (never called here).
    vllm = types.ModuleType("vllm")
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = None
    sys.modules.setdefault("vllm", vllm)
    sys.modules.setdefault("vllm._custom_ops", ops)

    from safetensors.torch import load_file
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import get_context, get_parallel
    from transformers import AutoConfig

    from sglang_microturn.server import model_registry
    from sglang_microturn.server.microturn_model import MicroTurnForCausalLM

    model_registry.install()
    get_context().override_server_args().install()
    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    initialize_model_parallel(1, 1)
    one = {k: 1 for k in ("world_size", "tp_size", "pp_size", "moe_ep_size", "moe_dp_size", "moe_tp_size",
                          "attn_tp_size", "attn_cp_size", "attn_dp_size")}
    zero = {k: 0 for k in ("world_rank", "tp_rank", "pp_rank", "moe_ep_rank", "moe_dp_rank", "moe_tp_rank",
                           "attn_tp_rank", "attn_cp_rank", "attn_dp_rank")}
    tensors = load_file(f"{ckpt}/model.safetensors")
    with get_parallel().override(**one, **zero):
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = MicroTurnForCausalLM(AutoConfig.from_pretrained(ckpt))
        finally:
            torch.set_default_dtype(default_dtype)
        model.load_weights(tensors.items())
        yield model, tensors


def main(ckpt: str, port: int) -> dict:
    from sglang.srt.models.registry import ModelRegistry

    from sglang_microturn.server import model_registry
    from sglang_microturn.server.microturn_model import CheckpointMismatch, sglang_param_name
    from sglang_microturn.model.reference_model import load_reference

    ref = load_reference(ckpt, dtype=torch.float32)
    with sglang_cpu_model(ckpt, port) as (model, tensors):
        found = {"install": model_registry.install(),
                 "resolved": ModelRegistry.resolve_model_cls(["MicroTurnForCausalLM"])[0].__name__,
                 "block_class": type(model.model.layers[0].mlp).__name__}
        params = dict(model.named_parameters())
        # Every parameter equals the checkpoint tensors stacked the way the reference stacks them.
        order = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1, "down_proj": 0}

        def rank(ckpt_name):  # (expert, shard) as SGLang stacks them
            parts = ckpt_name.split(".")
            expert = int(parts[parts.index("experts") + 1]) if "experts" in parts else 0
            return expert, order.get(parts[-2], 0)

        groups = {}
        for name in sorted(tensors, key=rank):
            groups.setdefault(sglang_param_name(name), []).append(tensors[name])
        mism = []
        for name, parts in groups.items():
            if "experts.w13" in name:  # [gate_e; up_e] per expert
                want = torch.stack([torch.cat(parts[i:i + 2]) for i in range(0, len(parts), 2)])
            elif "experts.w2" in name:
                want = torch.stack(parts)
            else:
                want = torch.cat(parts)
            if not torch.equal(params[name].float(), want.float()):
                mism.append(name)
        found["param_mismatches"] = mism
        found["w13_equals_reference"] = torch.equal(params["model.layers.1.mlp.experts.w13_weight"].float(),
                                                    ref.layers[1].mlp.w13)
        # The MoE block (router, top-k, experts, shared expert) runs on CPU: compare with the reference's.
        x = torch.randn(9, ref.spec.hidden_size, generator=torch.Generator().manual_seed(0))
        diffs = [(model.model.layers[i].mlp(x) - ref.layers[i].mlp(x)).abs().max().item()
                 for i in range(ref.spec.num_layers)]
        found["moe_block_max_abs_diff"] = max(diffs)
        found["shared_expert_share"] = (ref.layers[0].mlp.shared_down(torch.nn.functional.silu(
            ref.layers[0].mlp.shared_gate_up(x).chunk(2, -1)[0]) * ref.layers[0].mlp.shared_gate_up(x).chunk(2, -1)[1])
        ).abs().max().item()
        try:
            model.load_weights((k, v) for k, v in tensors.items() if "shared_expert.down_proj" not in k)
            found["mismatch_error"] = None
        except CheckpointMismatch as e:
            found["mismatch_error"] = str(e)
    return found


if __name__ == "__main__":
    print("RIG " + json.dumps(main(sys.argv[1], int(sys.argv[2]))))
