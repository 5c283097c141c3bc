"""`sglang-microturn serve`: SGLang's command line plus our defaults; a clear exit 2 without a CUDA GPU."""

import subprocess
import sys

import pytest
import torch

from sglang_microturn.cli.serve import SERVE_DEFAULTS, AlignmentModeError, alignment_args, launch_argv


def test_defaults_and_default_model_are_added():
    argv = launch_argv(["--port", "31000"], "/cache/default")
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert argv[3:5] == ["--model-path", "/cache/default"]
    for flag, value, _ in SERVE_DEFAULTS:
        i = argv.index(flag)
        assert value is None or argv[i + 1:i + 1 + len(value.split())] == value.split()
    assert argv[-2:] == ["--port", "31000"]


@pytest.mark.parametrize("override", [["--attention-backend", "flashinfer"], ["--attention-backend=flashinfer"]])
def test_user_flags_win_over_defaults(override):
    argv = launch_argv(["--model-path", "/m", *override], None)
    assert argv.count("--model-path") == 1 and "/m" in argv
    assert "triton" not in argv
    assert argv[-len(override):] == override


def test_missing_model_path_without_default_is_an_error():
    with pytest.raises(ValueError, match="--model-path"):
        launch_argv([], None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("args", [[], ["--model-path", "/nonexistent", "--port", "1"]])
def test_serve_and_demo_without_cuda_exit_2_with_one_line(command, args):
    proc = subprocess.run([sys.executable, "-m", "sglang_microturn.cli.main", command, *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["sglang-microturn: no CUDA GPU found: serving needs a CUDA GPU (SGLang cannot serve on CPU)"]
    assert proc.stdout == ""


def test_alignment_mode_flag_becomes_sglang_flags():
    args, aligned = alignment_args(["--alignment-mode", "--port", "31000"])
    assert aligned and "--alignment-mode" not in args
    argv = launch_argv(args, "/m")
    assert argv[argv.index("--attention-backend") + 1] == "microturn_aligned"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    # Prefill CUDA graphs stay on: they capture the decoder stack, which runs the aligned forward
    # (tests/server/test_aligned_model_sglang.py)
    assert "--disable-prefill-cuda-graph" not in argv
    assert argv.count("--attention-backend") == 1
    assert alignment_args(["--port", "1"]) == (["--port", "1"], False)
    args = alignment_args(["--alignment-mode", "--attention-backend=microturn_aligned", "--disable-prefill-cuda-graph"])[0]
    assert args.count("--attention-backend=microturn_aligned") == 1 and args.count("--disable-prefill-cuda-graph") == 1


@pytest.mark.parametrize("args,match", [
    (["--attention-backend", "triton"], "needs --attention-backend microturn_aligned .* got --attention-backend triton"),
    (["--dtype=float16"], "needs --dtype bfloat16"),
    (["--enable-deterministic-inference"], "cannot run with --enable-deterministic-inference: it swaps torch ops"),
    (["--decode-attention-backend", "fa3"], "cannot run with --decode-attention-backend"),
])
def test_alignment_mode_refuses_contradicting_flags(args, match):
    with pytest.raises(AlignmentModeError, match=match):
        alignment_args(["--alignment-mode", *args])


def test_serve_alignment_conflict_exits_2_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "sglang_microturn.cli.main", "serve", "--alignment-mode",
                           "--attention-backend", "fa3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs --attention-backend microturn_aligned" in proc.stderr


def test_sglang_parses_every_default_as_meant():
    """The defaults go through SGLang's own parser: a several-word value (--gc-threshold) is several ints."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(launch_argv([], "/m")[3:])
    assert ns.gc_threshold == [10000, 20, 50]
    assert ns.enable_streaming_session and ns.attention_backend == "triton" and ns.schedule_policy == "fcfs"
