"""The alignment record: a served micro-turn session's token sequence and the logprob the server returned for
each token it sampled, the input of `sglang-microturn align` (docs/alignment.md).

JSON, one object:
  {"format": "sglang-microturn-alignment-record/1",
   "sequence": [int, ...],                  # the whole session, every input and output token, in order
   "generated": [{"position": int,          # index into sequence of a token the server sampled (>= 1)
                  "token_id": int,          # sequence[position]
                  "logprob": float}, ...],  # the server's log p(token | sequence[:position]), as returned
   "model_path": str (optional)}            # the checkpoint served; `align` uses it unless given another

Make one from a session appended with `return_logprob=True`: `record_from_turns(session.turns)` (a
`MicroTurnSession` of sglang_microturn.client), then `write_record(path, record)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FORMAT = "sglang-microturn-alignment-record/1"


class RecordError(ValueError):
    """An alignment record is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class GeneratedToken:
    position: int
    token_id: int
    logprob: float


@dataclass(frozen=True)
class AlignmentRecord:
    sequence: list[int]
    generated: list[GeneratedToken]
    model_path: str | None = None

    def to_json(self) -> dict:
        out = {"format": FORMAT, "sequence": self.sequence,
               "generated": [vars(g) for g in self.generated]}
        if self.model_path is not None:
            out["model_path"] = self.model_path
        return out


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordError(f"{where} = {value!r}: expected a non-negative integer token id / position")
    return value


def parse_record(data: dict) -> AlignmentRecord:
    """Validate a decoded record (see the module docstring); raises RecordError naming the first problem."""
    if not isinstance(data, dict):
        raise RecordError(f"record is a {type(data).__name__}; expected a JSON object with format {FORMAT!r}")
    if data.get("format") != FORMAT:
        raise RecordError(f"format = {data.get('format')!r}; expected {FORMAT!r}")
    seq = data.get("sequence")
    if not isinstance(seq, list) or len(seq) < 2:
        raise RecordError("sequence must be a list of at least 2 token ids (the whole session, in order)")
    seq = [_int(t, f"sequence[{i}]") for i, t in enumerate(seq)]
    gen = data.get("generated")
    if not isinstance(gen, list) or not gen:
        raise RecordError("generated must be a non-empty list of {position, token_id, logprob}: append with"
                          " return_logprob=true to get the server's logprobs")
    seen: set[int] = set()
    tokens = []
    for i, g in enumerate(gen):
        where = f"generated[{i}]"
        if not isinstance(g, dict) or set(g) != {"position", "token_id", "logprob"}:
            raise RecordError(f"{where} = {g!r}: expected exactly the keys position, token_id, logprob")
        pos, tok, lp = _int(g["position"], where + ".position"), _int(g["token_id"], where + ".token_id"), g["logprob"]
        if not 1 <= pos < len(seq):
            raise RecordError(f"{where}.position = {pos} is outside 1 .. {len(seq) - 1} (the sequence has"
                              f" {len(seq)} tokens; position 0 has no logprob)")
        if seq[pos] != tok:
            raise RecordError(f"{where}: token_id {tok} but sequence[{pos}] = {seq[pos]}; the record's sequence"
                              " and generated tokens disagree")
        if pos in seen:
            raise RecordError(f"{where}.position = {pos} appears twice")
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise RecordError(f"{where}.logprob = {lp!r}: expected a finite number")
        seen.add(pos)
        tokens.append(GeneratedToken(pos, tok, float(lp)))
    model_path = data.get("model_path")
    if model_path is not None and not isinstance(model_path, str):
        raise RecordError(f"model_path = {model_path!r}: expected a string (a checkpoint folder)")
    return AlignmentRecord(seq, tokens, model_path)


def read_record(path: str | Path) -> AlignmentRecord:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise RecordError(f"cannot read the record {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"record {path} is not JSON: {e}") from None
    return parse_record(data)


def write_record(path: str | Path, record: AlignmentRecord) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record.to_json()) + "\n")
    return path


def record_from_turns(turns, model_path: str | None = None) -> AlignmentRecord:
    """The record of a session's turns (client.TurnRecord: input_ids, output_ids, output_logprobs,
    committed_length), checking each turn's committed length against the rebuilt sequence."""
    seq: list[int] = []
    generated: list[GeneratedToken] = []
    for turn in turns:
        seq += turn.input_ids
        if turn.output_ids and turn.output_logprobs is None:
            raise RecordError(f"turn {turn.index} has no output_logprobs: append with return_logprob=True")
        if turn.output_ids and len(turn.output_logprobs) != len(turn.output_ids):
            raise RecordError(f"turn {turn.index}: {len(turn.output_logprobs)} logprobs for"
                              f" {len(turn.output_ids)} output tokens")
        for tok, lp in zip(turn.output_ids, turn.output_logprobs or []):
            generated.append(GeneratedToken(len(seq), tok, float(lp)))
            seq.append(tok)
        if turn.committed_length != len(seq):
            raise RecordError(f"turn {turn.index}: the server committed {turn.committed_length} tokens but the"
                              f" turns add up to {len(seq)}; record every turn of the session, in order")
    return parse_record(AlignmentRecord(seq, generated, model_path).to_json())
