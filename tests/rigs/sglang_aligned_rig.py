"""SGLang's MicroTurnForCausalLM in alignment mode on CPU (Triton interpreter) against the reference's aligned
mode, in a fresh process (see sglang_model_rig.py). Prints one JSON object of findings.

    MICROTURN_ALIGNMENT=1 TRITON_INTERPRET=1 python tests/rigs/sglang_aligned_rig.py CHECKPOINT_DIR PORT

The attention of both sides is the reference's contiguous-KV `aligned_extend` (the `microturn_aligned`
backend needs a GPU): the model's own `forward` runs through its RadixAttention layers, which hand q/k/v to
a stand-in backend that calls that attention. What this compares is everything else: SGLang's parameters as
stacked by its loader, the forward glue, the shared aligned forward and the AlignedLogitsProcessor's lm_head;
and the decoder stack alone (`model.model`, what SGLang's prefill CUDA graphs capture).
"""

import json
import sys
from types import SimpleNamespace

import torch

from microturn_kernels.moe_gemv import MoeGemvConfig

# Wide MoE blocks for the tiny preset (D=64, I=32): the interpreter then runs few programs. Both sides use
# them, as a trainer and a server would share any config.
FAST_TINY_MOE = {(64, 32): MoeGemvConfig(BLOCK_I=32, BLOCK_D=64, BLOCK_N=64, BLOCK_K=32)}
SEQ = 40
CHUNKS = [13, 1, 1, 25]


def main(ckpt: str, port: int) -> dict:
    from microturn_kernels import moe_gemv
    from sglang_model_rig import sglang_cpu_model
    from sglang_microturn.model.reference_model import load_reference, token_logprobs
    from sglang_microturn.alignment.aligned_reference import AlignedKVCache, score_aligned

    moe_gemv._CONFIGS.update(FAST_TINY_MOE)
    ids = torch.randint(0, 832, (SEQ,), generator=torch.Generator().manual_seed(0))
    ref = load_reference(ckpt, dtype=torch.bfloat16)
    want = score_aligned(ref, ids)
    with sglang_cpu_model(ckpt, port, torch.bfloat16) as (model, _):
        found = {"alignment": model.alignment, "logits_processor": type(model.logits_processor).__name__}

        import sglang.srt.layers.radix_attention as radix_attention

        class StandInBackend:  # what RadixAttention calls outside CUDA-graph capture
            def __init__(self):
                self.kv, self.calls = AlignedKVCache(ref.spec.num_layers), 0

            def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
                self.calls += 1
                return self.kv.attend(layer.layer_id, q, k, v)

        # The logits step of SGLang's LogitsProcessor (pruning, buffers) needs a real ForwardBatch; keep its
        # lm_head product, which is what alignment mode replaces.
        model.logits_processor.forward = lambda input_ids, hidden, lm_head, fb: (
            model.logits_processor._compute_lm_head(hidden, lm_head))
        batch = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: True))

        def server_logprobs(chunks):
            backend, parts, start = StandInBackend(), [], 0
            radix_attention.get_attn_backend = lambda: backend
            for n in chunks:
                parts.append(model(ids[start:start + n], torch.arange(start, start + n), batch))
                start += n
            found.setdefault("attention_calls", []).append(backend.calls)
            return token_logprobs(torch.cat(parts), ids)

        for name, chunks in (("one_shot", [SEQ]), ("chunked", CHUNKS)):
            got = server_logprobs(chunks)
            found[name] = {"bitwise_equal_reference": torch.equal(got, want),
                           "max_abs_diff": (got - want).abs().max().item()}

        # The decoder stack alone, as SGLang's prefill CUDA graphs capture and replay it (model.model.forward,
        # the logits tail run apart): it must be the aligned forward too, not Qwen3-MoE's layers.
        radix_attention.get_attn_backend = lambda: StandInBackend()
        body = model.model(ids, torch.arange(SEQ), batch)
        got = token_logprobs(model.logits_processor._compute_lm_head(body, model.lm_head), ids)
        found["decoder_stack"] = {"bitwise_equal_reference": torch.equal(got, want),
                                  "max_abs_diff": (got - want).abs().max().item()}
    return found


if __name__ == "__main__":
    print("RIG " + json.dumps(main(sys.argv[1], int(sys.argv[2]))))
