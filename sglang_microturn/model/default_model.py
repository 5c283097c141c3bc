"""The checkpoint `sglang-microturn serve` runs when no --model-path is given: the `small` MicroTurnForCausalLM
preset (sglang_microturn/model/checkpoints.py), built locally from its seed on first use and cached in
~/.cache/sglang-microturn (or $MICROTURN_CACHE). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from sglang_microturn.model.checkpoints import ensure_checkpoint

DEFAULT_PRESET = "small"


def ensure_default_checkpoint(preset: str = DEFAULT_PRESET) -> Path:
    """The cached default checkpoint folder, built on first use."""
    return ensure_checkpoint(preset)
