"""`sglang-microturn demo`: start the server with the default model, run the duplex chat example
(sglang_microturn/examples/duplex_chat.py, shipped in the package) against it, stop the server. Extra arguments
go to SGLang, as with `serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sglang_microturn.cli.serve import has_flag, require_cuda
from sglang_microturn.cli.server_process import ServerDied, ServerProcess, free_port

EXAMPLE = "sglang_microturn.examples.duplex_chat"  # a module of this package: installed wherever it is


def demo(sglang_args: list[str]) -> int:
    require_cuda()
    port = None if has_flag(sglang_args, "--port") else free_port()
    args = list(sglang_args) + (["--port", str(port)] if port else [])
    port = port or int(args[args.index("--port") + 1])
    exe = shutil.which("sglang-microturn") or sys.exit("sglang-microturn is not on PATH")
    log = Path(tempfile.gettempdir()) / "sglang-microturn-demo.log"
    print(f"[demo] starting the server (log: {log}); the first start builds the default model and takes "
          "a minute or two", flush=True)
    try:
        with ServerProcess([exe, "serve", *args], port, str(log)) as server:
            print(f"[demo] server up in {server.startup_s:.0f} s", flush=True)
            return subprocess.call([sys.executable, "-m", EXAMPLE, "--url", server.url])
    except ServerDied as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
