"""vLLM's start-up warm-up, counted apart from serving.

Before an engine reports ready, its worker runs the model on dummy data: the memory profile
(`determine_available_memory`, whose `profile_run` is a forward at the largest batch) and the
compile warm-up (`compile_or_warm_up_model`: compiled sizes, graph capture). Their MoE calls
plan drops like any other, and counted as serving they mix dummy rows into the drop share an
operator reads (a fresh DP=2 + EP server showed a tenth of its profile's rows dropped before
its first request). While either method runs, `moe.capacity` counts under the report's
"warmup" section only (telemetry/stats.py `warming_up`); /metrics never sees those calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ascend_patch.core.context import PatchContext


def make_warmup(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of a worker's start-up method (self) -> result: the original, with the
    patch's counters in warm-up mode while it runs."""
    from ascend_patch.impls.moe.adapters.vllm_modular import state_of

    stats = state_of(ctx).stats

    def warm_up(self: Any) -> Any:
        with stats.warming_up():
            return original(self)

    return warm_up
