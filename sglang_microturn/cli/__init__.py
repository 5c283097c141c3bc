"""The `sglang-microturn` command: patch, serve, demo, make-model, align."""
