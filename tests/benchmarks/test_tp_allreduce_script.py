"""benchmarks/tp_allreduce.py on 2 CPU processes over gloo: the JSON it writes for the 2-GPU run, with every
bitwise check true (at W = 2 gloo's own bf16 all-reduce is one commutative addition, so it agrees too)."""

import json

import pytest

from benchmarks import tp_allreduce


def test_gloo_run_writes_every_check_true(monkeypatch, tmp_path):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)  # the run sets it to 0; restored afterwards
    out = tmp_path / "tp.json"
    assert tp_allreduce.main(["--out", str(out), "--backend", "gloo", "--hidden", "64", "--tokens", "1", "7",
                              "--iters", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["nccl_env"]["NCCL_NVLS_ENABLE"] == "0"
    assert [r["tokens"] for r in result["rows"]] == [1, 7]
    for row in result["rows"]:
        assert row["ranks_equal"] and row["split_invariant"] and row["equal_to_all_reduce"], row
        assert row["bytes_per_rank"] == row["tokens"] * 64 * 2 and row["fixed_us"] > 0


def test_nvls_on_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    with pytest.raises(tp_allreduce.NvlsEnabledError, match="NCCL_NVLS_ENABLE=1"):
        tp_allreduce.run(tp_allreduce.parse_args(["--out", str(tmp_path / "x.json"), "--backend", "gloo"]))
