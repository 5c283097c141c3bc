"""benchmarks/model_alignment_check.py's bookkeeping on CPU, against a fake server that answers like SGLang
(output_ids incl. the stop token, output_token_logprobs, whole-session prompt_tokens) from the reference."""

import types

import torch

from sglang_microturn.model.checkpoints import write_checkpoint
from sglang_microturn.model.reference_model import KVCache, load_reference

from benchmarks import model_alignment_check as check
from benchmarks import servers


class FakeServer:
    """One streaming session served by the fp32 reference with a KV cache, greedy, stop at <|yield|>."""

    def __init__(self, ckpt):
        self.model = load_reference(ckpt)
        self.startup_s, self.shutdown = 0.0, {"clean": True}

    def __call__(self, *a, **k):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def post(self, path, body, timeout=120):
        if path == "/open_session":
            self.cache, self.length = KVCache.empty(self.model.spec.num_layers), 0
            return 200, "sid"
        if path == "/close_session":
            return 200, None
        ids, budget = body["input_ids"], body["sampling_params"]["max_new_tokens"]
        cached = self.length
        logits = self.model(torch.tensor(ids), self.cache)[-1]
        self.length += len(ids)
        prompt_tokens, out, lps = self.length, [], []
        while len(out) < budget:
            tok = int(logits.argmax())
            out.append(tok)
            lps.append([logits.log_softmax(-1)[tok].item(), tok, None])
            if tok == 4:
                break
            logits = self.model(torch.tensor([tok]), self.cache)[-1]
        self.length += len(out)
        return 200, {"output_ids": out, "meta_info": {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
                                                      "completion_tokens": len(out), "output_token_logprobs": lps}}


def test_script_reconstructs_the_session_and_compares(tmp_path, monkeypatch):
    ckpt = str(write_checkpoint(tmp_path / "tiny", "tiny"))
    monkeypatch.setattr(check, "ServerProcess", FakeServer(ckpt))
    monkeypatch.setattr(servers.shutil, "which", lambda name: "/bin/true")
    args = types.SimpleNamespace(port=0, log=str(tmp_path / "log"), sglang_args=[])
    served, seq, generated = check.serve_session(args, ckpt, check.synthetic_turns(6))
    assert served["checks"]["prompt_tokens_match_reconstruction"]
    assert len(seq) == 6 * 114 - (16 - len([g for g in generated if g["turn"] == 5]))
    numbers = check.compare(ckpt, seq, generated, device="cpu")
    assert numbers["fp32"]["max_abs"] < 1e-4 and numbers["fp32"]["greedy_agreement"] == 1.0
    assert numbers["bf16"]["median_abs"] < check.MEDIAN_TOL
