"""`sglang-microturn demo`: start the server with the default model, run examples/duplex_chat.py against it,
stop the server. Extra arguments go to SGLang, as with `serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sglang_microturn.serve import has_flag, require_cuda
from sglang_microturn.server_process import ServerDied, ServerProcess, free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "duplex_chat.py"



def demo(sglang_args: list[str]) -> int:
    require_cuda()
    if not EXAMPLE.is_file():
        raise FileNotFoundError(f"{EXAMPLE} not found: `demo` runs from a source checkout of sglang-microturn")
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
            return subprocess.call([sys.executable, str(EXAMPLE), "--url", server.url])
    except ServerDied as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
