"""The interaction model without SGLang: spec and presets, checkpoints, the PyTorch reference (torch only)."""
