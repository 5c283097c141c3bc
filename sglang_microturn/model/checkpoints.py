"""MicroTurnForCausalLM checkpoints, built locally from a seed: size presets, weights, tokenizer, cache.

A checkpoint is a plain HF folder (config.json, generation_config.json, model.safetensors, tokenizer files)
that SGLang loads by `architectures: ["MicroTurnForCausalLM"]` (our plugin registers the class) and that
transformers parses as a Qwen3-MoE config (`model_type: "qwen3_moe"`) carrying extra `microturn_*` fields:
the layout spec, the shared-expert width, the preset and seed. Nothing is downloaded.

Weight names are HF Qwen3-MoE's (per-expert tensors) plus, with a shared expert,
`model.layers.{l}.mlp.shared_expert.{gate,up,down}_proj.weight`. Without a shared expert the checkpoint is
also a valid HF Qwen3-MoE that transformers runs (tests compare it with our reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sglang_microturn import config
from sglang_microturn.format.layout import LayoutSpec, MicroTurnLayout

ARCHITECTURE = "MicroTurnForCausalLM"


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a MicroTurnForCausalLM. Letters in shape comments: V vocab, D hidden, H/KV heads,
    E experts, A active experts (top-k), I expert width, S shared-expert width."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    expert_width: int
    shared_expert_width: int = 0  # 0: no shared expert
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    seed: int = 0
    layout: LayoutSpec = field(default_factory=LayoutSpec)

    @property
    def vocab_size(self) -> int:
        return MicroTurnLayout(self.layout).vocab.size


PRESETS: dict[str, ModelSpec] = {
    # CPU tests: a forward of a few hundred tokens in milliseconds. No shared expert, so transformers'
    # Qwen3-MoE can run the same checkpoint as a cross-check.
    "tiny": ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4,
                      experts_per_token=2, expert_width=32, max_position_embeddings=16384),
    # The serve default: small enough to start in seconds, every feature on (shared expert included).
    "small": ModelSpec(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, num_experts=16,
                       experts_per_token=2, expert_width=256, shared_expert_width=256),
    # GPU benchmarks: Qwen3-30B-A3B-like MoE shapes (E=128, A=8, D=2048, I=768), few layers.
    "bench": ModelSpec(hidden_size=2048, num_layers=4, num_heads=32, num_kv_heads=4, head_dim=128,
                       num_experts=128, experts_per_token=8, expert_width=768),
}


class UnknownPreset(ValueError):
    pass


def preset(name: str, **overrides) -> ModelSpec:
    if name not in PRESETS:
        raise UnknownPreset(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def hf_config(spec: ModelSpec, preset_name: str | None = None) -> dict:
    from sglang_microturn.format.layout import Control

    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3_moe",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.expert_width * spec.experts_per_token,  # dense-MLP width, unused: all layers MoE
        "moe_intermediate_size": spec.expert_width,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        # No BOS on purpose: SGLang strips a leading BOS id from every session append.
        "eos_token_id": int(Control.YIELD),  # generation of a micro-turn stops at <|yield|>
        "pad_token_id": int(Control.PAD),
        "torch_dtype": "bfloat16",
        "microturn_shared_expert_width": spec.shared_expert_width,
        "microturn_layout": asdict(spec.layout),
        "microturn_model": {"preset": preset_name, **asdict(spec)},  # provenance: rebuilds bit-identically
    }


def spec_from_hf_config(config: dict) -> ModelSpec:
    """The ModelSpec a config.json was written from."""
    fields = dict(config["microturn_model"])
    fields.pop("preset", None)
    fields["layout"] = LayoutSpec(**fields["layout"])
    return ModelSpec(**fields)


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name and shape, in write order."""
    D, hd, I, S = spec.hidden_size, spec.head_dim, spec.expert_width, spec.shared_expert_width
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, D)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (spec.num_heads * hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (spec.num_kv_heads * hd, D)
        shapes[p + "self_attn.v_proj.weight"] = (spec.num_kv_heads * hd, D)
        shapes[p + "self_attn.q_norm.weight"] = (hd,)
        shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (D, spec.num_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate.weight"] = (spec.num_experts, D)
        for e in range(spec.num_experts):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, D)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (I, D)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (D, I)
        if S:
            shapes[p + "mlp.shared_expert.gate_proj.weight"] = (S, D)
            shapes[p + "mlp.shared_expert.up_proj.weight"] = (S, D)
            shapes[p + "mlp.shared_expert.down_proj.weight"] = (D, S)
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (spec.vocab_size, D)
    return shapes


def _init_std(name: str, shape: tuple[int, ...]) -> float | None:
    """None: a norm weight (ones). Else the normal std: fan-in scaled so every sublayer's output is O(1);
    a sharper router and lm_head so routing is decisive and next-token distributions are far from uniform
    (a check that compares logprobs would not notice a wrong layer in a near-uniform model)."""
    if len(shape) == 1:
        return None
    fan_in = shape[1]
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith("mlp.gate.weight"):
        return 2.0 * fan_in**-0.5
    if name == "lm_head.weight":
        return 3.0 * fan_in**-0.5
    return fan_in**-0.5


def make_weights(spec: ModelSpec) -> dict:
    """Seeded random bf16 weights (same seed and sizes -> bitwise the same tensors, on any machine)."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    out = {}
    for name, shape in weight_shapes(spec).items():
        std = _init_std(name, shape)
        t = torch.ones(shape) if std is None else torch.randn(shape, generator=gen) * std
        out[name] = t.to(torch.bfloat16)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer/decoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer(out: Path, layout: MicroTurnLayout) -> None:
    """A tokenizer whose ids are the layout's: text_out ids are byte-level characters (so the server's
    `text` is the model's UTF-8 output, and text prompts encode into the output stream); every other id
    (control, text_in, dMel, padding) is a special token named by `layout.token_name`. Every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    v, byte_char = layout.vocab, _bytes_to_unicode()
    vocab, special = {}, []
    for i in range(v.size):
        if i in v.text_out:
            vocab[byte_char[i - v.text_out.start]] = i
        else:
            name = layout.token_name(i)
            vocab[name] = i
            special.append(name)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": layout.token_name(4),
        "pad_token": layout.token_name(0),
        "model_max_length": 1 << 20,
        "add_bos_token": False,
        "add_eos_token": False,
    }, indent=2))


def write_checkpoint(out: str | os.PathLike, spec: ModelSpec | str = "small") -> Path:
    """Write a checkpoint of `spec` (a ModelSpec or a preset name) to `out` (created; must not hold another
    checkpoint). Returns the folder."""
    from safetensors.torch import save_file

    from sglang_microturn.format.layout import Control

    preset_name = spec if isinstance(spec, str) else None
    if isinstance(spec, str):
        spec = preset(spec)
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, MicroTurnLayout(spec.layout))
    (out / "config.json").write_text(json.dumps(hf_config(spec, preset_name), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": int(Control.YIELD), "pad_token_id": int(Control.PAD), "do_sample": False}))
    save_file(make_weights(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def cache_dir() -> Path:
    base = config.value(config.CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sglang-microturn"
    )
    return Path(base)


def ensure_checkpoint(spec: ModelSpec | str = "small") -> Path:
    """The cached checkpoint of `spec` (a ModelSpec or preset name), built on first use. Built in a temp
    folder and renamed into place, so an interrupted build never leaves a half-written checkpoint."""
    name = spec if isinstance(spec, str) else "custom"
    resolved = preset(spec) if isinstance(spec, str) else spec
    digest = hashlib.sha256(json.dumps(asdict(resolved), sort_keys=True).encode()).hexdigest()[:12]
    final = cache_dir() / f"microturn-{name}-{digest}"
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        write_checkpoint(tmp, spec)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
