"""The reference model in aligned mode (the trainer side of alignment, sglang_microturn.alignment.aligned_forward):
a token's logprob is bitwise the same in a one-shot forward, any chunking over the KV cache, or one token at
a time; and it stays close to the fp32 reference (bf16 rounding only).

CPU: Triton interpreter; MoE blocks widened for the tiny shapes (`fast_moe`) so the interpreter runs few
programs (tests/rigs/sglang_aligned_rig.py); the same config serves every path.
"""

import pytest
import torch
from sglang_aligned_rig import FAST_TINY_MOE

from microturn_kernels import moe_gemv
from sglang_microturn.model.checkpoints import preset, write_checkpoint
from sglang_microturn.model.reference_model import load_reference, score
from sglang_microturn.alignment.aligned_reference import score_aligned

SEQ = 40


@pytest.fixture(scope="module")
def tiny_shared(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("aligned") / "tiny_shared", preset("tiny", shared_expert_width=24))


@pytest.fixture(autouse=True)
def fast_moe(monkeypatch):
    for key, config in FAST_TINY_MOE.items():
        monkeypatch.setitem(moe_gemv._CONFIGS, key, config)


def _ids(n=SEQ, seed=0):
    return torch.randint(0, 832, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(tiny_shared):
    return load_reference(tiny_shared, dtype=torch.bfloat16)


def test_chunkings_and_one_token_at_a_time_are_bitwise_equal(model):
    ids = _ids()
    one_shot = score_aligned(model, ids)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # random micro-turn chunkings
        cuts = sorted(torch.randperm(SEQ - 1, generator=g)[:5].add(1).tolist())
        chunks = [b - a for a, b in zip([0, *cuts], [*cuts, SEQ])]
        assert torch.equal(score_aligned(model, ids, chunks), one_shot), chunks
    assert torch.equal(score_aligned(model, ids[:16], [1] * 16), one_shot[:15])


def test_close_to_fp32_reference_and_checks_its_inputs(model, tiny_shared):
    ids = _ids(seed=2)
    diff = (score_aligned(model, ids) - score(load_reference(tiny_shared), ids)).abs()
    assert diff.median() < 0.05 and diff.max() < 0.5  # bf16 rounding of a near-uniform tiny model
    with pytest.raises(ValueError, match="sum to the sequence length 40"):
        score_aligned(model, ids, [10, 10])
    with pytest.raises(ValueError, match="bf16 weights only, found torch.float32"):
        score_aligned(load_reference(tiny_shared), ids)


@pytest.mark.gpu
def test_small_preset_on_gpu_bitwise_across_chunkings(tmp_path):
    """The serve default's shapes with the compiled kernels (MICROTURN_GPU_TESTS=1 pytest -m gpu)."""
    model = load_reference(write_checkpoint(tmp_path / "small", "small"), device="cuda", dtype=torch.bfloat16)
    ids = _ids(600, seed=5)
    one_shot = score_aligned(model, ids)
    assert torch.equal(score_aligned(model, ids, [256, 16, 1, 1, 300, 26]), one_shot)
    assert torch.equal(score_aligned(model, ids[:40], [1] * 40), one_shot[:39])
