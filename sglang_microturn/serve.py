"""`sglang-microturn serve`: SGLang's HTTP server with our plugin and micro-turn serving defaults.

The command line is SGLang's own (`python -m sglang.launch_server ...`); we only add defaults the user did
not set and the default model when no `--model-path` is given. The plugin itself loads through SGLang's
entry-point mechanism in every server process.
"""

from __future__ import annotations

import os
import sys

# (flag, value or None for a switch, why). A default is added only when the user did not pass the flag.
MICROTURN_DEFAULTS: tuple[tuple[str, str | None, str], ...] = (
    ("--enable-streaming-session", None, "each micro-turn appends to a session's persistent sequence"),
    ("--attention-backend", "triton", "our attention kernels extend SGLang's Triton backend"),
    ("--sampling-backend", "pytorch", "seeded, batch-invariant sampling"),
    ("--schedule-policy", "fcfs", "lpm rebuilds every waiting session's whole history each iteration"),
)


class NoCudaError(RuntimeError):
    """Serving needs a CUDA GPU."""


def has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def launch_argv(user_args: list[str], default_model_path: str | None) -> list[str]:
    """The full SGLang launch command for `user_args`."""
    argv = [sys.executable, "-m", "sglang.launch_server"]
    if not has_flag(user_args, "--model-path"):
        if default_model_path is None:
            raise ValueError("no --model-path given and no default model path")
        argv += ["--model-path", default_model_path]
    for flag, value, _why in MICROTURN_DEFAULTS:
        if not has_flag(user_args, flag):
            argv += [flag] if value is None else [flag, value]
    return argv + user_args


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError("no CUDA GPU found: serving needs a CUDA GPU (SGLang cannot serve on CPU)")


def serve(user_args: list[str]) -> None:
    """Check the machine and the SGLang install, then replace this process with the SGLang server."""
    from sglang_microturn.default_model import ensure_default_checkpoint
    from sglang_microturn.plugin import require_patches

    require_cuda()
    require_patches()  # fail here, before SGLang spends a minute starting up
    model = None if has_flag(user_args, "--model-path") else str(ensure_default_checkpoint())
    argv = launch_argv(user_args, model)
    print("[sglang-microturn] " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
