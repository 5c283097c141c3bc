import os

# Triton decides interpreter vs. GPU at decoration time: this must run before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("MICROTURN_GPU_TESTS") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sglang_ctx():
    """Publish the config SGLang's scheduler-side classes read at run time (a dummy ServerArgs, tp_rank 0)."""
    from sglang.srt.runtime_context import get_context, get_parallel

    override = get_context().override_server_args(enable_streaming_session=True)
    server_args = override.install()
    try:
        with get_parallel().override(tp_rank=0):
            yield server_args
    finally:
        override.restore()


@pytest.fixture
def server(monkeypatch):
    """A /microturn API over HTTP on loopback (uvicorn) in front of the stand-in tokenizer manager
    (tests/rigs/fake_sglang_http.py); yields (base URL, the FakeTokenizerManager)."""
    from fake_sglang_http import FakeTokenizerManager, app_for, serve_on_loopback

    from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI

    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "100000")
    tm = FakeTokenizerManager()
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    with serve_on_loopback(app_for(api)) as url:
        yield url, tm
