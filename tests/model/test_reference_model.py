"""The PyTorch reference of MicroTurnForCausalLM on CPU: deterministic, KV-cached == full forward,
equal to transformers' Qwen3-MoE on a checkpoint without a shared expert.

Tolerances (fp32): incremental vs full forward and loop vs kernels MoE within 1e-4 absolute on logits of
std ~3 (summation order only); transformers vs reference within 1e-4.
"""

import pytest
import torch

from sglang_microturn.model.checkpoints import preset, write_checkpoint
from sglang_microturn.format.layout import DEFAULT_LAYOUT, InputEvents, OutputEvents
from sglang_microturn.model.reference_model import KVCache, load_reference, score

FP32_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ref") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny_shared(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ref") / "tiny_shared", preset("tiny", shared_expert_width=24))


def _conversation_ids(turns=4):
    rng = torch.Generator().manual_seed(0)
    conv = [(InputEvents(audio=torch.randint(0, 16, (5, 16), generator=rng).numpy(), text=b"hey"),
             OutputEvents(b"ok" * k)) for k in range(turns)]
    return torch.tensor(DEFAULT_LAYOUT.interleave(conv))


def test_deterministic_from_seed(tiny, tmp_path):
    ids = _conversation_ids(2)
    again = write_checkpoint(tmp_path / "again", "tiny")
    assert torch.equal(load_reference(tiny)(ids), load_reference(again)(ids))
    other = write_checkpoint(tmp_path / "other", preset("tiny", seed=1))
    assert not torch.allclose(load_reference(tiny)(ids), load_reference(other)(ids))


@pytest.mark.parametrize("ckpt", ["tiny", "tiny_shared"])
@pytest.mark.parametrize("chunks", [[1] * 12, [114, 1, 1, 113, 7], [5, 300, 140]])
def test_kv_cached_incremental_equals_full(ckpt, chunks, request):
    model = load_reference(request.getfixturevalue(ckpt))
    ids = _conversation_ids(4)[:sum(chunks)]
    full = model(ids)
    cache, parts, i = KVCache.empty(model.spec.num_layers), [], 0
    for n in chunks:
        parts.append(model(ids[i:i + n], cache))
        i += n
    assert cache.length == len(ids)
    torch.testing.assert_close(torch.cat(parts), full, atol=FP32_ATOL, rtol=0)


def test_score_chunked_equals_full_and_batch(tiny_shared):
    model = load_reference(tiny_shared)
    ids = _conversation_ids(3)
    lp = score(model, ids)
    assert lp.shape == (len(ids) - 1,) and (lp <= 0).all()
    torch.testing.assert_close(score(model, ids, chunk=114), lp, atol=FP32_ATOL, rtol=0)
    batch = model(torch.stack([ids, ids.flip(0)]))
    torch.testing.assert_close(batch[0], model(ids), atol=FP32_ATOL, rtol=0)


def test_kernels_moe_backend_matches_loop(tiny_shared):
    model = load_reference(tiny_shared)
    ids = _conversation_ids(1)
    loop = model(ids)
    model.set_moe_backend("kernels")
    torch.testing.assert_close(model(ids), loop, atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="MoE backend 'x'"):
        model.set_moe_backend("x")


def test_matches_transformers_qwen3_moe(tiny):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = _conversation_ids(2)
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    got = load_reference(tiny)(ids)
    assert got.std() > 1.0  # far from uniform: a wrong layer would show
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


def test_bf16_runs_close_to_fp32(tiny_shared):
    ids = _conversation_ids(2)
    lp32 = score(load_reference(tiny_shared), ids)
    lp16 = score(load_reference(tiny_shared, dtype=torch.bfloat16), ids)
    assert (lp16 - lp32).abs().median() < 0.1
