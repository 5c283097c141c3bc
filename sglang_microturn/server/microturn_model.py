"""MicroTurnForCausalLM inside SGLang: SGLang's Qwen3-MoE (fused MoE, RadixAttention, every attention
backend) plus an optional shared expert, over the micro-turn vocabulary. Imports SGLang: load it only in a
server process (our plugin's `model_registry.install()` registers it); `reference_model.py` is the same math
in plain PyTorch.

Config: a Qwen3-MoE config.json (model_type "qwen3_moe") with `microturn_shared_expert_width` (0 = none).
Weights: HF Qwen3-MoE names plus `mlp.shared_expert.{gate,up,down}_proj`; `load_weights` refuses a
checkpoint whose tensor names do not cover every parameter exactly (upstream silently skips unknown names).
Not supported with a shared expert: DeepEP / other all-to-all MoE backends (ValueError at construction).

Alignment mode (MICROTURN_ALIGNMENT=1, set by `sglang-microturn serve --alignment-mode`): the decoder stack
(`MicroTurnModel.forward`) runs `aligned_forward.forward_hidden` over this model's own parameters,
RadixAttention (the `microturn_aligned` backend) and KV cache, and the logits come from
`AlignedLogitsProcessor`; the trainer runs the same functions (aligned_reference.score_aligned). The aligned
forward sits in the decoder stack, not only in the outer `forward`, because that stack is what SGLang's prefill
CUDA graphs capture (`PrefillCudaGraphRunner` replays `model.model.forward`, then runs the outer forward's
logits tail eagerly). Single GPU only (no TP/PP/EP). docs/alignment.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

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
from sglang.srt.utils.hf_transformers_utils import get_rope_config

from sglang_microturn.alignment import aligned_forward
from sglang_microturn.alignment.aligned_forward import AlignmentConfigError


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
    """Qwen3-MoE's decoder stack; in alignment mode (`aligned_view` given: it returns the model's weights in
    the aligned forward's layout) its forward is the aligned one, returning the final-normed hidden states."""

    def __init__(self, config, quant_config=None, prefix="",
                 aligned_view: Callable[[], aligned_forward.AlignedWeights] | None = None):
        super().__init__(config, quant_config, prefix=prefix, decoder_layer_type=MicroTurnDecoderLayer)
        self.aligned_view = aligned_view

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None, **kwargs):
        if self.aligned_view is None:
            return super().forward(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, **kwargs)
        if input_embeds is not None:
            raise AlignmentConfigError("alignment mode takes token ids, not input_embeds")
        layers = self.layers

        def attend(i, q, k, v):
            return layers[i].self_attn.attn(q, k, v, forward_batch)

        # One GPU (check_alignment_setup): this process computes the only rank, so no reduction.
        return aligned_forward.forward_hidden([aligned_forward.RankForward(self.aligned_view(), attend)],
                                              input_ids, positions)


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


class AlignedLogitsProcessor(LogitsProcessor):
    """SGLang's LogitsProcessor (pruning, input logprobs, logits buffers) with the lm_head product replaced by
    the batch-invariant one of alignment mode (fp32 logits, as the trainer computes them)."""

    def _compute_lm_head(self, hidden_states, lm_head, embedding_bias=None):
        if embedding_bias is not None:
            raise AlignmentConfigError("alignment mode: an lm_head embedding bias is not supported")
        return aligned_forward.logits(lm_head.weight, hidden_states)


def check_alignment_setup(model: "MicroTurnForCausalLM") -> None:
    """Raise AlignmentConfigError unless this model can run alignment mode (one GPU, plain RoPE, no quant)."""
    par = get_parallel()
    sizes = {"tp": par.tp_size, "pp": par.pp_size, "moe_ep": par.moe_ep_size, "attn_cp": par.attn_cp_size}
    if any(v != 1 for v in sizes.values()) or model.quant_config is not None:
        raise AlignmentConfigError(
            f"alignment mode runs on one GPU without quantization, got {sizes}, quant_config="
            f"{model.quant_config}; drop --tp/--pp/--ep/--quantization or --alignment-mode")
    _theta, scaling = get_rope_config(model.config)
    if scaling and scaling.get("rope_type", "default") != "default":  # transformers 5: plain RoPE is "default"
        raise AlignmentConfigError(f"alignment mode: rope_scaling {scaling} is not supported (plain RoPE only)")


class MicroTurnForCausalLM(Qwen3MoeForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        # Qwen3MoeForCausalLM.__init__ with our model class (as upstream's MellumForCausalLM does).
        nn.Module.__init__(self)
        self.pp_group = get_pp_group()
        self.config = config
        self.quant_config = quant_config
        self.alignment = aligned_forward.alignment_enabled()
        self._aligned: aligned_forward.AlignedWeights | None = None  # built once the weights are loaded
        self.model = MicroTurnModel(config, quant_config, prefix=add_prefix("model", prefix),
                                    aligned_view=self.aligned if self.alignment else None)
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=quant_config,
            prefix=add_prefix("lm_head", prefix), use_attn_tp_group=get_parallel().enable_dp_lm_head,
        )
        self.capture_aux_hidden_states = False
        self.attn_cp_size = get_parallel().attn_cp_size
        self.attn_cp_rank = get_parallel().attn_cp_rank
        self.moe_dp_size = get_parallel().moe_dp_size
        self.logits_processor = (AlignedLogitsProcessor if self.alignment else LogitsProcessor)(config)
        if self.alignment:
            check_alignment_setup(self)

    def aligned_weights(self) -> aligned_forward.AlignedWeights:
        """This model's parameters, borrowed, in `aligned_forward`'s layout (tensors are SGLang's own, so
        weight updates in place are seen)."""
        cfg = self.config
        attn0 = self.model.layers[0].self_attn
        shape = aligned_forward.AlignedShape(
            num_heads=attn0.num_heads, num_kv_heads=attn0.num_kv_heads, head_dim=attn0.head_dim,
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=float(attn0.rope_theta),
            max_positions=cfg.max_position_embeddings, experts_per_token=cfg.num_experts_per_tok,
            renormalize=bool(cfg.norm_topk_prob),
        )  # fmt: skip
        layers = []
        for layer in self.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            shared = getattr(mlp, "shared_expert", None)
            layers.append(aligned_forward.LayerWeights(
                input_norm=layer.input_layernorm.weight, qkv=att.qkv_proj.weight, q_norm=att.q_norm.weight,
                k_norm=att.k_norm.weight, o_proj=att.o_proj.weight, post_norm=layer.post_attention_layernorm.weight,
                router=mlp.gate.weight, w13=mlp.experts.w13_weight, w2=mlp.experts.w2_weight,
                shared_gate_up=None if shared is None else shared.gate_up_proj.weight,
                shared_down=None if shared is None else shared.down_proj.weight,
            ))  # fmt: skip
        weights = aligned_forward.AlignedWeights(shape, self.model.embed_tokens.weight, tuple(layers),
                                                 self.model.norm.weight, self.lm_head.weight)
        weights.check()
        return weights

    def aligned(self) -> aligned_forward.AlignedWeights:
        """The aligned weight view, built on first use (load_weights builds it: never first inside a capture)."""
        if self._aligned is None:
            self._aligned = self.aligned_weights()
        return self._aligned

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        if not self.alignment:
            return super().forward(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        hidden = self.model(input_ids, positions, forward_batch, input_embeds)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_mtp: bool = False):
        seen: list[str] = []

        def recorded():
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor

        super().load_weights(recorded(), is_mtp=is_mtp)
        if self.pp_group.world_size == 1:  # with pipeline stages each rank holds only some parameters
            check_names(seen, (n for n, _ in self.named_parameters()))
        if self.alignment:
            # Build the weight view and the RoPE table now, on the weights' device: never first inside a
            # CUDA-graph capture.
            self._aligned = self.aligned_weights()
            s = self._aligned.shape
            aligned_forward.rope_table(s.head_dim, s.rope_theta, s.max_positions, str(self._aligned.embed.device))


EntryClass = MicroTurnForCausalLM
