"""MicroTurnForCausalLM checkpoints: presets, HF loadability, tokenizer, determinism, cache, make-model."""

import json

import pytest
import torch

from sglang_microturn.cli import main as cli
from sglang_microturn.model.checkpoints import (
    PRESETS,
    UnknownPreset,
    ensure_checkpoint,
    preset,
    spec_from_hf_config,
    weight_shapes,
    write_checkpoint,
)
from sglang_microturn.model.default_model import DEFAULT_PRESET, ensure_default_checkpoint
from sglang_microturn.format.layout import DEFAULT_LAYOUT, Control


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


def test_config_is_a_qwen3_moe_config_with_our_architecture(tiny_checkpoint):
    from transformers import AutoConfig

    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["architectures"] == ["MicroTurnForCausalLM"] and raw["model_type"] == "qwen3_moe"
    assert raw["vocab_size"] == DEFAULT_LAYOUT.vocab.size and "bos_token_id" not in raw
    cfg = AutoConfig.from_pretrained(tiny_checkpoint)
    assert type(cfg).__name__ == "Qwen3MoeConfig" and cfg.microturn_shared_expert_width == 0
    assert cfg.eos_token_id == Control.YIELD
    assert spec_from_hf_config(raw) == PRESETS["tiny"] and raw["microturn_model"]["preset"] == "tiny"


def test_transformers_loads_every_tensor(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_sizes(name):
    spec = PRESETS[name]
    shapes = weight_shapes(spec)
    assert shapes["lm_head.weight"] == (DEFAULT_LAYOUT.vocab.size, spec.hidden_size)
    assert any("shared_expert" in n for n in shapes) == bool(spec.shared_expert_width)
    if name == "bench":
        assert (spec.num_experts, spec.experts_per_token, spec.hidden_size, spec.expert_width) == (128, 8, 2048, 768)


def test_tokenizer_ids_are_the_layouts(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    v = DEFAULT_LAYOUT.vocab
    assert len(tok) == v.size
    # No BOS: SGLang strips a leading BOS id from every session append, and appends start with <|pad|>/<|in|>.
    assert tok.bos_token_id is None and tok.eos_token_id == Control.YIELD and tok.pad_token_id == Control.PAD
    text = "hello, micro-turns! 200 ms ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert all(i in v.text_out for i in ids) and ids == [DEFAULT_LAYOUT.text_out_id(b) for b in text.encode()]
    assert tok.decode(ids) == text
    assert all(isinstance(tok.decode([i]), str) for i in range(v.size))
    assert tok.convert_ids_to_tokens([1, DEFAULT_LAYOUT.dmel_id(3, 7)]) == ["<|in|>", "<|dmel_3_7|>"]
    assert tok.decode(ids + [Control.YIELD], skip_special_tokens=True) == text


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    again = load_file(write_checkpoint(tmp_path / "again", "tiny") / "model.safetensors")
    first = load_file(tiny_checkpoint / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(write_checkpoint(tmp_path / "other", preset("tiny", seed=1)) / "model.safetensors")
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_make_model_cli(tmp_path, capsys):
    assert cli.main(["make-model", "--out", str(tmp_path / "m"), "--preset", "tiny"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["microturn_model"]["preset"] == "tiny"
    before = (tmp_path / "m" / "config.json").read_text()
    assert cli.main(["make-model", "--out", str(tmp_path / "m"), "--preset", "tiny"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "m" / "config.json").read_text() == before
    with pytest.raises(SystemExit):
        cli.main(["make-model", "--out", str(tmp_path / "n"), "--preset", "huge"])
    with pytest.raises(UnknownPreset, match="choose one of tiny, small, bench"):
        preset("huge")


def test_cache_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROTURN_CACHE", str(tmp_path))
    first = ensure_checkpoint("tiny")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_checkpoint("tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover build folders
    assert first.name.startswith("microturn-tiny-")


def test_serve_default_is_the_small_preset(monkeypatch):
    calls = []
    monkeypatch.setattr("sglang_microturn.model.default_model.ensure_checkpoint", lambda p: calls.append(p) or p)
    assert DEFAULT_PRESET == "small" and ensure_default_checkpoint() == "small" and calls == ["small"]
