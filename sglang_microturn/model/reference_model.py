"""MicroTurnForCausalLM in plain PyTorch: the "trainer" forward and the reference SGLang's serving is
checked against. Runs on CPU and GPU, fp32 or bf16, with an optional KV cache for incremental forwards.

The math is SGLang's Qwen3-MoE (sglang/srt/models/qwen3_moe.py) plus our optional shared expert:
  x = embed(ids)
  per layer:  h = x + o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))      pre-norm: input_layernorm
              x = h + moe(post_attention_layernorm(h)) [+ shared_expert(same input)]
  logits = lm_head(norm(x))
RMSNorm in fp32 (weight applied in fp32, then cast); per-head q/k RMSNorm; RoPE neox style (rotate halves);
GQA (query head h reads kv head h // (H / KV)); router softmax in fp32 over all E, top-A, renormalized;
experts SiLU(gate) * up -> down; routed sum in fp32. In bf16 the residual stream is rounded to bf16 after
every add, as SGLang's fused add-RMSNorm does.

Aligned mode (sglang_microturn/alignment/aligned_reference.py: `score_aligned`, `AlignedKVCache`) runs this
model's weights (`aligned_weights`) in bf16 through `aligned_forward`, the forward the server runs under
`--alignment-mode`: the trainer side of trainer-sampler alignment (docs/alignment.md).

Glossary: B batch, T new tokens, P past (cached) tokens, D hidden, H query heads, KV kv heads, hd head dim,
E experts, A active experts per token, I expert width, S shared-expert width, V vocab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sglang_microturn.alignment import aligned_forward
from sglang_microturn.model.checkpoints import ModelSpec, spec_from_hf_config


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, hd/2] in fp32 for integer positions [T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding of x [B, heads, T, hd]; computed in fp32, returned in x.dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Per-layer keys and values [B, KV, P, hd] of the tokens already run; `forward` appends to it."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        D, hd = spec.hidden_size, spec.head_dim
        self.spec = spec
        self.q_proj = nn.Linear(D, spec.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, spec.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, spec.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, D, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        q = apply_rope(rms_norm(q, self.q_norm, s.rms_norm_eps), cos, sin)
        k = apply_rope(rms_norm(k, self.k_norm, s.rms_norm_eps), cos, sin)
        past = 0
        if cache is not None:
            if cache.k[layer] is not None:
                past = cache.k[layer].shape[2]
                k = torch.cat([cache.k[layer], k], dim=2)  # [B, KV, P+T, hd]
                v = torch.cat([cache.v[layer], v], dim=2)
            cache.k[layer], cache.v[layer] = k, v
        group = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, P+T, hd]
        # Query t (position past + t) sees keys 0..past + t.
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.head_dim**-0.5)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))


class MoE(nn.Module):
    """Top-A routed experts (weights stacked in SGLang's layout: w13 [E, 2I, D] = [gate; up], w2 [E, D, I])
    plus an optional always-on shared expert."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        D, E, I, S = spec.hidden_size, spec.num_experts, spec.expert_width, spec.shared_expert_width
        self.spec = spec
        self.gate = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.shared_gate_up = nn.Linear(D, 2 * S, bias=False) if S else None
        self.shared_down = nn.Linear(S, D, bias=False) if S else None
        self.backend = "loop"  # "loop": per-expert GEMMs (any T); "kernels": microturn_kernels.moe_reference

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32 [T, A], expert ids [T, A]) for x [T, D]."""
        probs = self.gate(x).float().softmax(dim=-1)  # [T, E]
        weights, ids = probs.topk(self.spec.experts_per_token, dim=-1)  # [T, A]
        return weights / weights.sum(-1, keepdim=True), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        weights, ids = self.route(x)
        if self.backend == "kernels":
            from microturn_kernels.moe_reference import moe_reference

            out = moe_reference(x, self.w13, self.w2, weights, ids,
                                kernel_rounding=x.dtype == torch.bfloat16, out_dtype=torch.float32)
        else:
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
            for e in ids.unique().tolist():
                tok, slot = (ids == e).nonzero(as_tuple=True)  # the (token, slot) pairs routed to e
                gate, up = (x[tok] @ self.w13[e].t()).chunk(2, dim=-1)  # [n, I] each
                y = (F.silu(gate) * up) @ self.w2[e].t()  # [n, D]
                out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        out = out.to(x.dtype)
        if self.shared_gate_up is not None:
            gate, up = self.shared_gate_up(x).chunk(2, dim=-1)  # [T, S] each
            out = out + self.shared_down(F.silu(gate) * up)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.input_layernorm = nn.Parameter(torch.ones(spec.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(spec.hidden_size))
        self.self_attn = Attention(spec)
        self.mlp = MoE(spec)

    def forward(self, x, cos, sin, cache, layer):
        eps = self.spec.rms_norm_eps
        x = x + self.self_attn(rms_norm(x, self.input_layernorm, eps), cos, sin, cache, layer)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm, eps))


class MicroTurnReference(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = nn.Parameter(torch.ones(spec.hidden_size))
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def set_moe_backend(self, backend: str) -> None:
        if backend not in ("loop", "kernels"):
            raise ValueError(f"MoE backend {backend!r}: choose 'loop' or 'kernels'")
        for layer in self.layers:
            layer.mlp.backend = backend

    def aligned_weights(self) -> aligned_forward.AlignedWeights:
        """This model's parameters in `aligned_forward`'s layout (q/k/v stacked as SGLang stacks them)."""
        s = self.spec
        shape = aligned_forward.AlignedShape(
            num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, rms_norm_eps=s.rms_norm_eps,
            rope_theta=s.rope_theta, max_positions=s.max_position_embeddings,
            experts_per_token=s.experts_per_token, renormalize=True,
        )  # fmt: skip
        layers = []
        for block in self.layers:
            att, moe = block.self_attn, block.mlp
            layers.append(aligned_forward.LayerWeights(
                input_norm=block.input_layernorm,
                qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
                q_norm=att.q_norm, k_norm=att.k_norm, o_proj=att.o_proj.weight,
                post_norm=block.post_attention_layernorm, router=moe.gate.weight, w13=moe.w13, w2=moe.w2,
                shared_gate_up=None if moe.shared_gate_up is None else moe.shared_gate_up.weight,
                shared_down=None if moe.shared_down is None else moe.shared_down.weight,
            ))  # fmt: skip
        weights = aligned_forward.AlignedWeights(shape, self.embed_tokens.weight, tuple(layers), self.norm,
                                                 self.lm_head.weight)
        weights.check()
        return weights

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits fp32 [B, T, V] for ids [B, T] (or [T] -> [T, V]) at positions cache.length ... + T - 1.
        With a cache, keys and values of these tokens are appended to it."""
        squeeze = ids.dim() == 1
        ids = ids[None] if squeeze else ids
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        x = self.embed_tokens(ids)  # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        logits = self.lm_head(rms_norm(x, self.norm, self.spec.rms_norm_eps)).float()
        return logits[0] if squeeze else logits


def state_dict_from_checkpoint(tensors: dict, spec: ModelSpec) -> dict:
    """Checkpoint tensors (HF Qwen3-MoE names, per-expert) -> MicroTurnReference state dict."""
    sd = {
        "embed_tokens.weight": tensors["model.embed_tokens.weight"],
        "norm": tensors["model.norm.weight"],
        "lm_head.weight": tensors["lm_head.weight"],
    }
    for layer in range(spec.num_layers):
        src, dst = f"model.layers.{layer}.", f"layers.{layer}."
        sd[dst + "input_layernorm"] = tensors[src + "input_layernorm.weight"]
        sd[dst + "post_attention_layernorm"] = tensors[src + "post_attention_layernorm.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[dst + f"self_attn.{name}.weight"] = tensors[src + f"self_attn.{name}.weight"]
        sd[dst + "self_attn.q_norm"] = tensors[src + "self_attn.q_norm.weight"]
        sd[dst + "self_attn.k_norm"] = tensors[src + "self_attn.k_norm.weight"]
        sd[dst + "mlp.gate.weight"] = tensors[src + "mlp.gate.weight"]
        experts = [f"{src}mlp.experts.{e}." for e in range(spec.num_experts)]
        sd[dst + "mlp.w13"] = torch.stack(
            [torch.cat([tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"]]) for p in experts])
        sd[dst + "mlp.w2"] = torch.stack([tensors[p + "down_proj.weight"] for p in experts])
        if spec.shared_expert_width:
            p = src + "mlp.shared_expert."
            sd[dst + "mlp.shared_gate_up.weight"] = torch.cat([tensors[p + "gate_proj.weight"],
                                                               tensors[p + "up_proj.weight"]])
            sd[dst + "mlp.shared_down.weight"] = tensors[p + "down_proj.weight"]
    return sd


def load_reference(path, device="cpu", dtype: torch.dtype = torch.float32) -> MicroTurnReference:
    """The reference model with a checkpoint folder's weights, on `device` in `dtype`."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = spec_from_hf_config(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = MicroTurnReference(spec)
    sd = state_dict_from_checkpoint(load_file(str(path / "model.safetensors")), spec)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def score(model: MicroTurnReference, ids, chunk: int | None = None) -> torch.Tensor:
    """logprobs fp32 [T - 1]: log p(ids[t] | ids[:t]) for t = 1 .. T - 1, in one forward (chunk=None) or in
    forwards of `chunk` tokens over a KV cache."""
    device = model.embed_tokens.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if chunk is None:
        logits = model(ids)  # [T, V]
    else:
        cache = KVCache.empty(model.spec.num_layers)
        logits = torch.cat([model(ids[i:i + chunk], cache) for i in range(0, len(ids), chunk)])
    return logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 .. T - 1 from fp32 logits [T, V]: torch.log_softmax on fp32 rows, the
    op SGLang's sampler and input-logprob path apply to the logits it returns."""
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[1:, None])[:, 0]
