"""Micro-turns sent as audio and text instead of ids: the server runs the dMel front-end and the layout.

A client without a tokenizer (a browser, a microphone) sends each micro-turn as `"input": {"audio": <base64 of
the period's 16 kHz mono PCM, little-endian int16>, "text": <what the user typed during it>}` (both optional;
neither is silence) instead of `input_ids`. The server builds the append the client would otherwise build,
`MicroTurnLayout.append_ids`: the pad fill that closes the previous micro-turn's output block, the input block
(dMel codes of the audio, the text's bytes), `<|out|>`. The output budget is the layout's. The reply adds the
output block's text. The ids are bit for bit those a client builds with its own `DMelStream`, fed every
period (zeros for a micro-turn without audio, as examples/duplex_chat.py does): a stream of micro-turns
encodes as the whole signal would.

`FrontEnd` is what one session keeps between such micro-turns: the dMel stream's state (its left context,
win - hop samples) and the bytes of a UTF-8 character the model has not finished yet. A turn works on a copy;
the API stores it on the session only when the turn commits, so a refused or aborted turn changes nothing.
The layout comes from the checkpoint (config.json `microturn_layout`); a model without one answers such
appends with 400.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from dataclasses import dataclass

import numpy as np

from sglang_microturn.format.dmel import DMelSpec, DMelStream
from sglang_microturn.format.layout import Control, InputEvents, LayoutError, LayoutSpec, MicroTurnLayout
from sglang_microturn.server.session_registry import BadRequest, shown

INPUT_FIELDS = frozenset({"audio", "text"})


@dataclass(frozen=True, eq=False)
class LayoutInput:
    """One micro-turn's input as the client sent it: PCM samples (int16) or None, and UTF-8 text bytes."""

    pcm: np.ndarray | None
    text: bytes


@dataclass
class FrontEnd:
    """A session's state between server-built micro-turns (see the module docstring)."""

    audio: DMelStream
    text_pending: bytes = b""  # the start of a UTF-8 character the next micro-turn's output completes

    def fork(self) -> FrontEnd:
        return FrontEnd(self.audio.fork(), self.text_pending)


@dataclass(frozen=True)
class BuiltTurn:
    """An append built from a LayoutInput: its ids, and the front-end state to keep if it commits."""

    input_ids: list[int]
    front_end: FrontEnd


def parse_layout_input(value) -> LayoutInput:
    """The `input` field of an append (form only: the sample count is the layout's to check)."""
    if not isinstance(value, dict):
        raise BadRequest(f"field 'input' must be an object {{audio?, text?}}, got {type(value).__name__}")
    unknown = value.keys() - INPUT_FIELDS
    if unknown:
        raise BadRequest(f"unknown field {shown(repr(sorted(unknown)[0]))} in 'input'; allowed: audio, text")
    pcm = None
    audio = value.get("audio")
    if audio is not None:
        if not isinstance(audio, str):
            raise BadRequest(f"field 'input.audio' must be a base64 string, got {type(audio).__name__}")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("field 'input.audio' is not valid base64") from None
        if len(raw) % 2:
            raise BadRequest(f"field 'input.audio' holds {len(raw)} bytes; int16 PCM has an even number")
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.int16)
    text = value.get("text")
    if text is not None and not isinstance(text, str):
        raise BadRequest(f"field 'input.text' must be a string, got {type(text).__name__}")
    return LayoutInput(pcm, (text or "").encode("utf-8"))


def layout_of(tokenizer_manager) -> MicroTurnLayout | None:
    """The layout the served checkpoint records (config.json `microturn_layout`), or None."""
    hf_config = getattr(getattr(tokenizer_manager, "model_config", None), "hf_config", None)
    recorded = getattr(hf_config, "microturn_layout", None)
    return None if recorded is None else MicroTurnLayout(LayoutSpec(**recorded))


class LayoutTurns:
    """Builds server-side micro-turns for one served layout (None: the model records none)."""

    def __init__(self, layout: MicroTurnLayout | None):
        self.layout = layout

    def _layout(self) -> MicroTurnLayout:
        if self.layout is None:
            raise BadRequest("the served model records no micro-turn layout (config.json 'microturn_layout'): "
                             "send input_ids")
        return self.layout

    def output_budget(self, requested: int | None) -> int:
        budget = self._layout().spec.out_budget
        if requested is not None and requested != budget:
            raise BadRequest(f"an append with 'input' generates the layout's whole output block ({budget} "
                             f"tokens); output_budget {requested} would leave it unclosable")
        return budget

    def build(self, front_end: FrontEnd | None, previous_output: list[int] | None, turn: int,
              given: LayoutInput) -> BuiltTurn:
        """The append for `given` after `previous_output` (None: the session's first micro-turn)."""
        layout = self._layout()
        spec = layout.spec
        state = front_end.fork() if front_end is not None else FrontEnd(DMelStream(DMelSpec.for_layout(spec)))
        pcm = given.pcm
        if pcm is not None and len(pcm) != spec.samples_per_turn:
            raise BadRequest(f"field 'input.audio' holds {len(pcm)} samples; a {spec.period_ms} ms micro-turn at "
                             f"{spec.sample_rate} Hz is exactly {spec.samples_per_turn}")
        codes = state.audio.push(pcm if pcm is not None else np.zeros(spec.samples_per_turn, np.int16))
        try:
            ids = layout.append_ids(InputEvents(audio=codes if pcm is not None else None, text=given.text),
                                    previous_output, turn=turn)
        except LayoutError as e:
            raise BadRequest(str(e)) from None
        return BuiltTurn([int(t) for t in ids], state)

    def output(self, front_end: FrontEnd, output_ids: list[int]) -> dict:
        """The reply's `output`: the text the model said (its leading text ids; a character cut at the block's
        end is completed by the next micro-turn) and whether it yielded. Updates `front_end`."""
        v = self._layout().vocab
        said = bytearray()
        for t in output_ids:
            if t not in v.text_out:
                break
            said.append(t - v.text_out.start)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate((front_end.text_pending, 0))
        text = decoder.decode(bytes(said))
        front_end.text_pending = decoder.getstate()[0]
        return {"text": text, "yielded": int(Control.YIELD) in output_ids}
