"""benchmarks/attention.py --variants: the config each name stands for, and clear refusals of bad specs."""


import pytest

from microturn_kernels.aligned_attention import AlignedAttentionConfig

from benchmarks import attention as bench


def test_variants_name_their_configs():
    assert bench.parse_variants("S128=128:64:4:2,S256_w8=256:64:8:3") == {
        "aligned_S128": AlignedAttentionConfig(split_size=128, block_n=64, num_warps=4, num_stages=2),
        "aligned_S256_w8": AlignedAttentionConfig(split_size=256, block_n=64, num_warps=8, num_stages=3),
    }
    assert bench.parse_variants("") == {}


@pytest.mark.parametrize("bad", ["S128=128:64:4", "=128:64:4:2", "S=a:64:4:2"])
def test_malformed_variants_are_refused(bad):
    with pytest.raises(SystemExit, match="name=S:block_n:num_warps:num_stages"):
        bench.parse_variants(bad)


def test_an_invalid_config_is_refused_by_the_config():
    with pytest.raises(ValueError, match="not a multiple of block_n"):
        bench.parse_variants("bad=64:128:4:2")
