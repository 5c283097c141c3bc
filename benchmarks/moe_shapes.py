"""The MoE shapes and the config-sweep grid that the MoE decode benchmark (moe_decode) and the compile report
(moe_compile_report) share."""

from __future__ import annotations

SHAPES = [(128, 8, 2048, 768), (8, 2, 4096, 14336), (256, 6, 4096, 2048)]  # (E, K, D, I)


def selected_shapes(args):
    return SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]


GATE_UP_FIELDS = ("BLOCK_I", "BLOCK_D", "gate_up_warps", "gate_up_stages")
DOWN_FIELDS = ("BLOCK_N", "BLOCK_K", "down_warps", "down_stages", "split_down", "preload_w2")
FLAG_FIELDS = ("evict_first", "pdl", "prefetch_w2", "pdl_gate_up")
GATE_UP_GRID = [  # (BLOCK_I, BLOCK_D, warps, stages): unrolled vs pipelined, narrow vs wide tiles
    (4, 512, 4, 0), (16, 256, 4, 0), (8, 1024, 8, 0), (16, 512, 8, 0),
    (8, 512, 4, 2), (8, 512, 4, 3), (16, 256, 4, 3), (4, 1024, 4, 3), (16, 512, 8, 3),
]  # fmt: skip
DOWN_GRID = [  # (BLOCK_N, BLOCK_K, warps, stages, split_down, preload_w2): one program per token, then per pair,
    # then per pair with its weights loaded before the wait for the gate-up grid (whole tiles: BLOCK_K >= I)
    (4, 256, 4, 0, False, False), (8, 256, 4, 0, False, False), (2, 512, 4, 0, False, False),
    (8, 512, 8, 0, False, False), (4, 256, 4, 3, False, False), (4, 512, 4, 3, False, False),
    (8, 512, 8, 3, False, False), (16, 256, 8, 3, False, False),
    (2, 256, 2, 0, True, False), (4, 256, 4, 0, True, False), (8, 256, 4, 0, True, False),
    (16, 256, 4, 0, True, False), (8, 512, 8, 0, True, False), (4, 256, 4, 3, True, False),
    (16, 512, 8, 3, True, False),
    (16, 256, 4, 0, True, True), (8, 512, 4, 0, True, True), (4, 1024, 2, 0, True, True),
    (8, 1024, 4, 0, True, True), (16, 1024, 8, 0, True, True), (4, 2048, 4, 0, True, True),
    (8, 2048, 8, 0, True, True),
]  # fmt: skip
FLAG_GRID = [(True, False, False, False), (False, True, False, False), (False, True, True, False),
             (True, True, True, False), (False, True, False, True), (False, False, False, True)]  # fmt: skip
# group_pairs (one program per run of pairs sharing an expert) with its own tiles: (BLOCK_I, BLOCK_D, BLOCK_N,
# BLOCK_K, gate_up_stages, down_stages), PDL on. Timed and reported, not merged (its tiles are not the
# per-pair kernels').
GROUPED_FIELDS = ("BLOCK_I", "BLOCK_D", "BLOCK_N", "BLOCK_K", "gate_up_stages", "down_stages", "group_pairs", "pdl")
GROUPED_GRID = [(8, 128, 8, 128, 0, 0), (8, 128, 8, 256, 3, 3), (16, 128, 16, 128, 3, 0), (4, 256, 8, 256, 3, 3)]


def sweep_candidates(base):
    """(group, config) pairs: the table config, then one group of fields varied at a time."""
    from dataclasses import replace

    out = {base: "default"}
    for values in GATE_UP_GRID:
        out.setdefault(replace(base, **dict(zip(GATE_UP_FIELDS, values))), "gate_up")
    for values in DOWN_GRID:
        out.setdefault(replace(base, **dict(zip(DOWN_FIELDS, values))), "down")
    for values in FLAG_GRID:
        out.setdefault(replace(base, **dict(zip(FLAG_FIELDS, values))), "flags")
    for values in GROUPED_GRID:
        out.setdefault(replace(base, **dict(zip(GROUPED_FIELDS, (*values, True, True)))), "grouped")
    return [(group, cfg) for cfg, group in out.items()]
