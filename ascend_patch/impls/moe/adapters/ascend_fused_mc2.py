"""Visibility on vllm-ascend 0.23.0.post1's FUSED_MC2 steps, where the kernel drops silently.

`FusedMC2CommImpl.fused_experts` (ops/fused_moe/moe_comm_method.py:286-352) replaces the
whole dispatch / MLP / combine by one kernel and never calls `build_token_dispatch_input`,
so the drop step never sees these steps (ascend_0_23.py keeps them whole). With
`enable_fused_mc2: 1` that kernel is `dispatch_ffn_combine(..., max_output_size=
mega_moe_max_tokens, x_active_mask=mc2_mask)` (CM:310-327), which truncates every rank's
received rows past `max_output_size` (telemetry/overflow.py: what is counted, from the kernel
source). This site counts them before the kernel runs and leaves the call untouched:

    FusedMC2CommImpl.fused_experts (CM:286)   <- make_fused_experts
      ids = log2phy[ids] (CM:300-301), as the kernel gets them
      per-expert rows of this rank's active tokens (mc2_mask)
      gather_from_sequence_parallel_region over the step's dispatcher's EP group: [S, E],
        the collective the drop step uses on the all-to-all path; the MC2 group the kernel
        runs on has the EP group's ranks in the same order (vllm_ascend/distributed/
        parallel_state.py:84-96 builds it as vLLM builds its EP group)
      rows each EP rank receives -> rows past mega_moe_max_tokens per rank
        -> report (stats["fused_mc2"]), /metrics, one warning line per log interval
      the original fused_experts, same arguments

Every rank takes part in the gather on every counted step, with zero tokens too: whether a step
is counted depends only on the config (`fused_mc2_overflow`, `enable_fused_mc2 == 1`, compared
over the EP group on the process's first call) and on graph capture, which every rank of a
group does for the same steps. Captured steps are not counted (a host read cannot be
captured, and nothing in Python runs at replay): FUSED_MC2 under ACL graphs is decode, whose
batches (MC2 capacity, at most 512 tokens per TP rank) are far below the limit.

`enable_fused_mc2: 2` (dispatch_gmm_combine_decode, CM:329-345) takes no output limit: not
counted. vllm-ascend 0.18.0 (once its site set, carried over from this one, applies this site)
switches FUSED_MC2 with the environment variable VLLM_ASCEND_ENABLE_FUSED_MC2 and calls the
same kernel with max_output_size=65536 and no x_active_mask (0.18.0 CM:281-295; the kernel's
clamps are the same, op_kernel/dispatch_ffn_combine_kernel.hpp:397-400, :781-784): there every
token's rows count, padding included. Only 0.23.0.post1 ran here (tests/ascend). Drops (drop_token_ratio > 0) and FUSED_MC2 never meet on A3 (ascend_0_23.py refuses
that config), so what is counted is always the kernel's own, unplanned truncation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import ascend_0_23
from ascend_patch.impls.moe.telemetry.overflow import (
    OverflowRecorder,
    local_rows_per_expert,
    received_rows,
)


def make_fused_experts(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of FusedMC2CommImpl.fused_experts(self, fused_experts_input)."""
    state = ascend_0_23.state_of(ctx)

    def fused_experts(self: Any, fused_experts_input: Any) -> Any:
        layer = state.running
        if layer is not None and not ascend_0_23.capturing():
            ascend_0_23.check_config_once(state, layer, self.token_dispatcher)
            _count(state, layer, self, fused_experts_input)
        return original(self, fused_experts_input=fused_experts_input)

    return fused_experts


# 0.18.0 hardcodes dispatch_ffn_combine's max_output_size (CM:292).
_FIXED_MAX_OUTPUT_0_18 = 65536


def _kernel_settings(upstream: Any) -> tuple[Any, int, bool]:
    """(the FUSED_MC2 switch, max_output_size, whether mc2_mask reaches the kernel), as the
    release passes them. 0.18.0's site set declares envs.env_variables instead of
    get_ascend_config (spec_releases.py)."""
    if "env_variables" in upstream:
        switch = upstream.env_variables["VLLM_ASCEND_ENABLE_FUSED_MC2"]()
        settings = (switch, _FIXED_MAX_OUTPUT_0_18, False)
    else:  # the audit reads this branch for the site sets without env_variables only
        config = upstream.get_ascend_config()
        settings = (config.enable_fused_mc2, int(config.mega_moe_max_tokens), True)
    return settings


def _count(state: Any, layer: Any, comm: Any, inputs: Any) -> None:
    if not state.options.fused_mc2_overflow:
        return
    switch, limit, masked = _kernel_settings(state.upstream)
    if switch != 1:
        return
    dispatcher = comm.token_dispatcher
    ep_size = int(dispatcher.ep_size)
    num_experts = int(comm.moe_config.num_local_experts) * ep_size
    ids = inputs.topk_ids
    log2phy = inputs.routing.log2phy
    if log2phy is not None:
        ids = log2phy[ids]
    local = local_rows_per_expert(ids, inputs.routing.mc2_mask if masked else None, num_experts)
    gathered = state.upstream.gather_from_sequence_parallel_region(
        local, group=dispatcher.ep_group)
    received = received_rows(gathered, num_experts, ep_size).tolist()
    _recorder(state).record(ascend_0_23.layer_name(layer), rank=int(dispatcher.ep_rank),
                            max_output_rows=limit, received=received)


def _recorder(state: Any) -> OverflowRecorder:
    if state.overflow is None:
        state.overflow = OverflowRecorder(state.ctx.stats, state.options.log_interval,
                                          state.ctx.flush, _series_maker(state.ctx))
    return state.overflow


def _series_maker(ctx: PatchContext) -> Callable[[str, int], Any] | None:
    from ascend_patch.core import metrics as process_metrics
    from ascend_patch.impls.moe.telemetry.metrics import overflow_series

    writer = process_metrics.writer()
    if writer is None:
        return None
    return lambda layer, rank: overflow_series(writer, ctx.patch_name, layer, rank)

