"""The `sglang-microturn` command: patch, serve, cluster, demo, make-model, align."""

from __future__ import annotations

import argparse
import sys

from sglang_microturn.patchset import patching
from sglang_microturn.model.checkpoints import PRESETS
from sglang_microturn.model.default_model import DEFAULT_PRESET
from sglang_microturn.patchset.patching import PatchError, PatchState, UnsupportedSGLang

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
    from sglang_microturn.model.checkpoints import write_checkpoint

    path = write_checkpoint(out, preset)
    print(f"wrote the {preset} MicroTurnForCausalLM checkpoint to {path}")
    return 0


def _align(args) -> int:
    from sglang_microturn.alignment.align import AlignServerError, run
    from sglang_microturn.alignment.record import RecordError, read_record

    try:
        record = read_record(args.record)
    except RecordError as e:
        print(f"sglang-microturn align: bad record: {e}", file=sys.stderr)
        return EXIT_USAGE
    model_path = args.model_path or record.model_path
    if not args.url and not model_path:
        print("sglang-microturn align: nothing to compare: give --url (server re-scoring) and/or --model-path"
              " (reference re-scoring; the record has no model_path)", file=sys.stderr)
        return EXIT_USAGE
    try:
        reports = run(record, args.url, None if args.no_reference else model_path, args.device, args.api_key)
    except AlignServerError as e:
        print(f"sglang-microturn align: {e}", file=sys.stderr)
        return 1
    print(f"{args.record}: {len(record.sequence)} tokens, {len(record.generated)} sampled")
    for r in reports:
        print(r.line())
        for m in r.first_mismatches:
            print(f"           {m}")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps([vars(r) for r in reports], indent=2) + "\n")
    return 1 if any(r.mismatched for r in reports) else 0


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
    c = sub.add_parser(
        "cluster",
        help="--workers N `serve` workers behind SGLang Model Gateway, one URL for clients; other args go to"
        " every worker",
        add_help=False,
    )
    c.add_argument("cluster_args", nargs=argparse.REMAINDER)
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

    a = sub.add_parser("align", help="re-score a recorded session (server prefill and/or aligned reference) and"
                       " check its logprobs bitwise; docs/alignment.md")
    a.add_argument("record", help="alignment record JSON (sglang_microturn/alignment/record.py)")
    a.add_argument("--url", help="server to re-score on, e.g. http://127.0.0.1:30000")
    a.add_argument("--api-key", help="the server's --api-key, if any")
    a.add_argument("--model-path", help="checkpoint for the reference (default: the record's model_path)")
    a.add_argument("--no-reference", action="store_true", help="server path only")
    a.add_argument("--device", choices=["cuda", "cpu"], help="reference device (default: cuda if available;"
                   " cpu runs the Triton interpreter, for short records)")
    a.add_argument("--json", help="also write the per-path reports here")

    if argv[:1] in (["serve"], ["demo"]):  # everything after it belongs to SGLang, including --help
        args = argparse.Namespace(command=argv[0], sglang_args=argv[1:])
    elif argv[:1] == ["cluster"]:  # its own flags mixed with the workers' SGLang flags: cluster.py parses them
        args = argparse.Namespace(command="cluster", cluster_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        if args.command == "patch":
            return _patch(args.action)
        if args.command == "make-model":
            return _make_model(args.out, args.preset)
        if args.command == "align":
            return _align(args)
        if args.command == "cluster":
            from sglang_microturn.cli.cluster import cluster_main

            return cluster_main(args.cluster_args)
        from sglang_microturn.cli.demo import demo
        from sglang_microturn.cli.serve import AlignmentModeError, NoCudaError, serve

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
