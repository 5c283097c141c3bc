"""The `sglang-microturn` command: patch, serve, demo, make-model."""

from __future__ import annotations

import argparse
import sys

from sglang_microturn import patching
from sglang_microturn.checkpoints import PRESETS
from sglang_microturn.default_model import DEFAULT_PRESET
from sglang_microturn.patching import PatchError, PatchState, UnsupportedSGLang

EXIT_USAGE = 2


def _patch(action: str) -> int:
    target = patching.installed_sglang()
    patching.check_version(target)
    patches = patching.load_patches()
    print(f"SGLang {target.version} at {target.root}")
    failed = False
    for patch in patches:
        if action == "check":
            found = patching.state(patch, target)
            report = found.value
        else:
            act = patching.apply if action == "apply" else patching.revert
            done_state = PatchState.APPLIED if action == "apply" else PatchState.NOT_APPLIED
            found = act(patch, target)
            report = {
                done_state: f"already {done_state.value}",
                PatchState.CONFLICT: "conflict: does not match the installed files, left untouched",
            }.get(found, "applied" if action == "apply" else "reverted")
        failed |= found is PatchState.CONFLICT or (action == "check" and found is not PatchState.APPLIED)
        print(f"  {patch.name}: {report}")
    return 1 if failed else 0


def _make_model(out: str, preset: str) -> int:
    from sglang_microturn.checkpoints import write_checkpoint

    path = write_checkpoint(out, preset)
    print(f"wrote the {preset} MicroTurnForCausalLM checkpoint to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sglang-microturn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patch", help="apply, check or revert our patches on the installed SGLang")
    p.add_argument("action", choices=["apply", "check", "revert"])
    s = sub.add_parser(
        "serve",
        help="launch SGLang's HTTP server with the plugin and micro-turn defaults; other args go to SGLang",
        add_help=False,
    )
    s.add_argument("sglang_args", nargs=argparse.REMAINDER)
    d = sub.add_parser(
        "demo",
        help="start the server with the default model, run examples/duplex_chat.py against it, stop it",
        add_help=False,
    )
    d.add_argument("sglang_args", nargs=argparse.REMAINDER)
    m = sub.add_parser("make-model", help="write a MicroTurnForCausalLM checkpoint (seeded random weights, local tokenizer)")
    m.add_argument("--out", required=True, help="output folder (must not already hold a checkpoint)")
    m.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="size: tiny (CPU tests), small (the serve default), bench (GPU MoE benchmarks)")

    if argv[:1] in (["serve"], ["demo"]):  # everything after it belongs to SGLang, including --help
        args = argparse.Namespace(command=argv[0], sglang_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        if args.command == "patch":
            return _patch(args.action)
        if args.command == "make-model":
            return _make_model(args.out, args.preset)
        from sglang_microturn.demo import demo
        from sglang_microturn.serve import AlignmentModeError, NoCudaError, serve

        try:
            if args.command == "demo":
                return demo(args.sglang_args)
            serve(args.sglang_args)
        except (NoCudaError, AlignmentModeError) as e:
            print(f"sglang-microturn: {e}", file=sys.stderr)
            return EXIT_USAGE
        return 0  # not reached: serve() execs SGLang
    except (PatchError, FileExistsError) as e:
        print(f"sglang-microturn: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UnsupportedSGLang) else 1


if __name__ == "__main__":
    sys.exit(main())
