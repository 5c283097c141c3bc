"""A stand-in SGLang worker in its own process, for tests of SGLang Model Gateway in front of several workers:
the project's real /microturn front and API (sglang_microturn/server/routes.py) over the fake tokenizer manager
of fake_sglang_http.py, plus the routes the gateway probes before it registers a worker (/health,
/v1/models, /server_info, /model_info), SGLang's /v1/loads (the load the gateway polls; its waiting-request
count is set through POST /standin/load {"waiting": N}, GET /standin/load says how often it was polled) and a
plain /generate that names the worker.

    python tests/rigs/standin_worker.py --port PORT [--rows N] [--log-memory-pool]

`--rows` gives the request pool that many rows (the session cap is derived from it as in SGLang);
`--log-memory-pool` prints SGLang's "Memory pool end" line once the app is built, as a real worker does once
it holds its GPU memory (`sglang-microturn cluster` starts the next worker on it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its sibling rigs

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from fake_sglang_http import FakeTokenizerManager  # noqa: E402
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI  # noqa: E402
from sglang_microturn.server.routes import mount  # noqa: E402

MODEL = "standin"


def build_app(port: int, rows: int | None) -> FastAPI:
    app = FastAPI()
    tm = FakeTokenizerManager()
    mount(app, MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000, req_to_token_rows=rows)))
    info = {"model_path": MODEL, "tokenizer_path": MODEL, "served_model_name": MODEL, "is_generation": True,
            "version": "0.5.17", "tp_size": 1, "dp_size": 1}

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "sglang"}]}

    @app.get("/server_info")
    @app.get("/model_info")
    async def server_info():
        return info

    @app.post("/generate")
    async def generate():  # a plain /generate: says which worker answered
        return {"text": "", "meta_info": {"worker_port": port}}

    load = {"waiting": 0, "polls": 0}

    @app.get("/v1/loads")
    async def loads():  # SGLang's shape (entrypoints/v1_loads.py), one DP rank
        from sglang.srt.managers.load_snapshot import LoadSnapshot

        load["polls"] += 1
        snapshot = LoadSnapshot(num_waiting_reqs=load["waiting"], max_total_num_tokens=100_000)
        return {"timestamp": "", "version": "0.5.17", "accelerator": "cpu", "num_accelerators": 1,
                "loads": [snapshot.to_dict()]}

    @app.post("/standin/load")
    async def set_load(body: dict):
        load["waiting"] = int(body["waiting"])
        return load

    @app.get("/standin/load")
    async def get_load():
        return load

    @app.post("/standin/hold")
    async def hold(body: dict):  # {"on": true}: turns wait (no token, no completion) until {"on": false}
        if body["on"]:
            tm.hold = asyncio.Event()
        elif tm.hold is not None:
            tm.hold.set()
        return {}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--log-memory-pool", action="store_true")
    args = p.parse_args()
    app = build_app(args.port, args.rows)
    # The API imports these on its first call; importing SGLang (and torch) then would block the event loop for
    # seconds, long enough for the gateway's health probes to time out and drop the worker.
    import sglang.srt.managers.io_struct  # noqa: F401
    import sglang.srt.managers.load_snapshot  # noqa: F401
    import sglang.srt.managers.schedule_batch  # noqa: F401
    if args.log_memory_pool:
        print("Memory pool end. (stand-in)", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
