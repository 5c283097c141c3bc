"""The default checkpoint: built locally, deterministic, loadable as a standard HF Qwen3-MoE folder."""

import json

import pytest
import torch

from sglang_microturn import cli
from sglang_microturn.default_model import MoEConfig, ensure_default_checkpoint, write_checkpoint

TINY = MoEConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 num_experts=4, experts_per_token=2, expert_width=32, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY)


def test_transformers_loads_every_tensor_and_runs(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_text_and_decodes_every_id(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "hello there, micro-turns! 200 ms"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < 512 and tok.eos_token_id == 1 and tok.bos_token_id == 0
    assert all(isinstance(tok.decode([i]), str) for i in range(512))


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    again = load_file(write_checkpoint(tmp_path / "again", TINY) / "model.safetensors")
    first = load_file(tiny_checkpoint / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(write_checkpoint(tmp_path / "other", MoEConfig(**{**TINY.__dict__, "seed": 1})) / "model.safetensors")
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_refuses_to_overwrite_a_checkpoint(tiny_checkpoint, capsys):
    before = (tiny_checkpoint / "config.json").read_text()
    assert cli.main(["make-model", "--out", str(tiny_checkpoint)]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tiny_checkpoint / "config.json").read_text() == before


def test_cache_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROTURN_CACHE", str(tmp_path))
    first = ensure_default_checkpoint(TINY)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_checkpoint(TINY) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover build folders
    assert json.loads((first / "config.json").read_text())["microturn_default_model"]["seed"] == 0
