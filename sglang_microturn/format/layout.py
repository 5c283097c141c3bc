"""The interleaved micro-turn layout: one token sequence input0, output0, input1, output1, ... where every
micro-turn covers a fixed slice of wall time (default 200 ms) and a fixed number of positions, so a
position IS a time: position p lies in micro-turn p // stride, which covers [k * period, (k + 1) * period).

One micro-turn, `stride = 1 + in_budget + 1 + out_budget` positions:

    input block   <|in|>  audio (frames_per_turn * n_mels dMel ids, or none)  text_in bytes  <|pad|>...
                  or      <|in|>  <|silence|>  <|pad|>...                     (no audio and no text)
    output block  <|out|> text_out bytes  <|yield|>  <|pad|>...                (said less than the budget)
                  or      <|out|> text_out bytes (exactly out_budget of them)  (budget used up, no yield)

Input and output streams use disjoint id ranges, so the model tells the user's stream from its own by id
alone. Serving (one streaming-session append per micro-turn): the client sends `append_ids(...)` = the pad
fill of the previous output block + the input block + `<|out|>`, and the server generates at most
`out_budget` tokens, stopping at `<|yield|>` (the checkpoint's eos). The pad fill keeps every micro-turn at
exactly `stride` positions while the server never decodes padding.

Glossary: F dMel frames per micro-turn, M mel bins, L levels per bin.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PERIOD_MS = 200
VOCAB_MULTIPLE = 64  # the embedding/lm_head row count is padded to this; padding ids are valid in no block


class LayoutError(ValueError):
    """A token sequence, block or event does not follow the micro-turn layout."""


class TokenRangeError(LayoutError):
    """An id lies outside the stream (id range) its place in the layout requires."""


class BudgetError(LayoutError):
    """A block or event holds more than its token budget, or audio of the wrong duration."""


class BlockOrderError(LayoutError):
    """A block is missing, misplaced, of the wrong length, or its tokens come in the wrong order."""


class Control(enum.IntEnum):
    """Control tokens. Ids 5..7 are reserved: valid in no block."""

    PAD = 0  # fills a block up to its fixed length; never the start of a block
    IN = 1  # opens an input block
    OUT = 2  # opens an output block; the client sends it, the model generates after it
    SILENCE = 3  # the whole input payload of a micro-turn with no audio and no text
    YIELD = 4  # "nothing more to say this micro-turn": ends an output block shorter than the budget


NUM_CONTROL_IDS = 8
CONTROL_NAMES = {c: f"<|{c.name.lower()}|>" for c in Control}


@dataclass(frozen=True)
class IdRange:
    """Ids [start, stop) of one stream."""

    name: str
    start: int
    stop: int

    def __contains__(self, token_id: int) -> bool:
        return self.start <= token_id < self.stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.name} {self.start}..{self.stop - 1}"


@dataclass(frozen=True)
class LayoutSpec:
    """The numbers that fix the layout. A checkpoint records them (config.json `microturn_layout`)."""

    period_ms: int = PERIOD_MS
    sample_rate: int = 16_000
    frame_hop_ms: int = 40  # one dMel frame per hop: 5 frames per 200 ms micro-turn
    n_mels: int = 16
    mel_levels: int = 16
    text_in_budget: int = 16  # user text bytes per micro-turn
    out_budget: int = 16  # generated tokens per micro-turn, the <|yield|> included

    def __post_init__(self):
        if self.period_ms <= 0 or self.frame_hop_ms <= 0 or self.period_ms % self.frame_hop_ms:
            raise LayoutError(
                f"period_ms={self.period_ms} must be a positive multiple of frame_hop_ms={self.frame_hop_ms}"
            )
        if (self.sample_rate * self.frame_hop_ms) % 1000:
            raise LayoutError(f"frame_hop_ms={self.frame_hop_ms} is not a whole number of samples at "
                              f"{self.sample_rate} Hz")
        for name in ("n_mels", "mel_levels", "out_budget"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}={getattr(self, name)} must be >= 1")
        if self.text_in_budget < 0:
            raise LayoutError(f"text_in_budget={self.text_in_budget} must be >= 0")

    @property
    def frames_per_turn(self) -> int:
        return self.period_ms // self.frame_hop_ms

    @property
    def hop_samples(self) -> int:
        return self.sample_rate * self.frame_hop_ms // 1000

    @property
    def samples_per_turn(self) -> int:
        return self.sample_rate * self.period_ms // 1000

    @property
    def audio_tokens(self) -> int:
        return self.frames_per_turn * self.n_mels

    @property
    def in_budget(self) -> int:
        """Payload positions of an input block (after <|in|>): all audio plus all text fits."""
        return self.audio_tokens + max(self.text_in_budget, 1)  # >= 1 so <|silence|> fits

    @property
    def input_block_len(self) -> int:
        return 1 + self.in_budget

    @property
    def output_block_len(self) -> int:
        return 1 + self.out_budget

    @property
    def stride(self) -> int:
        """Positions per micro-turn."""
        return self.input_block_len + self.output_block_len


@dataclass(frozen=True)
class Vocab:
    """Id ranges, in id order: control, text_out (256 bytes), text_in (256 bytes), dMel (M * L), padding."""

    control: IdRange
    text_out: IdRange
    text_in: IdRange
    dmel: IdRange
    size: int  # padded to VOCAB_MULTIPLE; ids in [dmel.stop, size) are valid nowhere

    @classmethod
    def for_spec(cls, spec: LayoutSpec) -> "Vocab":
        control = IdRange("control", 0, NUM_CONTROL_IDS)
        text_out = IdRange("text_out", control.stop, control.stop + 256)
        text_in = IdRange("text_in", text_out.stop, text_out.stop + 256)
        dmel = IdRange("dmel", text_in.stop, text_in.stop + spec.n_mels * spec.mel_levels)
        size = -(-dmel.stop // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return cls(control, text_out, text_in, dmel, size)


@dataclass(frozen=True, eq=False)
class InputEvents:
    """What reached the model from the user in one micro-turn.

    audio: dMel codes [F, M] (levels 0..L-1) of the micro-turn's audio, or None when there was none.
    text: UTF-8 bytes the user typed during the micro-turn (a str is encoded).
    Neither = silence.
    """

    audio: np.ndarray | None = None
    text: bytes = b""

    def __post_init__(self):
        if isinstance(self.text, str):
            object.__setattr__(self, "text", self.text.encode("utf-8"))
        if self.audio is not None:
            object.__setattr__(self, "audio", np.asarray(self.audio))

    @property
    def silent(self) -> bool:
        return self.audio is None and not self.text

    def __eq__(self, other) -> bool:
        if not isinstance(other, InputEvents) or self.text != other.text:
            return False
        if self.audio is None or other.audio is None:
            return self.audio is None and other.audio is None
        return self.audio.shape == other.audio.shape and bool(np.array_equal(self.audio, other.audio))

    def __repr__(self) -> str:
        audio = "None" if self.audio is None else f"<{self.audio.shape[0]} frames>"
        return f"InputEvents(audio={audio}, text={self.text!r})"


@dataclass(frozen=True)
class OutputEvents:
    """What the model said in one micro-turn: text bytes. Fewer than out_budget bytes means it yielded."""

    text: bytes = b""

    def __post_init__(self):
        if isinstance(self.text, str):
            object.__setattr__(self, "text", self.text.encode("utf-8"))


@dataclass(frozen=True)
class MicroTurn:
    """One micro-turn recovered from a sequence. `output` is None while its output block has not started;
    `complete` is False for a last micro-turn whose output block is still shorter than its fixed length."""

    index: int
    input: InputEvents
    output: OutputEvents | None
    complete: bool = True


@dataclass(frozen=True)
class MicroTurnLayout:
    """The layout as code: ids of every stream, encode/decode of blocks, interleave/split of sequences,
    and the position <-> micro-turn <-> wall-time mapping."""

    spec: LayoutSpec = field(default_factory=LayoutSpec)

    @property
    def vocab(self) -> Vocab:
        return Vocab.for_spec(self.spec)

    # ---- ids of single tokens -------------------------------------------------------------------------
    def text_out_id(self, byte: int) -> int:
        return self.vocab.text_out.start + byte

    def text_in_id(self, byte: int) -> int:
        return self.vocab.text_in.start + byte

    def dmel_id(self, mel_bin: int, level: int) -> int:
        return self.vocab.dmel.start + mel_bin * self.spec.mel_levels + level

    def token_name(self, token_id: int) -> str:
        """A readable name for any id: used in error messages and as the tokenizer's token string."""
        v = self.vocab
        if token_id in v.control:
            return CONTROL_NAMES.get(token_id, f"<|reserved_{token_id}|>")
        if token_id in v.text_out:
            return f"<|out_byte_{token_id - v.text_out.start:02x}|>"
        if token_id in v.text_in:
            return f"<|in_byte_{token_id - v.text_in.start:02x}|>"
        if token_id in v.dmel:
            mel_bin, level = divmod(token_id - v.dmel.start, self.spec.mel_levels)
            return f"<|dmel_{mel_bin}_{level}|>"
        if 0 <= token_id < v.size:
            return f"<|unused_{token_id}|>"
        return f"<id {token_id} outside the vocabulary 0..{v.size - 1}>"

    # ---- positions and time ---------------------------------------------------------------------------
    def turn_of_position(self, position: int) -> int:
        """Micro-turn index of a sequence position (0-based, the RoPE position)."""
        if position < 0:
            raise LayoutError(f"position {position} is negative")
        return position // self.spec.stride

    def block_of_position(self, position: int) -> str:
        """"input" or "output": which block of its micro-turn a position lies in."""
        offset = position - self.turn_of_position(position) * self.spec.stride
        return "input" if offset < self.spec.input_block_len else "output"

    def turn_start_position(self, turn: int) -> int:
        return turn * self.spec.stride

    def output_start_position(self, turn: int) -> int:
        """Position of micro-turn `turn`'s <|out|>."""
        return turn * self.spec.stride + self.spec.input_block_len

    def turn_start_ms(self, turn: int) -> int:
        return turn * self.spec.period_ms

    def turn_at_ms(self, t_ms: float) -> int:
        """The micro-turn covering wall time t_ms (ms since the session started)."""
        if t_ms < 0:
            raise LayoutError(f"time {t_ms} ms is before the session start")
        return int(t_ms // self.spec.period_ms)

    def position_time_ms(self, position: int) -> tuple[int, int]:
        """The wall-time slice [start, end) in ms that a position belongs to (its micro-turn's)."""
        start = self.turn_start_ms(self.turn_of_position(position))
        return start, start + self.spec.period_ms

    # ---- blocks ---------------------------------------------------------------------------------------
    def encode_input(self, events: InputEvents, turn: int | None = None) -> list[int]:
        """The input block (exactly input_block_len ids) for one micro-turn's input events."""
        spec, where = self.spec, _where("input", turn)
        payload: list[int] = []
        if events.audio is not None:
            codes = events.audio
            if codes.shape != (spec.frames_per_turn, spec.n_mels):
                raise BudgetError(
                    f"{where}: audio codes have shape {tuple(codes.shape)}; a {spec.period_ms} ms micro-turn "
                    f"holds exactly ({spec.frames_per_turn}, {spec.n_mels}) (frames, mel bins)"
                )
            if codes.size and (codes.min() < 0 or codes.max() >= spec.mel_levels):
                raise TokenRangeError(
                    f"{where}: audio code levels span {int(codes.min())}..{int(codes.max())}; "
                    f"dMel levels are 0..{spec.mel_levels - 1}"
                )
            bins = np.arange(spec.n_mels)[None, :]
            payload += (self.vocab.dmel.start + bins * spec.mel_levels + codes.astype(np.int64)).ravel().tolist()
        if len(events.text) > spec.text_in_budget:
            raise BudgetError(
                f"{where}: {len(events.text)} text bytes; the budget is {spec.text_in_budget} per micro-turn"
            )
        payload += [self.text_in_id(b) for b in events.text]
        if not payload:
            payload = [Control.SILENCE]
        return [Control.IN, *payload] + [Control.PAD] * (spec.in_budget - len(payload))

    def decode_input(self, block: Sequence[int], turn: int | None = None) -> InputEvents:
        """Input events from an input block (exactly input_block_len ids, starting with <|in|>)."""
        spec, v, where = self.spec, self.vocab, _where("input", turn)
        block = [int(t) for t in block]
        self._check_block_frame(block, Control.IN, spec.input_block_len, where)
        body = block[1:]
        if body[0] == Control.SILENCE:
            self._check_pad(body, 1, where, after="<|silence|>")
            return InputEvents()
        audio = None
        if body[0] in v.dmel:
            codes = np.empty((spec.frames_per_turn, spec.n_mels), dtype=np.int64)
            for i in range(spec.audio_tokens):
                t = body[i]
                frame, mel_bin = divmod(i, spec.n_mels)
                if t not in v.dmel:
                    raise BlockOrderError(
                        f"{where}: audio ends after {i} dMel tokens at offset {i + 1} ({self.token_name(t)}); "
                        f"audio is exactly {spec.audio_tokens} tokens ({spec.frames_per_turn} frames x "
                        f"{spec.n_mels} bins)"
                    )
                got_bin, level = divmod(t - v.dmel.start, spec.mel_levels)
                if got_bin != mel_bin:
                    raise BlockOrderError(
                        f"{where}: offset {i + 1} holds {self.token_name(t)} (mel bin {got_bin}); frame {frame} "
                        f"needs mel bin {mel_bin} there (bins in order 0..{spec.n_mels - 1} per frame)"
                    )
                codes[frame, mel_bin] = level
            audio, rest_at = codes, spec.audio_tokens
        else:
            rest_at = 0
        text = bytearray()
        i = rest_at
        while i < len(body) and body[i] in v.text_in:
            text.append(body[i] - v.text_in.start)
            i += 1
        if audio is None and not text:
            raise TokenRangeError(
                f"{where}: offset 1 holds {self.token_name(body[0])}; an input block starts with dMel "
                f"({v.dmel}), text_in ({v.text_in}) or <|silence|>"
            )
        if len(text) > spec.text_in_budget:
            raise BudgetError(f"{where}: {len(text)} text bytes; the budget is {spec.text_in_budget}")
        self._check_pad(body, i, where, after="the input payload")
        return InputEvents(audio=audio, text=bytes(text))

    def output_body(self, events: OutputEvents, turn: int | None = None) -> list[int]:
        """What the model generates for `events`: text_out ids, then <|yield|> unless the budget is full."""
        n, budget = len(events.text), self.spec.out_budget
        if n > budget:
            raise BudgetError(
                f"{_where('output', turn)}: {n} text bytes; the output budget is {budget} tokens per micro-turn"
            )
        ids = [self.text_out_id(b) for b in events.text]
        return ids + [Control.YIELD] if n < budget else ids

    def encode_output(self, events: OutputEvents, turn: int | None = None) -> list[int]:
        """The output block (exactly output_block_len ids) for one micro-turn's output events."""
        body = self.output_body(events, turn)
        return [Control.OUT, *body] + [Control.PAD] * (self.spec.out_budget - len(body))

    def decode_output(self, generated: Sequence[int], turn: int | None = None, complete: bool = False) -> OutputEvents:
        """Output events from the ids generated after <|out|> (a server's `output_ids`, at most out_budget).

        complete=True: `generated` is the whole block body (out_budget ids, pad fill included)."""
        spec, v, where = self.spec, self.vocab, _where("output", turn)
        generated = [int(t) for t in generated]
        if len(generated) > spec.out_budget:
            raise BudgetError(f"{where}: {len(generated)} tokens; the output budget is {spec.out_budget}")
        if complete and len(generated) != spec.out_budget:
            raise BlockOrderError(
                f"{where}: body has {len(generated)} ids; a complete output block body has {spec.out_budget}"
            )
        text = bytearray()
        i = 0
        while i < len(generated) and generated[i] in v.text_out:
            text.append(generated[i] - v.text_out.start)
            i += 1
        if i < len(generated):
            if generated[i] != Control.YIELD:
                raise TokenRangeError(
                    f"{where}: offset {i + 1} holds {self.token_name(generated[i])}; the model's stream is "
                    f"{v.text_out} then <|yield|>"
                )
            self._check_pad(generated, i + 1, where, after="<|yield|>")
        # Fewer than out_budget ids and no yield: a block still being generated (complete=False only).
        return OutputEvents(bytes(text))

    # ---- serving --------------------------------------------------------------------------------------
    def append_ids(
        self, events: InputEvents, previous_output: Sequence[int] | None, turn: int | None = None
    ) -> list[int]:
        """One streaming-session append: pad fill closing the previous micro-turn's output block (None for
        the first micro-turn), this micro-turn's input block, and <|out|> to start its output."""
        fill: list[int] = []
        if previous_output is not None:
            prev = list(previous_output)
            prev_turn = None if turn is None else turn - 1
            if len(prev) > self.spec.out_budget:
                raise BudgetError(
                    f"{_where('output', prev_turn)}: {len(prev)} generated tokens; the output budget is "
                    f"{self.spec.out_budget} (send max_new_tokens={self.spec.out_budget})"
                )
            if len(prev) < self.spec.out_budget and (not prev or prev[-1] != Control.YIELD):
                raise BlockOrderError(
                    f"{_where('output', prev_turn)}: generation stopped after {len(prev)} of "
                    f"{self.spec.out_budget} tokens without <|yield|> (aborted turn?); the block cannot be "
                    f"closed with padding"
                )
            fill = [Control.PAD] * (self.spec.out_budget - len(prev))
        return fill + self.encode_input(events, turn) + [Control.OUT]

    # ---- whole sequences ------------------------------------------------------------------------------
    def interleave(self, turns: Sequence[tuple[InputEvents, OutputEvents]]) -> list[int]:
        """The whole sequence input0, output0, input1, output1, ... (for training and replay)."""
        ids: list[int] = []
        for k, (inp, out) in enumerate(turns):
            ids += self.encode_input(inp, k) + self.encode_output(out, k)
        return ids

    def split(self, ids: Sequence[int]) -> list[MicroTurn]:
        """Micro-turns of a sequence (interleaved or served). The last micro-turn may be cut after its
        input block (output None) or inside its output block (complete=False)."""
        ids = [int(t) for t in ids]
        spec, turns = self.spec, []
        for k, start in enumerate(range(0, len(ids), spec.stride)):
            chunk = ids[start:start + spec.stride]
            if len(chunk) < spec.input_block_len:
                raise BlockOrderError(
                    f"{_where('input', k)}: the sequence ends {len(chunk)} ids into it; an input block is "
                    f"{spec.input_block_len} ids (positions {start}..{start + spec.input_block_len - 1})"
                )
            inp = self.decode_input(chunk[:spec.input_block_len], k)
            out_part = chunk[spec.input_block_len:]
            if not out_part:
                turns.append(MicroTurn(k, inp, None, complete=False))
                continue
            self._check_block_frame(out_part, Control.OUT, len(out_part), _where("output", k))
            complete = len(out_part) == spec.output_block_len
            out = self.decode_output(out_part[1:], k, complete=complete)
            turns.append(MicroTurn(k, inp, out, complete=complete))
        return turns

    # ---- checks ---------------------------------------------------------------------------------------
    def _check_block_frame(self, block: list[int], opener: Control, length: int, where: str) -> None:
        if len(block) != length:
            raise BlockOrderError(f"{where}: {len(block)} ids; the block is exactly {length}")
        if block[0] != opener:
            raise BlockOrderError(
                f"{where}: starts with {self.token_name(block[0])}; it must start with {CONTROL_NAMES[opener]}"
            )

    def _check_pad(self, body: list[int], start: int, where: str, after: str) -> None:
        for i in range(start, len(body)):
            if body[i] != Control.PAD:
                raise BlockOrderError(
                    f"{where}: offset {i + 1} holds {self.token_name(body[i])} after {after}; only <|pad|> "
                    f"may follow it"
                )


def _where(block: str, turn: int | None) -> str:
    return f"{block} block" + ("" if turn is None else f" of micro-turn {turn}")


DEFAULT_LAYOUT = MicroTurnLayout()
