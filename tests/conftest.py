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
