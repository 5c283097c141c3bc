"""Patch 0008: input token logprobs report the last vocabulary id as itself, not as 0.

SGLang 0.5.17 builds `input_token_logprobs_idx` from the prompt ids and maps every id >= vocab_size - 1
to 0 (`SchedulerLogprobResultProcessor._process_input_token_logprobs`, meant to hide multimodal pad hashes,
which are far above the vocabulary), so the legal id vocab_size - 1 is reported as token 0, while its
logprob value is computed for the right id (`prepare_for_extend` clamps the logprob token ids to
[0, vocab_size - 1]). A re-score of a sequence holding that id shows the right logprob next to the wrong
token: the "token identity" flags of the alignment check (a random-weights model samples the last, padding
id of the micro-turn vocabulary about once in vocab_size tokens: 2-3 per ~2200).

The scenario runs SGLang's real `SchedulerLogprobResultProcessor.add_input_logprob_return_values` over a
prompt prefilled in two chunks (what a re-score longer than the chunked-prefill size does), on the
patched SGLang and on SGLang as shipped.
"""

from types import SimpleNamespace

from pristine_sglang import run_on_pristine_sglang

VOCAB = 832  # the default layout's padded vocabulary
PROMPT = [5, VOCAB - 1, 7, VOCAB - 2, VOCAB - 1, 9]
CHUNKS = ((0, 4), (4, 6))


def last_id_scenario() -> dict:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler_components.logprob_result_processor import SchedulerLogprobResultProcessor
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=1)
    params.normalize(None)
    req = Req(rid="r", origin_input_text=None, origin_input_ids=list(PROMPT), sampling_params=params,
              return_logprob=True, top_logprobs_num=0, token_ids_logprob=None, vocab_size=VOCAB)
    req.logprob_start_len = 0
    processor = SchedulerLogprobResultProcessor(model_config=SimpleNamespace(vocab_size=VOCAB))
    # position p's logit row scores PROMPT[p + 1] (the last row: the sampled token); value -p marks the row
    for start, end in CHUNKS:
        output = SimpleNamespace(input_token_logprobs=tuple(float(-p) for p in range(start, end)))
        processor.add_input_logprob_return_values(0, req, output, 0, end - start,
                                                  last_prefill_chunk=end == len(PROMPT))
    return {"idx": list(req.logprob.input_token_logprobs_idx), "val": list(req.logprob.input_token_logprobs_val)}


EXPECTED_VAL = [None, 0.0, -1.0, -2.0, -3.0, -4.0]  # log p(PROMPT[p] | PROMPT[:p]); chunks join in order


def test_last_vocab_id_reported_as_itself(sglang_ctx):
    assert last_id_scenario() == {"idx": PROMPT, "val": EXPECTED_VAL}


def test_last_vocab_id_reported_as_zero_without_patch():
    result = run_on_pristine_sglang("test_input_logprob_last_id_patch", "last_id_scenario")
    assert result == {"idx": [5, 0, 7, VOCAB - 2, 0, 9], "val": EXPECTED_VAL}
