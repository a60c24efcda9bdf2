"""`moe.capacity` inside vllm-ascend 0.13.0 (vLLM 0.13), whose hook is each dispatcher's
`token_dispatch`.

Paths relative to vllm_ascend/ of 0.13.0: FM = ops/fused_moe/fused_moe.py, CM =
ops/fused_moe/moe_comm_method.py, TD = ops/fused_moe/token_dispatcher.py, AFC =
ascend_forward_context.py. The drop planning (drop step, capacity, counters, the count
all-gather over the EP group, the first-call config check) is ascend_0_23.py's; what differs
is where it is called and the all-to-all dispatcher's layout:

    AscendFusedMoE.forward_impl (FM:289)      <- make_forward_impl: which layer (taken over
                                                 once, as on 0.23.0.post1)
      quant method apply -> MoECommMethod.fused_experts(hidden_states, w1, w2, topk_weights,
      topk_ids, ..., log2phy, ...) (CM:96): keyword arguments, no MoEFusedExpertsInput
        topk_ids = log2phy[topk_ids] (CM:130-131)
        token_dispatcher.token_dispatch(hidden_states=, topk_weights=, topk_ids=, ...)
          (CM:134-145)                        <- make_token_dispatch on the all-to-all (TD:419)
                                                 and all-gather (TD:300) dispatchers: the drop
                                                 step on the physical ids, before the
                                                 dispatcher reads them; the dispatcher's class
                                                 is the step's path (MC2's, TD:184: counted)
          all-to-all: _preprocess (TD:536)    <- leaves num_out_tokens on the dispatcher
                                                 (TD:543): set to the rows sent
                      _dispatch_preprocess (TD:507, a 7-tuple) <- permuted rows = rows sent
                      _combine_postprocess(self, tokens, context_metadata: dict) (TD:616)
                                              <- zero rows for the unsent

Rows are marked as on 0.23.0.post1 (ascend_0_23.py): id E + 1 on the all-to-all path, which
its histc over [0, E] (TD:537-540) leaves out of every split and its permute out of the rows
sent; id -1 with weight 0 on the all-gather path, outside `active_expert_range` (TD:337-348),
and `expert_map[-1]` (TD:327) is a valid read.

Quantized MoE (Q = quantization/). A quantized layer's quant_method is the wrapper
AscendFusedMoEMethod (Q/quant_config.py:491), whose apply forwards to the scheme that
ASCEND_QUANTIZATION_METHOD_MAP (Q/utils.py:20) registers for "moe": W8A8_DYNAMIC
(Q/w8a8_dynamic.py:103, fused_experts :272), W8A8_MIX (Q/w8a8_pdmix.py:43, inherits that
apply), W4A8_DYNAMIC (Q/w4a8_dynamic.py:378), W4A16 (Q/w4a16.py:230). Each calls
MoECommMethod.fused_experts by keyword, hence the same token_dispatch with the same marks
(ascend_0_23._scheme_of admits them by name). The all-to-all dispatcher quantises only the
permuted rows, after _dispatch_preprocess, and sends the per-row scales in their own
all-to-all with the same (post-drop) splits (TD:443-450): a dropped row is neither quantised
nor sent, nor is its scale. W8A8_DYNAMIC and W4A8_DYNAMIC are contract-tested on CPU; W8A8_MIX
and W4A16 were read only.
A rank that receives zero rows would hand the quantized grouped matmuls an empty input, which
CANN does not document: make_unified_apply_mlp skips that call, as ascend_0_23.make_apply_mlp
does on 0.23.0.post1.

overflow: reroute (router_scores.py): MoECommMethod.prepare (CM:73) hands on the router
logits lined up with the routed rows (a 4-tuple here), and MoECommMethod.fused_experts (CM:96)
the log2phy it maps the ids with, which the quantized schemes pass and the unquantized method
does not (fused_moe.py:149-162): token_dispatch is told neither, so both are kept for the step.

`token_dispatch` reached outside a taken-over layer's forward passes through untouched. MC2
and FUSED_MC2 steps keep every row, as on 0.23.0.post1. The step's comm method is on vLLM's
forward context in 0.13.0 (AFC:57-62), not vllm-ascend's, so the path is told by the
dispatcher class instead (the comm method owns exactly one). 0.13.0 sends only w8a8_dynamic
models to FUSED_MC2 (AFC:258-275), whose fused_experts never reaches a dispatcher: with
drops, VLLM_ASCEND_ENABLE_FUSED_MC2=1 on A3 is refused when a W8A8_DYNAMIC layer is taken
over (ascend_0_23._fused_mc2_setting), never for the other layers (they never run it).

What 0.13.0's structure makes impossible:
  * No MoE LoRA check: 0.13.0 has no MoE LoRA path to keep whole (nothing to guarantee).
  * The all-to-all dispatcher is stateful: `num_out_tokens`, `hidden_shape` and
    `hidden_shape_before_permute` live on the one dispatcher object every layer of a comm
    method shares, between `token_dispatch` and `token_combine`. The drop is exact only while
    each layer's dispatch and combine are not interleaved with another layer's on the same
    dispatcher, which is also what vllm-ascend's own code needs (it is not ours to fix);
    the one guarantee this adds is that the rows-sent count is written in the same
    `_preprocess` call that computed it, so it never outlives its layer call.
  * Dynamic EPLB's load counters (FM:385-392) read the group list the MLP got: post-drop,
    as on 0.23.0.post1; routed-expert capture does not exist in 0.13.0.

Verified on CPU only (tests/ascend: vllm-ascend 0.13.0's own forward_impl, dispatchers and MLP
with emulated torch_npu ops, two gloo ranks); nothing here has run on an NPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import ascend_dispatch
from ascend_patch.impls.moe.adapters.ascend_0_23 import (
    ALL_GATHER,
    ALL_TO_ALL,
    MC2,
    AscendCapacityState,
    LayerCall,
    admitted,
    capturing,
    checked_tuple,
    count_zero_row_skip,
    cut_permuted_rows,
    drop_rows,
    keep_prepared_logits,
    layer_name,
    pad_combined_rows,
    state_of,
    wrap_forward_impl,
)

# TokenDispatcherWithAll2AllV._preprocess (TD:576-582) and _dispatch_preprocess (TD:526-534).
_PREPROCESS_LEN = 5
_DISPATCH_PREPROCESS_LEN = 7
# MoECommMethod.prepare's (hidden_states, router_logits, mc2_mask, context_metadata) (CM:73-85).
_PREPARE_LEN = 4


def make_forward_impl(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of AscendFusedMoE.forward_impl(self, hidden_states, router_logits,
    return_with_event=False) (FM:289): which layer runs. The step's comm method is on vLLM's
    forward context here, which a check of vllm-ascend's source alone cannot vouch for, so
    the path is read where it shows: the dispatcher that token_dispatch runs on."""
    return wrap_forward_impl(original, state_of(ctx), _layer_call)


def _layer_call(state: AscendCapacityState, layer: Any) -> LayerCall | None:
    name = layer_name(layer)
    if not admitted(state, name, layer):
        return None
    if capturing():
        state.keep_whole("graph capture")
        return None
    return LayerCall(name, layer, path="", dispatcher=None)


def make_token_dispatch(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of token_dispatch(self, hidden_states, topk_weights, topk_ids,
    expert_map=None, ...) of TokenDispatcherWithAll2AllV (TD:419), TokenDispatcherWithAllGather
    (TD:300) and TokenDispatcherWithMC2 (TD:184), the same signature on all three: the drop
    step on the first two, MC2 steps counted as kept whole."""
    state = state_of(ctx)

    def token_dispatch(
        self: Any,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        **kwargs: Any,
    ) -> Any:
        call = state.current
        if call is not None:
            path = _path_of(self, state.upstream)
            state.count("calls_by_path", path)
            if path == MC2:
                state.keep_whole(path)
            else:
                call = dataclasses.replace(call, path=path, dispatcher=self)
                topk_weights, topk_ids = drop_rows(state, call, topk_weights, topk_ids,
                                                   state.log2phy)
        return original(self, hidden_states, topk_weights, topk_ids, **kwargs)

    return token_dispatch


def make_prepare(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of MoECommMethod.prepare(self, hidden_states, router_logits,
    enable_shared_expert_dp=False, replace_allreduce=False, quant_type=...) (CM:73), which
    returns a 4-tuple here (ascend_0_23.keep_prepared_logits: why this site)."""
    return keep_prepared_logits(
        original, state_of(ctx),
        lambda out: checked_tuple(ctx, out, _PREPARE_LEN, "MoECommMethod.prepare")[1],
    )


def make_fused_experts(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of MoECommMethod.fused_experts(self, hidden_states, w1, w2, topk_weights,
    topk_ids, ..., log2phy=None, ...) (CM:96): it maps the ids through `log2phy` when given
    (CM:130-131), which the quantized schemes pass and the unquantized method does not
    (fused_moe.py:149-162), and token_dispatch is not told. overflow: reroute needs to know
    (the scores must be on the ids the dispatcher gets), so the map is kept for the drop
    step; every caller passes it by keyword."""
    state = state_of(ctx)
    reroute = state.rerouting

    def fused_experts(self: Any, *args: Any, **kwargs: Any) -> Any:
        if reroute and state.current is not None:
            state.log2phy = kwargs.get("log2phy")
        return original(self, *args, **kwargs)

    return fused_experts


def _path_of(dispatcher: Any, upstream: Any) -> str:
    if isinstance(dispatcher, upstream.TokenDispatcherWithAll2AllV):
        return ALL_TO_ALL
    if isinstance(dispatcher, upstream.TokenDispatcherWithAllGather):
        return ALL_GATHER
    return MC2


def make_all_to_all_preprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._preprocess(self, topk_ids), which returns
    (tokens per local expert, input splits, output splits, global tokens per local expert,
    local expert indices) and sets self.num_out_tokens = topk_ids.numel() (TD:543), which
    _dispatch_preprocess hands the permute (TD:520-524)."""

    def _preprocess(self: Any, topk_ids: torch.Tensor) -> tuple[Any, ...]:
        result = checked_tuple(ctx, original(self, topk_ids), _PREPROCESS_LEN, "_preprocess")
        sent = ascend_dispatch.rows_sent(result[1])
        if 0 < sent < self.num_out_tokens:
            self.num_out_tokens = sent
        return result

    return _preprocess


def make_all_to_all_dispatch_preprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._dispatch_preprocess(self, hidden_states,
    topk_ids): 0 rows sent leaves num_out_tokens at "all", so the rows are cut here."""
    return cut_permuted_rows(original, ctx, _DISPATCH_PREPROCESS_LEN)


def make_all_to_all_combine_postprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._combine_postprocess(self,
    permutated_local_input_tokens, context_metadata), whose metadata is a dict (TD:463-474)."""
    return pad_combined_rows(
        original, lambda metadata: metadata["reversed_local_input_permutation_mapping"]
    )


def make_unified_apply_mlp(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of unified_apply_mlp(hidden_states, w1, w2, group_list, w1_scale=None,
    w2_scale=None, ..., with_quant=False, fusion=False, ...) (moe_mlp.py:314) where
    moe_comm_method.py imports it (CM:28) and calls it by keyword (CM:147-164).

    A rank that received no row hands quant_apply_mlp a [0, H] input; CANN does not document
    empty input for the grouped matmuls it then calls (npu_grouped_matmul_swiglu_quant,
    quantized / antiquant npu_grouped_matmul). Such a call returns the [0, H] tensor the MLP
    would have returned instead: gmm2's output dtype is bf16 where scale biases are given
    outside the W4A16 branch, else w2_scale[0]'s (moe_mlp.py:102, 169, 196-205). The
    combine takes it as it takes an empty MLP output. Counted per quant type in
    stats["ascend"]["zero_row_mlp_skipped"]."""
    state = state_of(ctx)

    def unified_apply_mlp(*args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.get("hidden_states")
        if args or not kwargs.get("with_quant") or hidden is None or hidden.shape[0] != 0:
            return original(*args, **kwargs)
        like, quant_type = _zero_row_output(hidden, kwargs)
        count_zero_row_skip(state, quant_type)
        return like

    return unified_apply_mlp


def _zero_row_output(hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """with_quant = use_int8_w8a8 or use_int4_w4a8 or use_int4_w4a16 and fusion =
    use_int8_w8a8 (CM:160-162); W4A16 alone passes w1_offset (Q/w4a16.py:235)."""
    antiquant = kwargs.get("w1_offset") is not None
    if kwargs.get("w1_scale_bias") is not None and not antiquant:
        dtype = torch.bfloat16
    else:
        dtype = kwargs["w2_scale"][0].dtype
    quant_type = "W8A8" if kwargs.get("fusion") else "W4A16" if antiquant else "W4A8"
    return hidden.new_empty((0, hidden.shape[-1]), dtype=dtype), quant_type
