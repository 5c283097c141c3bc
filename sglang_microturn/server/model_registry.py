"""Registers MicroTurnForCausalLM with SGLang's ModelRegistry, so SGLang serves a checkpoint whose
config.json says `architectures: ["MicroTurnForCausalLM"]` with our class instead of falling back to its
transformers backend. Runs through the plugin in every process that resolves model classes (the scheduler
builds the model), before any model is built.
"""

from __future__ import annotations

from sglang_microturn.model.checkpoints import ARCHITECTURE


def install() -> str:
    """Register the class (idempotent). Returns a short description for the plugin's log line."""
    from sglang.srt.models.registry import ModelRegistry

    from sglang_microturn.server.microturn_model import MicroTurnForCausalLM

    ModelRegistry.models[ARCHITECTURE] = MicroTurnForCausalLM
    return f"model {ARCHITECTURE}"
