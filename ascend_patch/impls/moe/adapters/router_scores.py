"""How `overflow: reroute` gets the router's scores of every expert into the drop step.

The step of the other adapters sees (topk_weights, topk_ids) only; a rerouted row needs the
token's score for every expert (planner/reroute.py). Per line:

* vLLM 0.32 (modular kernel): MoERunner._apply_quant_method (runner/moe_runner.py:598)
  holds router_logits and calls router.select_experts(hidden_states, router_logits) (one
  FusedMoERouter per layer), then the method's apply with the top-k only. We patch
  FusedMoERouter.select_experts (router/fused_moe_router.py:48): on the router of a layer we
  took over (tagged at load from the compilation config's static_forward_context, where the
  runner registers itself under the layer's name, moe_runner.py:59) it runs the drop step
  itself, with the scores, and the apply then does not plan again. Without `reroute` the
  replacement only calls vLLM's (the patcher needs a function of its own to mark).
* vLLM 0.23 CPU (vllm_0_23_cpu_monolithic.py): apply_monolithic receives router_logits and
  routes by itself: the scores are computed there. The other 0.23 backends reach `apply`
  with the top-k only: refused at load.
* vllm-ascend 0.23.0.post1, 0.18.0, 0.13.0 (ascend_0_23.py, ascend_token_dispatch.py): the
  logits forward_impl receives are the layer's input tokens, not the rows its dispatch hook
  plans (the all-to-all path routes a TP slice, the all-gather path the DP/EP-gathered
  tokens). MoECommMethod.prepare hands on the logits lined up with them, which every
  quantized and unquantized apply routes: the adapter keeps them there, scores them at the
  dispatch hook and moves the scores to the physical ids through the log2phy the ids went
  through (ascend_dispatch.physical_scores: an EPLB replica log2phy does not pick is never a
  target). softmax and sigmoid routers only (sqrtsoftplus layers are refused at load).
* vLLM 0.33 / 0.34: not wired (state.py refuses at load).

The score is the router's scoring function (softmax or sigmoid) of the logits, without
e_score_correction_bias (which biases the choice only, not the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe import custom_ops
from ascend_patch.impls.moe.planner.reroute import scores_from_logits
from ascend_patch.impls.moe.state import CapacityState

# (layer name, scoring function) on the FusedMoERouter of a layer we took over.
ROUTER_TAG = "_ascend_patch_moe_capacity_scores"


def make_select_experts(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of FusedMoERouter.select_experts(self, hidden_states, router_logits,
    topk_indices_dtype=None, *, input_ids=None) (vLLM 0.32)."""
    state = ctx.state(CapacityState)
    reroute = state.rerouting
    if reroute:
        state.route_scores = lambda name, layer: tag_router(state, name, layer)

    def select_experts(self: Any, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                       topk_indices_dtype: Any = None, *, input_ids: Any = None) -> Any:
        topk_weights, topk_ids = original(self, hidden_states, router_logits,
                                          topk_indices_dtype, input_ids=input_ids)
        tag = getattr(self, ROUTER_TAG, None) if reroute else None
        if tag is None:
            return topk_weights, topk_ids
        layer_name, scoring_func = tag
        return custom_ops.plan_scored(topk_weights, topk_ids,
                                      scores_from_logits(router_logits, scoring_func), layer_name)

    return select_experts


def tag_router(state: CapacityState, layer_name: str, layer: Any) -> None:
    """At load, for a layer taken over: its runner's router plans with the scores."""
    config = state.upstream.get_current_vllm_config_or_none()
    context = getattr(getattr(config, "compilation_config", None), "static_forward_context", {})
    router = getattr(context.get(layer_name), "router", None)
    if router is None:
        raise state.error(
            f"overflow: reroute: no router found for MoE layer {layer_name!r} in vLLM's "
            f"forward context, so its scores cannot reach the drop step; use overflow: drop"
        )
    setattr(router, ROUTER_TAG, (layer_name, layer.scoring_func))
