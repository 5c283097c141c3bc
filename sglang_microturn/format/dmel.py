"""Audio front-end, encoder-free early fusion: 16 kHz PCM -> discretized log-mel ("dMel") codes.

No pretrained encoder: each frame's log-mel energies are quantized per bin to L levels over a fixed range,
and each (bin, level) pair is one input-stream token (`MicroTurnLayout.encode_input`). After dMel
(Bai et al., 2024), with coarser frames so a 200 ms micro-turn is F * M = 5 * 16 = 80 tokens.

Framing is causal: frame j is the `win` samples that END at sample (j + 1) * hop, zeros before the signal
starts. A frame therefore needs nothing after its own hop: a chunk of 200 ms yields exactly its 5 frames
with no look-ahead, and `DMelStream` (which carries the last win - hop samples) gives codes identical to
`dmel_codes` on the whole signal, for any chunking.

Glossary: N samples, F frames, K = n_fft // 2 + 1 frequency bins, M mel bins, L levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang_microturn.format.layout import DEFAULT_LAYOUT, LayoutSpec


class AudioFormatError(ValueError):
    """PCM the front-end cannot use (wrong rank or dtype)."""


@dataclass(frozen=True)
class DMelSpec:
    sample_rate: int = 16_000
    hop: int = 640  # samples per frame (40 ms)
    win: int = 1024  # analysis window (64 ms): 384 samples of left context from before the hop
    n_mels: int = 16
    levels: int = 16
    fmin: float = 40.0
    fmax: float = 8000.0
    log_floor: float = float(np.log(1e-4))  # natural log of mel energy; at or below -> level 0 (silence)
    log_ceil: float = float(np.log(1e4))  # at or above -> level L-1 (a full-scale tone is ~e^9)

    @classmethod
    def for_layout(cls, spec: LayoutSpec) -> "DMelSpec":
        return cls(sample_rate=spec.sample_rate, hop=spec.hop_samples, n_mels=spec.n_mels, levels=spec.mel_levels,
                   fmax=spec.sample_rate / 2)

    @property
    def n_fft(self) -> int:
        return self.win


DEFAULT_DMEL = DMelSpec.for_layout(DEFAULT_LAYOUT.spec)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(spec: DMelSpec = DEFAULT_DMEL) -> np.ndarray:
    """Triangular HTK-mel filters [M, K] (float64), peak 1."""
    freqs = np.linspace(0.0, spec.sample_rate / 2, spec.n_fft // 2 + 1)  # [K]
    edges = _mel_to_hz(np.linspace(_hz_to_mel(spec.fmin), _hz_to_mel(spec.fmax), spec.n_mels + 2))  # [M+2]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1] each
    rising = (freqs[None, :] - lo) / (mid - lo)
    falling = (hi - freqs[None, :]) / (hi - mid)
    return np.clip(np.minimum(rising, falling), 0.0, None)  # [M, K]


def as_float_pcm(pcm) -> np.ndarray:
    """Mono PCM as float64 in [-1, 1]: float arrays as they are, int16 scaled by 1/32768."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise AudioFormatError(f"PCM must be mono 1-D samples; got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float64) / 32768.0
    if not np.issubdtype(pcm.dtype, np.floating):
        raise AudioFormatError(f"PCM dtype {pcm.dtype} not supported; pass float (-1..1) or int16")
    return pcm.astype(np.float64)


def _log_mel_frames(context_and_samples: np.ndarray, n_frames: int, spec: DMelSpec, fb: np.ndarray) -> np.ndarray:
    """Log-mel [F, M] of the first n_frames frames; the input starts with win - hop samples of left context."""
    if n_frames == 0:
        return np.zeros((0, spec.n_mels))
    starts = np.arange(n_frames) * spec.hop  # frame j = input[j*hop : j*hop + win]
    frames = context_and_samples[starts[:, None] + np.arange(spec.win)[None, :]]  # [F, win]
    spectrum = np.fft.rfft(frames * np.hanning(spec.win)[None, :], n=spec.n_fft, axis=-1)  # [F, K]
    power = spectrum.real**2 + spectrum.imag**2
    # Elementwise product + sum over the contiguous axis (not BLAS): the same per-frame result whatever
    # the number of frames, which keeps streaming bit-identical to the whole-signal pass.
    mel = (power[:, None, :] * fb[None, :, :]).sum(-1)  # [F, M]
    return np.log(np.maximum(mel, np.exp(spec.log_floor)))


def quantize(log_mel: np.ndarray, spec: DMelSpec = DEFAULT_DMEL) -> np.ndarray:
    """Levels [F, M] (int64, 0..L-1): uniform bins over [log_floor, log_ceil]."""
    scaled = (log_mel - spec.log_floor) / (spec.log_ceil - spec.log_floor) * spec.levels
    return np.clip(np.floor(scaled), 0, spec.levels - 1).astype(np.int64)


def dequantize(codes: np.ndarray, spec: DMelSpec = DEFAULT_DMEL) -> np.ndarray:
    """Log-mel value at the centre of each code's bin [F, M]."""
    step = (spec.log_ceil - spec.log_floor) / spec.levels
    return spec.log_floor + (np.asarray(codes, dtype=np.float64) + 0.5) * step


def log_mel(pcm, spec: DMelSpec = DEFAULT_DMEL) -> np.ndarray:
    """Log-mel [F, M] of a whole signal, F = N // hop (a trailing partial hop makes no frame)."""
    x = as_float_pcm(pcm)
    padded = np.concatenate([np.zeros(spec.win - spec.hop), x])
    return _log_mel_frames(padded, len(x) // spec.hop, spec, mel_filterbank(spec))


def dmel_codes(pcm, spec: DMelSpec = DEFAULT_DMEL) -> np.ndarray:
    """dMel codes [F, M] of a whole signal."""
    return quantize(log_mel(pcm, spec), spec)


def is_silent(codes: np.ndarray) -> bool:
    """True when every code is level 0: energy at or below the floor in every bin of every frame."""
    return not np.any(codes)


class DMelStream:
    """Streaming front-end for one audio stream. Owns, between pushes, the last win - hop samples already
    framed (left context) and the samples of a not yet complete hop; both live until the stream is dropped."""

    def __init__(self, spec: DMelSpec = DEFAULT_DMEL):
        self.spec = spec
        self._fb = mel_filterbank(spec)
        self._buf = np.zeros(spec.win - spec.hop)  # left context, then pending samples

    def fork(self) -> "DMelStream":
        """An independent copy of this stream's state: push into it, keep it only if the push is to stand."""
        other = object.__new__(DMelStream)
        other.spec, other._fb, other._buf = self.spec, self._fb, self._buf.copy()  # the filterbank is read-only
        return other

    def push_log_mel(self, pcm) -> np.ndarray:
        """Log-mel [F, M] of every hop completed by `pcm`."""
        spec = self.spec
        self._buf = np.concatenate([self._buf, as_float_pcm(pcm)])
        n_frames = (len(self._buf) - (spec.win - spec.hop)) // spec.hop
        out = _log_mel_frames(self._buf, n_frames, spec, self._fb)
        self._buf = self._buf[n_frames * spec.hop:]
        return out

    def push(self, pcm) -> np.ndarray:
        """dMel codes [F, M] of every hop completed by `pcm` (a 200 ms chunk: exactly its 5 frames)."""
        return quantize(self.push_log_mel(pcm), self.spec)
