"""`moe.capacity` on vLLM 0.23's CPU backend, which has no modular kernel.

On 0.23 `select_unquantized_moe_backend` gives the CPU backend no experts class
(oracle/unquantized.py:161-163), `is_monolithic` is True for it (unquantized_fused_moe_method.py
:59-64), `process_weights_after_loading` prepacks the weights into `CPUFusedMOE` (:224-255) and
the runner calls `apply_monolithic(layer, x, router_logits)` (runner/moe_runner.py:516), where
`CPUFusedMOE` routes by itself (cpu_fused_moe.py:262) and ignores `expert_map` (:276-284: TP
or DP with expert parallel computes the wrong experts, or crashes).

So for a CPU layer we take over:
* `process_weights_after_loading` does not run the original and builds a modular kernel with
  vLLM's own `make_unquantized_moe_kernel`, as the Triton backend would. With `backend: auto`
  where vLLM would run its grouped gemm, vLLM's `CPUFusedMOE(layer)` prepacks the weights in
  place and picks the isa, and the kernel's experts hand 0.23's `cpu_fused_moe` only the kept
  rows (vllm_cpu_experts.py); otherwise (and with `backend: torch`) no prepack: the weights
  keep vLLM's standard layout and our CapacityExperts compute with the torch backend. A
  kernel makes `supports_internal_mk` true, so the runner no longer all-gathers tokens
  itself (moe_runner.py:683-686): the kernel's prepare/finalize dispatches, as on 0.32, and
  `dispatch: all_to_all` can replace it. 0.23 kernels take their buffers from the workspace
  manager (modular_kernel.py:1085), which only the GPU/XPU workers set up: it is set up here.
* `apply_monolithic` routes with the CPU backend's own `select_experts` (the same function
  and arguments as the original, so r = 0 routes exactly like stock), runs the drop step and
  calls the kernel. The runner keeps shared experts, the routed scaling and the all-reduce.
  With `overflow: reroute` the step also gets the router's scores of every expert
  (`scores_from_logits`: the layer's scoring function on the router logits this method receives,
  before top-k and without e_score_correction_bias, which only biases the choice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe import custom_ops
from ascend_patch.impls.moe.adapters.vllm_cpu_experts import BACKEND, apply_through_op
from ascend_patch.impls.moe.experts import vllm_cpu_kernel
from ascend_patch.impls.moe.state import CapacityState
from ascend_patch.impls.moe.planner.reroute import scores_from_logits
from ascend_patch.impls.moe.adapters.vllm_modular import (
    process_weights_factory,
    state_of,
    taken_over,
)


def make_process_weights_after_loading(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.process_weights_after_loading (0.23)."""
    upstream = ctx.upstream

    state = state_of(ctx)
    state.route_scores = lambda name, layer: _scores_on_cpu_only(state, name, layer)

    def build_kernel(method: Any, layer: Any, experts_cls: type) -> bool:
        if method.unquantized_backend != upstream.UnquantizedMoeBackend.CPU:
            return False  # Triton: the original builds the kernel from experts_cls
        isa = (grouped_gemm_isa_0_23(layer, upstream)
               if state.options.backend in ("auto", BACKEND) else None)
        if isa is None:
            if state.options.backend == BACKEND:
                raise state.error(
                    f"backend: vllm_cpu: vLLM 0.23 runs no grouped-gemm kernel for MoE layer "
                    f"{layer.layer_name!r} (dimensions not multiples of 32, or AMX without "
                    "bf16); use backend: auto or torch")
            return _build_cpu_kernel(method, layer, experts_cls, upstream)
        # vLLM's own prepack, in place, at vLLM's isa; then the kernel, with experts that
        # hand 0.23's cpu_fused_moe only the kept rows.
        cpu_moe = upstream.CPUFusedMOE(layer)
        _build_cpu_kernel(method, layer, experts_class_0_23(state), upstream)
        attach_0_23(method.moe_kernel.fused_experts, layer, cpu_moe, state)
        return True

    return process_weights_factory(original, state, build_kernel=build_kernel)


def _scores_on_cpu_only(state: Any, name: str, layer: Any) -> None:
    """overflow: reroute: only the CPU backend's apply_monolithic sees the router logits."""
    backend = layer.quant_method.unquantized_backend
    if backend != state.upstream.UnquantizedMoeBackend.CPU:
        raise state.error(
            f"overflow: reroute: MoE layer {name!r} runs vLLM 0.23's {backend.name} backend, "
            f"whose apply gets the top-k only (no router scores); only the CPU backend "
            f"reroutes: use overflow: drop")


def _build_cpu_kernel(method: Any, layer: Any, experts_cls: type, upstream: Any) -> bool:
    # apply_monolithic runs under torch.compile on CPU, which cannot trace the import a
    # first read does: read the router here, where vLLM itself imports its CPU MoE module.
    upstream.select_experts
    if not upstream.is_workspace_manager_initialized():
        upstream.init_workspace_manager(torch.device("cpu"))
    method.experts_cls = experts_cls
    method.moe_quant_config = method.get_fused_moe_quant_config(layer)
    method.moe_kernel = upstream.make_unquantized_moe_kernel(
        quant_config=method.moe_quant_config,
        moe_config=method.moe,
        backend=method.unquantized_backend,
        experts_cls=experts_cls,
        routing_tables=layer._expert_routing_tables(),
    )
    return True


def make_apply_monolithic(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.apply_monolithic(self, layer, x,
    router_logits, input_ids=None) (0.23): the CPU backend's entry point."""
    reroute = state_of(ctx).rerouting
    upstream = ctx.upstream

    def apply_monolithic(
        self: Any,
        layer: Any,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not taken_over(self):
            return original(self, layer, x, router_logits, input_ids)
        topk_weights, topk_ids = upstream.select_experts(
            hidden_states=x,
            router_logits=router_logits,
            top_k=layer.top_k,
            use_grouped_topk=layer.use_grouped_topk,
            renormalize=layer.renormalize,
            topk_group=layer.topk_group,
            num_expert_group=layer.num_expert_group,
            custom_routing_function=layer.custom_routing_function,
            scoring_func=layer.scoring_func,
            routed_scaling_factor=layer.routed_scaling_factor,
            e_score_correction_bias=layer.e_score_correction_bias,
        )
        if reroute:
            topk_weights, topk_ids = custom_ops.plan_scored(
                topk_weights, topk_ids, scores_from_logits(router_logits, layer.scoring_func),
                layer.layer_name)
        else:
            topk_weights, topk_ids = custom_ops.plan(topk_weights, topk_ids, layer.layer_name)
        return self.moe_kernel.apply(
            hidden_states=x,
            w1=layer.w13_weight,
            w2=layer.w2_weight,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            activation=layer.activation,
            global_num_experts=layer.global_num_experts,
            expert_map=layer.expert_map,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
        )

    return apply_monolithic


# --------------------------------------------------------------------------------------
# vLLM's own CPU kernel on the kept rows (vllm_cpu_experts.py says why, for 0.32)
# --------------------------------------------------------------------------------------


def grouped_gemm_isa_0_23(layer: Any, upstream: Any) -> str | None:
    """The isa vLLM 0.23's CPU backend would run its grouped-gemm kernel at for this layer
    (CPUFusedMOE.check_grouped_gemm, which reads only the layer), None where it would not
    (then CPUFusedMOE falls back to per-expert linears and may drop the weights)."""
    if "CPUFusedMOE" not in upstream:
        return None
    # Importing vllm._custom_ops loads the extension whose ops the check looks for.
    upstream.cpu_fused_moe
    grouped, isa = upstream.CPUFusedMOE.check_grouped_gemm(None, layer)
    return isa if grouped else None


def experts_class_0_23(state: CapacityState) -> type:
    """CapacityExperts computing with 0.23's `cpu_fused_moe` on the kept rows (the layer's
    weights prepacked by vLLM's CPUFusedMOE; `attach_0_23` gives each object its layer)."""
    made = state.cpu_experts_classes.get(state.experts_cls)
    if made is None:
        custom_ops.register()
        made = state.cpu_experts_classes[state.experts_cls] = _make_class_0_23(state)
    return made


def attach_0_23(experts: Any, layer: Any, cpu_moe: Any, state: CapacityState) -> None:
    """Give the layer's experts object what its compute needs: the layer's name, activation
    and vLLM's isa (`CPUFusedMOE`, which prepacked the weights in place)."""
    experts.ascend_patch_layer = layer.layer_name
    experts.ascend_patch_activation = str(getattr(layer.activation, "value", layer.activation))
    experts.ascend_patch_isa = cpu_moe.isa
    state.cpu_experts[layer.layer_name] = experts


def _make_class_0_23(state: CapacityState) -> type:
    upstream = state.upstream

    class CapacityCPUExperts023(state.experts_cls):  # type: ignore[misc, name-defined]
        """0.23's CPU kernel on the rows that are kept and local only (expert_map honoured)."""

        ascend_patch_backend = BACKEND
        ascend_patch_layer = ""
        ascend_patch_activation = "silu"
        ascend_patch_isa = "vec"

        apply = apply_through_op

        def compute(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: torch.Tensor | None, weights_on_input: bool) -> torch.Tensor:
            def kernel(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
                # 0.23's wrapper allocates and returns the output; with weights on the input
                # the modular kernel's prepare already scaled it (skip_weighted).
                return upstream.cpu_fused_moe(x, w1, w2, None, None, weights, ids,
                                              self.ascend_patch_activation,
                                              self.ascend_patch_isa, weights_on_input)

            return vllm_cpu_kernel.moe_forward(kernel, hidden_states, topk_weights, topk_ids,
                                               expert_map=expert_map,
                                               num_local_experts=w1.shape[0])

    return CapacityCPUExperts023
