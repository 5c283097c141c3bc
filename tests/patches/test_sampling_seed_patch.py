"""Patch 0005: a request's sampling_seed is honoured outside deterministic mode (pytorch sampling backend).

SGLang's real `SamplingBatchInfo.from_schedule_batch` / `merge_batch` and its seeded top-k/top-p sampler run
on CPU over a small vocabulary. On SGLang as shipped (tests/rigs/pristine_sglang.py) the seed is dropped: the
batch carries no seed tensor and sampling falls back to unseeded multinomial.
"""

import torch

from pristine_sglang import run_on_pristine_sglang

VOCAB = 64
SEED = 1234


class _Batch:
    """What from_schedule_batch reads of a ScheduleBatch (the penalizers keep a weak reference to it)."""

    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def _req(seed):
    from types import SimpleNamespace

    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, sampling_seed=seed)
    params.normalize(None)
    return SimpleNamespace(sampling_params=params, custom_logit_processor=None, return_sampling_mask=False)


def _info(seeds):
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    return SamplingBatchInfo.from_schedule_batch(_Batch([_req(s) for s in seeds]), VOCAB)


def _sample(info, probs, positions):
    # SGLang's seeded sampler (what its pytorch sampling backend calls whenever the batch carries seeds).
    from sglang.srt.layers.sampler import multinomial_with_seed

    with torch.compiler.set_stance("force_eager"):  # its hash kernel under TRITON_INTERPRET=1, no dynamo
        return multinomial_with_seed(probs.log(), info.sampling_seed, positions).view(-1).tolist()


def seed_scenario() -> dict:
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(enable_streaming_session=True, sampling_backend="pytorch")
    override.install()
    try:
        probs = torch.softmax(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0)), -1)
        mixed = _info([SEED, None])  # the seeded request shares its batch with an unseeded one
        alone = _info([SEED])
        out = {"seeds_in_mixed_batch": None if mixed.sampling_seed is None else mixed.sampling_seed.tolist()}
        if mixed.sampling_seed is None:
            return out
        # The seeded request's token over 20 positions: alone vs beside another request, and a second seed.
        positions = range(100, 120)
        out["alone"] = [_sample(alone, probs[:1], torch.tensor([p]))[0] for p in positions]
        out["in_batch"] = [_sample(mixed, probs, torch.tensor([p, p]))[0] for p in positions]
        out["other_seed"] = [_sample(_info([SEED + 1]), probs[:1], torch.tensor([p]))[0] for p in positions]
        seeded, unseeded = _info([SEED]), _info([None])
        out["unseeded_alone_has_seeds"] = unseeded.sampling_seed is not None
        seeded.merge_batch(unseeded)  # a seeded running batch takes in an unseeded one, and the reverse
        out["merged"] = seeded.sampling_seed.tolist()
        unseeded, seeded = _info([None]), _info([SEED])
        unseeded.merge_batch(seeded)
        out["merged_reverse"] = unseeded.sampling_seed.tolist()
        return out
    finally:
        override.restore()


def test_seeded_request_is_reproducible_in_any_batch(sglang_ctx):
    out = seed_scenario()
    assert out["seeds_in_mixed_batch"][0] == SEED
    assert out["alone"] == out["in_batch"]  # the other request's presence changes nothing
    assert out["alone"] != out["other_seed"]  # the seed does decide the samples
    assert not out["unseeded_alone_has_seeds"]  # batches without seeds keep the unseeded sampler
    assert len(out["merged"]) == 2 and out["merged"][0] == SEED
    assert len(out["merged_reverse"]) == 2 and out["merged_reverse"][1] == SEED


def test_sglang_as_shipped_ignores_the_seed():
    assert run_on_pristine_sglang("test_sampling_seed_patch", "seed_scenario") == {"seeds_in_mixed_batch": None}
