"""Trainer-sampler alignment without SGLang: the aligned forward both sides run, aligned reference scoring,
tensor-parallel shards, the fixed-order all-reduce, alignment records and `sglang-microturn align`."""
