"""The torch custom ops of `moe.capacity`: the drop plan, the expert compute, and the
all-to-all kernel (dispatch -> experts -> combine).

vLLM lets torch.compile trace the MoE layer on CPU (there is no moe_forward custom op
there), and neither the planner (host syncs, collectives), the experts (data-dependent
shapes) nor the all-to-all (host-sized messages, collectives) is traceable: as custom ops
they are opaque to Dynamo, and their outputs have the shapes of their inputs, so the
compiled graph stays static. Ops are process-global, so they find the applied patch's state
(its layers, drop steps and kernels, by layer name) through `bind`, which the state calls
when it is made and undoes on revert.
"""

from __future__ import annotations

from typing import Any

import torch

from ascend_patch.core.session import SESSION
from ascend_patch.impls.moe.experts import select_backend

_NS = "ascend_patch"


class _Binding:
    """The one applied moe.capacity state of this process (one patch per target)."""

    def __init__(self) -> None:
        self.state: Any = None


_BINDING = _Binding()


def bind(state: Any) -> None:
    register()
    _BINDING.state = state
    # The patcher closes a patch's context on revert; a state made outside a patch has none.
    SESSION.on_revert("moe.custom_ops.binding", lambda: unbind(state))


def unbind(state: Any) -> None:
    if _BINDING.state is state:
        _BINDING.state = None


def _like_hidden(hidden_states: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def register() -> None:
    """Register the ops once per process: before any forward, never while Dynamo traces."""
    # name: (schema, implementation, fake). Each fake gives its outputs the shapes of inputs:
    # what keeps the compiled graph static. Looked up at call time, so that a lab hook that
    # replaced an implementation before the first registration is the one registered.
    ops = {
        "moe_capacity_plan": (
            "(Tensor topk_weights, Tensor topk_ids, str layer_name) -> (Tensor, Tensor)",
            _plan_impl,
            lambda topk_weights, topk_ids, layer_name: (
                torch.empty_like(topk_weights), torch.empty_like(topk_ids)),
        ),
        "moe_capacity_plan_scored": (
            "(Tensor topk_weights, Tensor topk_ids, Tensor router_scores, str layer_name) "
            "-> (Tensor, Tensor)",
            _plan_scored_impl,
            lambda topk_weights, topk_ids, router_scores, layer_name: (
                torch.empty_like(topk_weights), torch.empty_like(topk_ids)),
        ),
        "moe_capacity_experts": (
            "(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, "
            "Tensor topk_ids, Tensor? expert_map, str activation, str backend, "
            "bool weights_on_input) -> Tensor",
            experts_impl,
            _like_hidden,
        ),
        "moe_capacity_vllm_cpu_experts": (
            "(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, "
            "Tensor topk_ids, Tensor? expert_map, str layer_name, bool weights_on_input) "
            "-> Tensor",
            _vllm_cpu_experts_impl,
            _like_hidden,
        ),
        "moe_capacity_all_to_all": (
            "(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, "
            "Tensor topk_ids, Tensor? expert_map, str layer_name) -> Tensor",
            _all_to_all_impl,
            _like_hidden,
        ),
    }
    for name, (schema, implementation, fake) in ops.items():
        if not hasattr(torch.ops.ascend_patch, name):
            op = torch.library.custom_op(f"{_NS}::{name}", mutates_args=(), schema=schema)
            op(implementation).register_fake(fake)


def plan(topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str):
    return torch.ops.ascend_patch.moe_capacity_plan(topk_weights, topk_ids, layer_name)


def plan_scored(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                router_scores: torch.Tensor, layer_name: str):
    """`plan` with the router's scores of every expert [T, E] (overflow: reroute)."""
    return torch.ops.ascend_patch.moe_capacity_plan_scored(
        topk_weights, topk_ids, router_scores, layer_name)


def experts(*args: Any) -> torch.Tensor:
    return torch.ops.ascend_patch.moe_capacity_experts(*args)


def vllm_cpu_experts(*args: Any) -> torch.Tensor:
    return torch.ops.ascend_patch.moe_capacity_vllm_cpu_experts(*args)


def all_to_all(*args: Any) -> torch.Tensor:
    return torch.ops.ascend_patch.moe_capacity_all_to_all(*args)


def _bound(table: str, layer_name: str, what: str) -> Any:
    """The object the bound state keeps for `layer_name` in `table` (state.kernels, ...)."""
    state = _BINDING.state
    found = None if state is None else getattr(state, table).get(layer_name)
    if found is None:
        raise RuntimeError(f"moe.capacity: no {what} for MoE layer {layer_name!r}")
    return found


def _all_to_all_impl(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    layer_name: str,
) -> torch.Tensor:
    kernel = _bound("kernels", layer_name, "all-to-all kernel")
    return kernel.apply_eager(hidden_states, w1, w2, topk_weights, topk_ids, expert_map)


def _vllm_cpu_experts_impl(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    layer_name: str,
    weights_on_input: bool,
) -> torch.Tensor:
    """vLLM's CPU experts of the layer on its kept, local rows (adapters/vllm_cpu_experts.py)."""
    experts = _bound("cpu_experts", layer_name, "vLLM CPU experts")
    return experts.compute(hidden_states, w1, w2, topk_weights, topk_ids, expert_map,
                           weights_on_input)


def _plan_impl(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    state = _BINDING.state
    if state is None:
        raise RuntimeError(f"moe.capacity: no applied patch plans MoE layer {layer_name!r}")
    return state.step(layer_name)(topk_weights, topk_ids)


def _plan_scored_impl(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, router_scores: torch.Tensor,
    layer_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = _BINDING.state
    if state is None:
        raise RuntimeError(f"moe.capacity: no applied patch plans MoE layer {layer_name!r}")
    return state.step(layer_name)(topk_weights, topk_ids, router_scores)


def experts_impl(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    activation: str,
    backend: str,
    weights_on_input: bool,
) -> torch.Tensor:
    """Weighted, top-k-reduced expert output of the rows with id >= 0 whose expert is local
    (expert_map honoured); rows with id -1 (dropped, or unused slots) are not computed."""
    keep = topk_ids >= 0
    ids = topk_ids.clamp(min=0)  # -1 must not index expert_map from the end
    weights = topk_weights
    if weights_on_input:
        # The modular kernel's prepare() already scaled the input by the (top-1) weight.
        weights = keep.to(torch.float32)
    forward = select_backend(backend, hidden_states.device)
    return forward(
        hidden_states,
        w13,
        w2,
        weights,
        ids,
        keep,
        expert_map,
        activation=activation,
        apply_router_weight_on_input=False,
    )
