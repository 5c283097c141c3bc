"""`sglang-microturn align RECORD.json`: re-score a served session and check its logprobs bitwise.

Two paths, each compared token by token with the logprobs the server returned while sampling (the record,
alignment_record.py):
  server     the server re-scores the whole sequence as one prefill: SGLang's /generate with input_ids = the
             sequence, return_logprob, logprob_start_len 0 (no prefix reuse, so every position is recomputed);
             `input_token_logprobs[p]` is log p(sequence[p] | sequence[:p]).
  reference  the PyTorch reference in aligned mode (aligned_reference.score_aligned: the trainer side, no
             SGLang), bf16, on the GPU or, without one, on the CPU through the Triton interpreter (slow: for
             short records). MICROTURN_ATTN_* must equal the server's (defaults do).
Under `serve --alignment-mode` both must match exactly; exit status 1 on any mismatch, 2 on a bad record or
usage, 0 when every compared token is bitwise equal.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from sglang_microturn.alignment.record import AlignmentRecord

MAX_LISTED = 5  # mismatches listed per path in the report


class AlignServerError(RuntimeError):
    """The server could not re-score the record."""


@dataclass
class PathReport:
    path: str
    compared: int
    mismatched: int
    max_abs_diff: float
    first_mismatches: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.path:>9}: compared {self.compared}, mismatched {self.mismatched}, "
                f"max |diff| {self.max_abs_diff:.3g}")


def compare(path: str, record: AlignmentRecord, logprobs: list[float]) -> PathReport:
    """Bitwise comparison of `logprobs` (one per generated token) with the record's."""
    report = PathReport(path, len(logprobs), 0, 0.0)
    for g, lp in zip(record.generated, logprobs, strict=True):
        diff = math.inf if lp is None else abs(lp - g.logprob)
        report.max_abs_diff = max(report.max_abs_diff, diff)
        if lp != g.logprob:
            report.mismatched += 1
            if len(report.first_mismatches) < MAX_LISTED:
                report.first_mismatches.append({"position": g.position, "token_id": g.token_id,
                                                "recorded": g.logprob, path: lp})
    return report


def server_logprobs(record: AlignmentRecord, url: str, api_key: str | None = None,
                    timeout_s: float = 600.0) -> list[float]:
    """Logprobs of the record's generated tokens from one prefill of the whole sequence on the server."""
    body = {"input_ids": record.sequence, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/generate", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise AlignServerError(f"{url}/generate answered {e.code}: {e.read()[:500]!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AlignServerError(f"cannot reach {url}: {e}; is the server running (sglang-microturn serve"
                               " --alignment-mode)?") from None
    entries = (reply.get("meta_info") or {}).get("input_token_logprobs") or []
    if len(entries) != len(record.sequence):
        raise AlignServerError(f"{url}/generate returned {len(entries)} input logprobs for a sequence of"
                               f" {len(record.sequence)} tokens")
    out = []
    for g in record.generated:
        lp, tok = entries[g.position][0], entries[g.position][1]
        if tok != g.token_id:
            raise AlignServerError(f"server scored token {tok} at position {g.position}, the record has {g.token_id}")
        out.append(lp)
    return out


def reference_logprobs(record: AlignmentRecord, model_path: str, device: str) -> list[float]:
    """Logprobs of the record's generated tokens from the aligned PyTorch reference (bf16) on `device`."""
    import torch

    from sglang_microturn.model.reference_model import load_reference

    from sglang_microturn.alignment.aligned_reference import score_aligned

    model = load_reference(model_path, device=device, dtype=torch.bfloat16)
    lp = score_aligned(model, record.sequence).cpu()  # [T - 1], lp[p - 1] = log p(seq[p] | seq[:p])
    return [lp[g.position - 1].item() for g in record.generated]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(record: AlignmentRecord, url: str | None, model_path: str | None, device: str | None,
        api_key: str | None = None) -> list[PathReport]:
    """Compare every path that has what it needs (url: server; model path: reference)."""
    reports = []
    if url:
        reports.append(compare("server", record, server_logprobs(record, url, api_key)))
    if model_path:
        device = device or default_device()
        if device == "cpu":
            # Triton reads this when a kernel module is first imported; the CPU has no other Triton backend.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        reports.append(compare("reference", record, reference_logprobs(record, model_path, device)))
    return reports
