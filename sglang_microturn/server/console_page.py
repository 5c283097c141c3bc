"""GET /microturn/console: the browser console (sglang_microturn/examples/web/console.html) with the served
layout's numbers filled in, so the page sends audio the server can encode (sample rate, samples per period,
output budget, the stop id). A model without a layout gets the page with `layout: false`, which says so."""

from __future__ import annotations

import functools
import json
from importlib import resources

from sglang_microturn import protocol
from sglang_microturn.format.layout import Control, MicroTurnLayout

PATH = "/microturn/console"
PLACEHOLDER = "__MICROTURN_CONFIG__"


@functools.cache
def _template() -> str:
    text = resources.files("sglang_microturn.examples").joinpath("web/console.html").read_text(encoding="utf-8")
    if PLACEHOLDER not in text:
        raise RuntimeError(f"console.html lost its {PLACEHOLDER} line")
    return text


def page(layout: MicroTurnLayout | None) -> str:
    config = {"layout": layout is not None, "ws_path": protocol.WS_PATH}
    if layout is not None:
        spec = layout.spec
        config.update(period_ms=spec.period_ms, sample_rate=spec.sample_rate, samples_per_turn=spec.samples_per_turn,
                      out_budget=spec.out_budget, stop_ids=[int(Control.YIELD)])
    return _template().replace(PLACEHOLDER, json.dumps(config), 1)
