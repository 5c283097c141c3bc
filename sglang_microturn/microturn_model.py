"""MicroTurnForCausalLM inside SGLang: SGLang's Qwen3-MoE (fused MoE, RadixAttention, every attention
backend) plus an optional shared expert, over the micro-turn vocabulary. Imports SGLang: load it only in a
server process (our plugin's `model_registry.install()` registers it); `reference_model.py` is the same math
in plain PyTorch.

Config: a Qwen3-MoE config.json (model_type "qwen3_moe") with `microturn_shared_expert_width` (0 = none).
Weights: HF Qwen3-MoE names plus `mlp.shared_expert.{gate,up,down}_proj`; `load_weights` refuses a
checkpoint whose tensor names do not cover every parameter exactly (upstream silently skips unknown names).
Not supported with a shared expert: DeepEP / other all-to-all MoE backends (ValueError at construction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from sglang.srt.distributed import (
    get_pp_group,
    moe_expert_parallel_all_reduce,
    moe_tensor_model_parallel_all_reduce,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.moe import get_moe_a2a_backend, should_skip_post_experts_all_reduce
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from sglang.srt.models.qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeMLP,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix


class CheckpointMismatch(ValueError):
    """The checkpoint's tensor names do not match the model's parameters one to one."""


class MicroTurnSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    """Qwen3-MoE's routed block plus an always-on shared expert, added before the TP/EP all-reduce."""

    shared_expert: nn.Module

    @classmethod
    def add_shared_expert(cls, block: Qwen3MoeSparseMoeBlock, width: int, config, quant_config, prefix: str):
        # Qwen3MoeDecoderLayer builds its block by name; converting the built block (instead of building a
        # second one) avoids allocating the routed experts twice.
        if get_moe_a2a_backend().is_deepep() or get_moe_a2a_backend().is_ascend_fuseep():
            raise ValueError("MicroTurnForCausalLM: a shared expert is not supported with an all-to-all MoE backend")
        block.__class__ = cls
        block.shared_expert = Qwen3MoeMLP(
            hidden_size=config.hidden_size, intermediate_size=width, hidden_act=config.hidden_act,
            quant_config=quant_config, reduce_results=False, prefix=add_prefix("shared_expert", prefix),
        )

    def forward_normal(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        shared = self.shared_expert(hidden_states)
        router_logits, _ = self.gate(hidden_states)
        topk_output = self.topk(hidden_states, router_logits)
        out = self.experts(hidden_states, topk_output) + shared
        if self.ep_size > 1 and not should_skip_post_experts_all_reduce(is_tp_path=False):
            out = moe_expert_parallel_all_reduce(out)
        if self.tp_size > 1 and not should_skip_post_experts_all_reduce(is_tp_path=True):
            out = moe_tensor_model_parallel_all_reduce(out)
        return out.view(num_tokens, hidden_dim)


class MicroTurnDecoderLayer(Qwen3MoeDecoderLayer):
    def __init__(self, config, layer_id, start_layer=0, quant_config=None, prefix="", alt_stream=None):
        super().__init__(config=config, layer_id=layer_id, start_layer=start_layer, quant_config=quant_config,
                         prefix=prefix, alt_stream=alt_stream)
        width = getattr(config, "microturn_shared_expert_width", 0) or 0
        if width:
            MicroTurnSparseMoeBlock.add_shared_expert(self.mlp, width, config, quant_config, add_prefix("mlp", prefix))


class MicroTurnModel(Qwen3MoeModel):
    def __init__(self, config, quant_config=None, prefix=""):
        super().__init__(config, quant_config, prefix=prefix, decoder_layer_type=MicroTurnDecoderLayer)


# (checkpoint name part, parameter name part), the renames SGLang's loader applies; first match wins.
_RENAMES = (
    (re.compile(r"mlp\.experts\.\d+\.(gate|up)_proj\.weight$"), "mlp.experts.w13_weight"),
    (re.compile(r"mlp\.experts\.\d+\.down_proj\.weight$"), "mlp.experts.w2_weight"),
    (re.compile(r"self_attn\.[qkv]_proj\.weight$"), "self_attn.qkv_proj.weight"),
    (re.compile(r"(gate|up)_proj\.weight$"), "gate_up_proj.weight"),
)


def sglang_param_name(checkpoint_name: str) -> str:
    """The SGLang parameter a checkpoint tensor is loaded into (stacked q/k/v, gate/up and experts)."""
    for pattern, target in _RENAMES:
        if pattern.search(checkpoint_name):
            return pattern.sub(target, checkpoint_name)
    return checkpoint_name


def check_names(checkpoint_names: Iterable[str], param_names: Iterable[str]) -> None:
    """Raise CheckpointMismatch unless the checkpoint fills every parameter and has nothing else."""
    mapped = {sglang_param_name(n): n for n in checkpoint_names}
    params = set(param_names)
    unused = sorted(n for p, n in mapped.items() if p not in params)
    unfilled = sorted(params - set(mapped))
    if unused or unfilled:
        raise CheckpointMismatch(
            f"checkpoint and MicroTurnForCausalLM disagree: tensors with no parameter {unused[:5]}"
            f"{' ...' if len(unused) > 5 else ''}; parameters no tensor fills {unfilled[:5]}"
            f"{' ...' if len(unfilled) > 5 else ''}. Rebuild it with `sglang-microturn make-model`"
        )


class MicroTurnForCausalLM(Qwen3MoeForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        # Qwen3MoeForCausalLM.__init__ with our model class (as upstream's MellumForCausalLM does).
        nn.Module.__init__(self)
        self.pp_group = get_pp_group()
        self.config = config
        self.quant_config = quant_config
        self.model = MicroTurnModel(config, quant_config, prefix=add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=quant_config,
            prefix=add_prefix("lm_head", prefix), use_attn_tp_group=get_parallel().enable_dp_lm_head,
        )
        self.logits_processor = LogitsProcessor(config)
        self.capture_aux_hidden_states = False
        self.attn_cp_size = get_parallel().attn_cp_size
        self.attn_cp_rank = get_parallel().attn_cp_rank
        self.moe_dp_size = get_parallel().moe_dp_size

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_mtp: bool = False):
        seen: list[str] = []

        def recorded():
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor

        super().load_weights(recorded(), is_mtp=is_mtp)
        if self.pp_group.world_size == 1:  # with pipeline stages each rank holds only some parameters
            check_names(seen, (n for n, _ in self.named_parameters()))


EntryClass = MicroTurnForCausalLM
