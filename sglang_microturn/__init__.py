"""sglang-microturn: serve full-duplex interaction models on SGLang (plugin + patch-set)."""

__version__ = "0.1.0"
SGLANG_VERSION = "0.5.17"  # the only SGLang release our patches and internals target
