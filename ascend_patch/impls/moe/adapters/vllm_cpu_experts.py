"""`moe.capacity` on vLLM 0.32's CPU backend: vLLM's own CPU experts compute the kept rows.

vLLM 0.32 builds a CPU MoE layer's kernel from `CPUUnquantizedExperts` or its ISA variant
(`X86CPUUnquantizedExperts` isa "amx", Arm "neon", Power "vsx"; experts/cpu_moe.py), whose
`process_weights_after_loading` pads the intermediate size and prepacks w13/w2 in place
(`replace_parameter`), and whose `apply` runs the grouped-gemm kernel `cpu_fused_moe` on a
dense [T, k] routing of local ids. It cannot skip a row (an id -1 or a remote expert's id
reads out of bounds) and a row at weight 0 costs a full row.

For a taken-over CPU layer (backend `auto` or `vllm_cpu`) the kernel is built from a
subclass of the class vLLM chose: the prepack and every `_supports_*` stay vLLM's, and
`apply` hands vLLM's `apply` only the rows to compute (kept, expert local), as dense problems
grouped by rows per token (experts/vllm_cpu_kernel.py says how, and why the result is the
dropless kernel's with the dropped rows at weight 0, bit for bit). On this AVX2-only CPU
the kernel is several times faster than the torch backend's bf16 matmuls
(scripts/bench_vs_native.py). `backend: torch` keeps the standard-layout torch backend.

vLLM 0.23 has no CPU experts class: vllm_0_23_cpu_monolithic.py does the same with vLLM's
`CPUFusedMOE` prepack and 0.23's `cpu_fused_moe`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ascend_patch.impls.moe import custom_ops
from ascend_patch.impls.moe.experts import vllm_cpu_kernel
from ascend_patch.impls.moe.state import CapacityState

logger = logging.getLogger("ascend_patch.moe.capacity")

BACKEND = "vllm_cpu"


def vllm_cpu_experts_available(method: Any, upstream: Any) -> bool:
    """Whether vLLM built this layer for its CPU experts (the class it chose is ours to
    subclass)."""
    if "CPUUnquantizedExperts" not in upstream:
        return False
    if method.unquantized_backend != upstream.UnquantizedMoeBackend.CPU:
        return False
    chosen = getattr(method, "experts_cls", None)
    return isinstance(chosen, type) and issubclass(chosen, upstream.CPUUnquantizedExperts)


def experts_class_for(method: Any, state: CapacityState) -> type:
    """The experts class a taken-over layer's modular kernel is built from."""
    chosen = getattr(method, "experts_cls", None)
    if getattr(chosen, "ascend_patch_capacity", False):
        return chosen  # ours already (a second load of the same layer)
    backend = state.options.backend
    if backend in ("auto", BACKEND) and vllm_cpu_experts_available(method, state.upstream):
        return native_experts_class(state, chosen)
    if backend == BACKEND:
        raise state.error(
            "backend: vllm_cpu needs vLLM 0.32's CPU experts (CPUUnquantizedExperts) for the "
            f"layer; it got {getattr(chosen, '__name__', chosen)} on the "
            f"{getattr(method.unquantized_backend, 'value', method.unquantized_backend)} "
            "backend (use backend: auto or torch)")
    return state.experts_cls


def native_experts_class(state: CapacityState, vllm_cls: type) -> type:
    """The subclass of vLLM's CPU experts class `vllm_cls` that computes kept rows only."""
    made = state.cpu_experts_classes.get(vllm_cls)
    if made is None:
        custom_ops.register()
        made = state.cpu_experts_classes[vllm_cls] = _make_class(state, vllm_cls)
    return made


def apply_through_op(self: Any, output: torch.Tensor, hidden_states: torch.Tensor,
                     w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, activation: Any, global_num_experts: int,
                     expert_map: torch.Tensor | None, a1q_scale: torch.Tensor | None,
                     a2_scale: torch.Tensor | None, workspace13: torch.Tensor,
                     workspace2: torch.Tensor, expert_tokens_meta: Any,
                     apply_router_weight_on_input: bool) -> None:
    """The experts' `apply`: the layer's `compute` behind an opaque custom op (the
    compaction has data-dependent shapes, and vLLM lets Dynamo trace the MoE layer on CPU)."""
    output.copy_(custom_ops.vllm_cpu_experts(
        hidden_states, w1, w2, topk_weights, topk_ids, expert_map, self.ascend_patch_layer,
        bool(apply_router_weight_on_input)))


def _make_class(state: CapacityState, vllm_cls: type) -> type:
    class CapacityCPUExperts(vllm_cls):  # type: ignore[misc, valid-type]
        """vLLM's CPU experts on the rows that are kept and local only. Rows with id -1
        (dropped by make_apply) and rows of experts another EP rank owns are not computed;
        expert_map is honoured (vLLM's kernel ignores it)."""

        ascend_patch_backend = BACKEND
        ascend_patch_capacity = True
        ascend_patch_layer = ""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # vLLM's: pad the intermediate size, prepack w13/w2 in place (no second copy).
            super().process_weights_after_loading(layer)
            self.ascend_patch_layer = layer.layer_name
            state.cpu_experts[layer.layer_name] = self
            logger.info("moe.capacity: %s: vLLM's %s computes the kept rows",
                        layer.layer_name, vllm_cls.__name__)

        apply = apply_through_op

        def compute(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: torch.Tensor | None, weights_on_input: bool) -> torch.Tensor:
            """Eager: the weighted, top-k-reduced output of the kept, local rows."""
            activation = self.moe_config.activation
            no_workspace = hidden_states.new_empty(0)

            def kernel(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
                out = torch.empty_like(x)
                # vLLM's own apply: the kernel (or zentorch), its isa and its prepacked
                # weights; ids are local, expert_map is already applied.
                vllm_cls.apply(self, out, x, w1, w2, weights, ids, activation, w1.shape[0],
                               None, None, None, no_workspace, no_workspace, None,
                               weights_on_input)
                return out

            return vllm_cpu_kernel.moe_forward(kernel, hidden_states, topk_weights, topk_ids,
                                               expert_map=expert_map,
                                               num_local_experts=w1.shape[0])

    return CapacityCPUExperts


