"""Cohort prefill in SGLang's scheduler: coalesce micro-turn appends into one extend, never starve decode.

Why: SGLang runs a prefill whenever one can be formed ("prefill first"). Under live micro-turn traffic an
append arrives every few milliseconds, so almost every scheduler iteration becomes a prefill of 1-3 tiny
extends and the decode batch of the sessions that are speaking steps only when no append happens to be
waiting (measured on an H200 at 64 sessions: 100-220 prefill batches a second against ~80 decode steps, ~3 ms
of CPU each; speaking turns then miss their 200 ms deadline). Each iteration costs about the same CPU time
whatever it holds, so the number of iterations, not the GPU, sets the capacity.

The policy, applied in `Scheduler.get_new_batch_prefill` (an AROUND hook through SGLang's HookRegistry):
while a decode batch is running, appends wait in SGLang's queue until the oldest of them has waited
`MICROTURN_COHORT_WAIT_MS`; then one prefill takes every waiting append that fits (SGLang's own budgets), and
decode steps run in between. That is earliest-deadline-first for the micro-turn shape: every session has the
same period, so the decode rows (older turns) have the earlier deadlines, and an append's slack is spent on
waiting only up to a bound that keeps it far inside its deadline. Nothing waits when nothing else would run:
with no decode batch (all turns listening, or an idle server) a prefill starts at once, and a chunked prefill
in progress always continues. The bound is the only knob (0 turns the policy off: SGLang's own order).

Owns nothing: it only decides, per scheduler iteration, whether the prefill SGLang would form now is formed
now or a few milliseconds later. Costs O(1) per iteration (the queue head is the oldest append under the
`fcfs` schedule policy that `serve` sets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sglang_microturn import config

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
ENV_WAIT_MS = config.COHORT_WAIT_MS
DEFAULT_WAIT_MS = config.SETTINGS[ENV_WAIT_MS].default


@dataclass(frozen=True)
class CohortPolicy:
    """Hold prefills behind a running decode batch until the oldest waiting append has waited `max_wait_s`."""

    max_wait_s: float

    def holds_prefill(self, scheduler, running_batch, now: float) -> bool:
        """True: run decode this iteration and leave the waiting appends queued."""
        if self.max_wait_s <= 0 or not scheduler.waiting_queue or scheduler.chunked_req is not None:
            return False
        if running_batch.is_empty() or running_batch.is_prefill_only:
            return False  # nothing else to run: holding would only idle the GPU
        oldest = scheduler.waiting_queue[0].time_stats.wait_queue_entry_time  # perf_counter seconds
        return now - oldest < self.max_wait_s


def read_wait_ms() -> float:
    return config.value(config.COHORT_WAIT_MS)


def make_hook(policy: CohortPolicy):
    from sglang.srt.managers.schedule_batch import NextBatchPlan

    def get_new_batch_prefill(original, scheduler, running_batch, *args, **kwargs):
        if policy.holds_prefill(scheduler, running_batch, time.perf_counter()):
            return NextBatchPlan(batch_to_run=None, running_batch=running_batch)
        return original(scheduler, running_batch, *args, **kwargs)

    return get_new_batch_prefill


def install() -> str:
    wait_ms = read_wait_ms()  # before anything is registered: a bad value changes nothing
    if wait_ms == 0:
        return "cohort prefill off"
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, make_hook(CohortPolicy(wait_ms / 1e3)), HookType.AROUND)
    return f"cohort prefill (wait <= {wait_ms:g} ms behind decode)"
