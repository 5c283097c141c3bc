"""The `microturn` server warm-up: run the micro-turn shapes once before the server takes traffic.

Why: a freshly started server compiles a Triton kernel the first time a batch shape reaches it (a new
specialisation of its integer arguments: value 1, a multiple of 16, anything else), ~0.5 s each inside a
live micro-turn. On an H200 a fresh server missed 75% of its deadlines in its first 12 s at 16 sessions.
SGLang runs registered warm-ups (`--warmups NAME`) in its HTTP server's startup, before it listens, so
/health turns green only after this has run; `sglang-microturn serve` adds `--warmups microturn`.

The plan (`warmup_plan`) drives groups of concurrent sessions through the micro-turn API, so the scheduler
forms the batches live traffic forms: for each group size (1 through `MICROTURN_WARMUP_SESSIONS`, taking every
specialisation class: 1, 2, 3, multiples of 16 and their neighbours), rounds where every session speaks
(16 tokens: prefill then decode at that batch size), listens (1 token) or only listens (0 tokens: prefill
only), with chunk lengths that cycle through the same classes. Sessions are closed at the end and the radix
cache is flushed: nothing of the warm-up stays.

Last, every SGLang process freezes its garbage collector's heap (SGLang's freeze_gc: the tokenizer manager,
the scheduler, the detokenizer): what exists once the server is warm (modules, the model, compiled kernels,
millions of objects) moves out of the collected generations. Unfrozen, each full collection walks all of it:
on an H200 at 128 live sessions the HTTP process spent ~0.5 s in a collection every ~1.7 s, stalling every
micro-turn in flight.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass

from sglang_microturn import config

logger = logging.getLogger(__name__)

NAME = "microturn"
ENV_SESSIONS = config.WARMUP_SESSIONS
FLUSH_TIMEOUT_S = 10.0  # the scheduler flushes once the closed sessions are released
# Chunk lengths: the default micro-turn block (97 ids + the opener) and each integer-specialisation class.
CHUNKS = (98, 97, 1, 16, 17, 128, 2, 31)
BUDGETS = (16, 1, 0)  # speak (decode at the group's batch size), listen, listen only (prefill only)


@dataclass(frozen=True)
class Round:
    sessions: int  # sessions appending concurrently
    chunk: int  # input ids per append
    budget: int  # output tokens per append


def group_sizes(max_sessions: int) -> list[int]:
    """1, 2, 3 and every multiple of 16 up to max_sessions with its neighbours, plus max_sessions."""
    sizes = {1, 2, 3, max_sessions}
    for m in range(16, max_sessions + 1, 16):
        sizes |= {m - 1, m, m + 1}
    return sorted(s for s in sizes if 1 <= s <= max_sessions)


def warmup_plan(max_sessions: int) -> list[Round]:
    rounds, k = [], 0
    for n in group_sizes(max_sessions):
        for budget in BUDGETS:
            rounds.append(Round(n, CHUNKS[k % len(CHUNKS)], budget))
            k += 1
    return rounds


def read_sessions() -> int:
    return config.value(config.WARMUP_SESSIONS)


def _ids(session: int, turn: int, n: int, vocab: int) -> list[int]:
    # Any in-vocabulary ids above the control range: warm-up needs shapes, not meaning.
    lo = min(100, vocab - 1)
    return [lo + (session * 7919 + turn * 104729 + i) % (vocab - lo) for i in range(n)]


async def run(api, rounds: list[Round], vocab: int) -> int:
    """Run `rounds` through `api` (open / append / close coroutines taking request bodies, as the HTTP API's
    handlers do). Returns the number of appends run. Every session opened is closed, also on failure."""
    opened: list[str] = []
    appends = 0
    try:
        for _ in range(max((r.sessions for r in rounds), default=0)):
            opened.append((await api.open({"output_budget": 16, "ignore_eos": True}))["session_id"])
        for turn, r in enumerate(rounds):
            await asyncio.gather(*(
                api.append({"session_id": sid, "input_ids": _ids(i, turn, r.chunk, vocab), "output_budget": r.budget})
                for i, sid in enumerate(opened[:r.sessions])
            ))
            appends += r.sessions
    finally:
        for sid in opened:
            await api.close({"session_id": sid})
    return appends


def install(api_factory) -> str:
    """Register the warm-up with SGLang (HTTP server process). `api_factory()` gives the micro-turn API."""
    n = read_sessions()
    if n == 0:
        return "warm-up off"
    from sglang.srt.entrypoints.warmup import warmup

    @warmup(NAME)
    async def microturn_warmup(disaggregation_mode, tokenizer_manager):
        api = api_factory()
        cap = api.registry.max_sessions  # MICROTURN_MAX_SESSIONS: the warm-up never opens more
        rounds = warmup_plan(n if cap is None else min(n, cap))
        done = await run(api, rounds, tokenizer_manager.model_config.vocab_size)
        api.admission.forget()  # warm-up bursts say nothing of what live sessions will see
        # The sessions' first chunks sit in the radix cache (evictable); flush them so the first user's
        # prompt is not served a prefix of warm-up ids.
        flushed = await tokenizer_manager.flush_cache(timeout_s=FLUSH_TIMEOUT_S)
        gc.collect()  # this process's garbage goes before its heap is frozen
        await tokenizer_manager.freeze_gc()  # here, then in the scheduler and the detokenizer
        logger.info("microturn warm-up: %d rounds, %d appends, groups up to %d sessions; cache flushed: %s; "
                    "heaps frozen", len(rounds), done, max(r.sessions for r in rounds), getattr(flushed, "success", flushed))

    return f"warm-up {NAME!r} (up to {n} sessions)"
