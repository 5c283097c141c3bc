"""benchmarks/moe_decode.py --sweep's bookkeeping on CPU: candidates, per-config checks, scoring, the merged
config, the best per (shape, M), and a JSON that is complete and valid. Kernels run under the Triton
interpreter at a tiny shape; timings are faked (a fixed number per config), SGLang's MoE is a stub."""

import argparse
import json
from dataclasses import replace

import torch

from benchmarks import moe_decode, moe_shapes

from microturn_kernels.moe_gemv import MoeGemvConfig, moe_gemv_config  # noqa: E402

BASE = MoeGemvConfig(BLOCK_I=8, BLOCK_D=32, BLOCK_N=8, BLOCK_K=16)


def test_candidates_vary_one_group_and_merge_takes_each_groups_winner():
    cands = moe_shapes.sweep_candidates(BASE)
    assert cands[0] == ("default", BASE) and len({c for _, c in cands}) == len(cands)
    for group, cfg in cands[1:]:
        changed = {f for f in moe_decode.GATE_UP_FIELDS + moe_decode.DOWN_FIELDS + moe_decode.FLAG_FIELDS
                   if getattr(cfg, f) != getattr(BASE, f)}  # fmt: skip
        fields = {"gate_up": moe_decode.GATE_UP_FIELDS, "down": moe_decode.DOWN_FIELDS, "flags": moe_decode.FLAG_FIELDS,
                  "grouped": moe_shapes.GROUPED_FIELDS}  # fmt: skip
        assert changed and changed <= set(fields[group]), (group, cfg)
    g = replace(BASE, BLOCK_I=16, gate_up_stages=3)
    d = replace(BASE, BLOCK_N=4, down_warps=8)
    f = replace(BASE, pdl=True)
    timed = [("gate_up", g, 0.9), ("down", d, 0.95), ("down", BASE, 0.97), ("flags", f, 1.02)]
    merged = moe_decode.merge_best(BASE, timed)
    assert merged == replace(BASE, BLOCK_I=16, gate_up_stages=3, BLOCK_N=4, down_warps=8)  # flags lost: not kept


def test_sweep_dry_run_writes_complete_json(tmp_path, monkeypatch):
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    shape = (8, 2, 64, 32)  # E, K, D, I
    monkeypatch.setattr(moe_decode, "DEVICE", "cpu")
    monkeypatch.setattr(moe_shapes, "SHAPES", [shape])
    monkeypatch.setattr(moe_decode, "DECODE_M", [1, 2])
    monkeypatch.setattr(moe_decode, "SWEEP_M_FOR_RANKING", [1, 2])
    monkeypatch.setattr(moe_shapes, "GATE_UP_GRID", [(16, 64, 4, 0), (4, 32, 2, 2)])
    monkeypatch.setattr(moe_shapes, "DOWN_GRID", [(4, 32, 4, 0, False, False), (2, 16, 2, 3, True, False), (8, 32, 2, 0, True, True)])
    monkeypatch.setattr(moe_shapes, "FLAG_GRID", [(True, True, True)])
    monkeypatch.setattr(moe_shapes, "GROUPED_GRID", [(8, 16, 8, 16, 0, 2)])
    monkeypatch.setattr(moe_decode, "measure_bandwidth", lambda: {"pure_read_TBps": 3.0})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(fused_moe, "fused_experts", lambda **kw: kw["hidden_states"])


    timings = iter(range(1000))  # each timing faster than the last: every group beats the default

    def fake_time_graph(fn_for_call, calls=16, replays=7):
        fn_for_call(0)
        return 100.0 - next(timings)

    monkeypatch.setattr(moe_decode, "time_graph", fake_time_graph)
    out = tmp_path / "sweep.json"
    assert moe_decode.run_sweep(argparse.Namespace(out=str(out), shapes="all", budget_s=600.0)) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["bandwidth"]["pure_read_TBps"] == 3.0
    (row,) = result["shapes"]
    assert row["default_config"] == moe_gemv_config(64, 32).__dict__
    assert all(c.get("ok") for c in row["configs"]), [c for c in row["configs"] if not c.get("ok")]
    assert all(c["batch_invariant"] for c in row["configs"])
    assert [d["M"] for d in row["decode"]] == [1, 2]
    for d in row["decode"]:
        assert d["best"]["us"] == min(d["config_us"].values())
        assert d["default"]["us"] == d["config_us"]["0"]
    merged = row["configs"][row["merged_config_id"]]
    assert merged["group"] == "merged" and merged["ok"] and str(merged["id"]) in row["decode"][0]["config_us"]
    summary = row["deployable"]
    assert summary["config"] == "merged" and summary["never_slower_than_sglang_up_to_M"] == 2
