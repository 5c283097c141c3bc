"""`sglang-microturn serve`: SGLang's HTTP server with our plugin and micro-turn serving defaults.

The command line is SGLang's own (`python -m sglang.launch_server ...`); we only add defaults the user did
not set and the default model when no `--model-path` is given. The plugin itself loads through SGLang's
entry-point mechanism in every server process.

Our one switch of our own, `--alignment-mode` (docs/alignment.md), is taken out before SGLang sees the line:
it sets MICROTURN_ALIGNMENT=1 for the server processes (MicroTurnForCausalLM reads it) and adds the flags
alignment needs, refusing ones that contradict it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# (flag, value or None for a switch, why). A default is added only when the user did not pass the flag; a value
# of several words is several arguments.
SERVE_DEFAULTS: tuple[tuple[str, str | None, str], ...] = (
    ("--enable-streaming-session", None, "each micro-turn appends to a session's persistent sequence"),
    ("--attention-backend", "triton", "our attention kernels extend SGLang's Triton backend"),
    ("--sampling-backend", "pytorch", "seeded, batch-invariant sampling"),
    ("--schedule-policy", "fcfs", "lpm rebuilds every waiting session's whole history each iteration"),
    ("--warmups", "microturn", "run the micro-turn batch shapes once (kernels compile) before /health is green"),
    # The HTTP process allocates objects for each micro-turn that live until its reply. With CPython's default
    # thresholds (700, 10, 10) young collections run ~100 times a second and promote every turn in flight, so
    # from 224 live sessions a full collection stalled all of them for 25-70 ms about once a second (H200,
    # benchmarks/results/realtime_capacity_small_h200.json). Rarer young collections promote far fewer
    # short-lived objects; a full one then comes every few minutes under that load.
    ("--gc-threshold", "10000 20 50", "no full garbage collection of the HTTP process every second under load"),
    # uvicorn logs one access line per request at info: 1280 lines a second at 256 live sessions, ~3 % of the
    # HTTP process (H200 profile). Errors and SGLang's own request logging stay.
    ("--log-level-http", "warning", "no access-log line per micro-turn"),
    # Patch 0011: a speaking micro-turn's up-to-16 tokens in runs of up to 8 decode steps per scheduler iteration
    # instead of one iteration (~2 ms of scheduler CPU) per token; docs/multistep-decode.md.
    ("--num-continuous-decode-steps", "8", "up to 8 decode steps per scheduler iteration"),
)


ALIGNMENT_FLAG = "--alignment-mode"
# (flag, value or None for a switch, why) added in alignment mode; a value flag given with another value is
# refused.
ALIGNMENT_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("--attention-backend", "microturn_aligned", "attention bits independent of chunking, batch and path"),
    ("--dtype", "bfloat16", "the aligned kernels take bf16 weights"),
)
# Flags alignment mode refuses, and why.
ALIGNMENT_CONFLICTS = {
    "--enable-deterministic-inference": "it swaps torch ops (mm, log_softmax, ...) for SGLang's batch-invariant"
    " ones inside the server only, so the trainer, which runs without SGLang, would not match",
    "--prefill-attention-backend": "prefill must run the same aligned attention as decode",
    "--decode-attention-backend": "decode must run the same aligned attention as prefill",
}


class AlignmentModeError(ValueError):
    """A flag given with --alignment-mode contradicts it."""


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def alignment_args(user_args: list[str]) -> tuple[list[str], bool]:
    """(SGLang args, alignment on): `--alignment-mode` removed and, when it was given, its flags added."""
    if ALIGNMENT_FLAG not in user_args:
        return user_args, False
    args = [a for a in user_args if a != ALIGNMENT_FLAG]
    for flag, why in ALIGNMENT_CONFLICTS.items():
        if has_flag(args, flag):
            raise AlignmentModeError(f"{ALIGNMENT_FLAG} cannot run with {flag}: {why}; drop one of the two")
    for flag, value, why in ALIGNMENT_FLAGS:
        given = flag_value(args, flag)
        if value is None:
            args += [] if has_flag(args, flag) else [flag]
        elif given is None:
            args += [flag, value]
        elif given != value:
            raise AlignmentModeError(f"{ALIGNMENT_FLAG} needs {flag} {value} ({why}), got {flag} {given}")
    return args, True


class NoCudaError(RuntimeError):
    """Serving needs a CUDA GPU."""


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def table_argv(table: Sequence[tuple[str, str | None, str]], given: Sequence[str] = ()) -> list[str]:
    """The arguments of a (flag, value or None for a switch, why) table, leaving out each flag `given` already
    holds; a value of several words is several arguments."""
    argv: list[str] = []
    for flag, value, _why in table:
        if not has_flag(given, flag):
            argv += [flag] if value is None else [flag, *value.split()]
    return argv


def launch_argv(user_args: list[str], default_model_path: str | None) -> list[str]:
    """The full SGLang launch command for `user_args`."""
    argv = [sys.executable, "-m", "sglang.launch_server"]
    if not has_flag(user_args, "--model-path"):
        if default_model_path is None:
            raise ValueError("no --model-path given and no default model path")
        argv += ["--model-path", default_model_path]
    return argv + table_argv(SERVE_DEFAULTS, user_args) + user_args


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError("no CUDA GPU found: serving needs a CUDA GPU (SGLang cannot serve on CPU)")


def serve(user_args: list[str]) -> None:
    """Check the machine and the SGLang install, then replace this process with the SGLang server."""
    from sglang_microturn import config
    from sglang_microturn.model.default_model import ensure_default_checkpoint
    from sglang_microturn.server.plugin import require_patches

    user_args, aligned = alignment_args(user_args)  # before the GPU check: a bad combination fails anywhere
    require_cuda()
    require_patches()  # fail here, before SGLang spends a minute starting up
    model = None if has_flag(user_args, "--model-path") else str(ensure_default_checkpoint())
    argv = launch_argv(user_args, model)
    os.environ[config.ALIGNMENT] = "1" if aligned else "0"  # the scheduler processes inherit it
    if aligned:
        # Returned logprobs of sampled tokens = log_softmax of the untempered fp32 logits at any temperature
        # (SGLang's sampler otherwise returns log(softmax(logits / T))): the op the trainer side computes.
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    print("[sglang-microturn] " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
