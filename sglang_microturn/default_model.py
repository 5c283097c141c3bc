"""The default checkpoint `sglang-microturn serve` runs: a small SGLang-native MoE built locally.

Nothing is downloaded: weights are seeded random bf16, the tokenizer is a byte-level BPE built from a fixed
alphabet. The architecture is Qwen3-MoE (SGLang serves it natively) until the micro-turn model replaces it.
The checkpoint is a plain HF folder: config.json, generation_config.json, model.safetensors, tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
_BOS, _EOS, _PAD = range(3)


@dataclass(frozen=True)
class MoEConfig:
    """Sizes of the default model. Letters used in shape comments: V vocab, D hidden, H/KV heads, E experts, I expert width."""

    vocab_size: int = 4096
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 16
    experts_per_token: int = 2
    expert_width: int = 256
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    seed: int = 0


def _hf_config(cfg: MoEConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.expert_width * cfg.experts_per_token,  # dense-MLP width, unused: every layer is MoE
        "moe_intermediate_size": cfg.expert_width,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "pad_token_id": _PAD,
        "torch_dtype": "bfloat16",
        "microturn_default_model": asdict(cfg),  # provenance: rebuilds bit-identically from these values
    }


def _weights(cfg: MoEConfig) -> dict:
    """Seeded random weights under the HF Qwen3-MoE tensor names (per-expert tensors, as on the Hub)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    D, hd, I = cfg.hidden_size, cfg.head_dim, cfg.expert_width
    sd = {
        "model.embed_tokens.weight": normal(cfg.vocab_size, D),
        "model.norm.weight": ones(D),
        "lm_head.weight": normal(cfg.vocab_size, D),
    }
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = ones(D)
        sd[p + "post_attention_layernorm.weight"] = ones(D)
        sd[p + "self_attn.q_proj.weight"] = normal(cfg.num_heads * hd, D)
        sd[p + "self_attn.k_proj.weight"] = normal(cfg.num_kv_heads * hd, D)
        sd[p + "self_attn.v_proj.weight"] = normal(cfg.num_kv_heads * hd, D)
        sd[p + "self_attn.o_proj.weight"] = normal(D, cfg.num_heads * hd)
        sd[p + "self_attn.q_norm.weight"] = ones(hd)
        sd[p + "self_attn.k_norm.weight"] = ones(hd)
        sd[p + "mlp.gate.weight"] = normal(cfg.num_experts, D)
        for e in range(cfg.num_experts):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = normal(I, D)
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = normal(I, D)
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = normal(D, I)
    return sd


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE: any text encodes (~1 id per byte, common letter pairs merged), every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + tuple(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab.setdefault(token, len(vocab))
    merges = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in "Ġ" + letters:  # 'Ġ' is the byte-level space
        for b in letters:
            if len(vocab) < vocab_size:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    while len(vocab) < vocab_size:  # ids that decode but that encoding never produces
        vocab[f"<|unused_{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIAL_TOKENS[_BOS],
                "eos_token": SPECIAL_TOKENS[_EOS],
                "pad_token": SPECIAL_TOKENS[_PAD],
                "model_max_length": 1 << 20,
                "add_bos_token": False,
            },
            indent=2,
        )
    )


def write_checkpoint(out: str | os.PathLike, cfg: MoEConfig = MoEConfig()) -> Path:
    """Write the checkpoint to `out` (created; must not hold another checkpoint). Returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, cfg.vocab_size)
    (out / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": _BOS, "eos_token_id": _EOS, "pad_token_id": _PAD, "do_sample": False})
    )
    save_file(_weights(cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def cache_dir() -> Path:
    base = os.environ.get("MICROTURN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sglang-microturn"
    )
    return Path(base)


def ensure_default_checkpoint(cfg: MoEConfig = MoEConfig()) -> Path:
    """The cached default checkpoint, built on first use. Built in a temp folder and renamed into place, so
    an interrupted build never leaves a half-written checkpoint that a later run would serve."""
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    final = cache_dir() / f"default-moe-{digest}"
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        write_checkpoint(tmp, cfg)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
