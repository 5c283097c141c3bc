"""SGLang plugin entry point (`sglang.srt.plugins` group): runs in the launcher and in every scheduler process.

`register()` first refuses to run on an SGLang that lacks our patches (a half-patched server would serve with
the upstream session bugs), then installs each of our pieces and logs one line naming them.
"""

from __future__ import annotations

import sys

from sglang_microturn import __version__
from sglang_microturn.config import SettingError
from sglang_microturn.patchset.patching import PatchError, unapplied


def require_patches() -> str:
    try:
        missing = unapplied()
    except PatchError as e:
        raise SystemExit(f"sglang-microturn: cannot start: {e}") from None
    if missing:
        listed = ", ".join(f"{name} ({state.value})" for name, state in missing)
        raise SystemExit(
            f"sglang-microturn: cannot start: SGLang patches missing: {listed}; run `sglang-microturn patch apply`"
        )
    return "patches verified"


def _installers():
    """Our pieces, in install order. Each returns a short description of what it registered."""
    from sglang_microturn.server import (
        aligned_attention_backend,
        model_registry,
        moe_dispatch,
        routes,
        scheduler_cohort,
        stall_log,
    )

    return [require_patches, routes.install, model_registry.install, aligned_attention_backend.install,
            moe_dispatch.install, scheduler_cohort.install, stall_log.install]


def register() -> None:
    # SystemExit (not Exception) so SGLang's plugin loader, which only logs exceptions, really stops. Each
    # piece reads its settings before registering anything: a bad value stops the server with nothing half-done.
    try:
        done = [install() for install in _installers()]
    except SettingError as e:
        raise SystemExit(f"sglang-microturn: {e}") from None
    print(f"[sglang-microturn {__version__}] plugin registered: {'; '.join(done)}", file=sys.stderr, flush=True)
