"""vLLM 0.32 glue of `moe.capacity`: the two replacement factories of spec.py.

How one unquantized MoE forward runs once patched (file:line of vLLM 0.32 in
docs/vllm-moe-internals.md):

    MoERunner._apply_quant_method                       runner/moe_runner.py:598
      shared experts (NO_OVERLAP order)                 vLLM, unchanged
      router.select_experts -> topk_weights, topk_ids   vLLM, unchanged
      RoutedExperts.forward_modular
        UnquantizedFusedMoEMethod.apply   <- make_apply: plan_drops on this rank's rows,
                                             dropped row -> id -1, weight 0, then the original
          forward_native -> FusedMoEKernel.apply        modular_kernel.py:1424
            prepare (NoDPEP: nothing; DP: all-gather dispatch)     vLLM, unchanged
            experts.apply                 <- CapacityExperts: torch/npu backend, only kept
                                             rows of local experts (expert_map honoured)
            finalize (weight-and-reduce is a no-op; DP: reduce-scatter combine;
                      shared experts when the MK overlaps them)   vLLM, unchanged
    then the runner's routed_scaling_factor, shared + routed add, TP/EP all-reduce: vLLM

`make_process_weights_after_loading` puts CapacityExperts in place of the CPU (or Triton)
experts class before the modular kernel is built, so the CPU grouped-gemm prepack never
runs and w13/w2 keep vLLM's standard layout.

The planner and the expert compute run as the custom ops `ascend_patch::moe_capacity_plan`
and `ascend_patch::moe_capacity_experts`: on CPU vLLM lets torch.compile trace the MoE layer,
and neither is traceable (host syncs, data-dependent shapes, collectives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.backends import select_backend
from ascend_patch.impls.moe.capacity import plan_drops
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.stats import CapacityStats

logger = logging.getLogger("ascend_patch.moe.capacity")

# Attribute set on an UnquantizedFusedMoEMethod instance whose experts we own.
_TAKEN_OVER = "_ascend_patch_moe_capacity"

# vLLM calls our experts through this abstract method (modular_kernel.py:904); it is not a
# patch site, so the factories check it themselves and refuse a vLLM where it changed.
_EXPERTS_APPLY_SIGNATURE = (
    "(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, "
    "global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2, "
    "expert_tokens_meta, apply_router_weight_on_input)"
)

# Activations the backends compute (torch: silu, gelu; npu: silu).
_ACTIVATIONS = ("silu", "gelu")

# One CapacityStats per ctx.stats dict (the two sites may share one context or not).
_STATS: dict[int, CapacityStats] = {}


def _stats_for(ctx: PatchContext) -> CapacityStats:
    key = id(ctx.stats)
    stats = _STATS.get(key)
    if stats is None:
        options = _options(ctx)
        stats = _STATS[key] = CapacityStats(ctx.stats, options.log_interval, ctx.flush)
    return stats


def _options(ctx: PatchContext) -> CapacityOptions:
    options = ctx.options
    if not isinstance(options, CapacityOptions):
        options = CapacityOptions.model_validate(
            options.model_dump() if hasattr(options, "model_dump") else dict(options)
        )
    return options


def _check_experts_interface() -> None:
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    from ascend_patch.core.targets import render_signature

    live = render_signature(mk.FusedMoEExpertsModular.apply)
    if live != _EXPERTS_APPLY_SIGNATURE:
        raise RuntimeError(
            "moe.capacity: vLLM's FusedMoEExpertsModular.apply changed: expected "
            f"{_EXPERTS_APPLY_SIGNATURE}, found {live}"
        )


# --------------------------------------------------------------------------------------
# The experts: what runs inside vLLM's modular kernel in place of the CPU/Triton experts
# --------------------------------------------------------------------------------------


def _make_experts_class(backend_name: str) -> type:
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    class CapacityExperts(mk.FusedMoEExpertsModular):
        """Standard-format modular experts: weighted, top-k-reduced output like the CPU
        experts (finalize's weight-and-reduce is a no-op). Rows with id -1 (dropped by
        make_apply) and rows of experts another EP rank owns are not computed."""

        backend = backend_name

        @property
        def expects_unquantized_inputs(self) -> bool:
            return True

        @staticmethod
        def activation_format() -> mk.FusedMoEActivationFormat:
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device() -> bool:
            return True

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_quant_scheme(weight_key: Any, activation_key: Any) -> bool:
            return (weight_key, activation_key) == (None, None)

        @staticmethod
        def _supports_activation(activation: Any) -> bool:
            return getattr(activation, "value", activation) in _ACTIVATIONS

        @staticmethod
        def _supports_parallel_config(moe_parallel_config: Any) -> bool:
            return True

        @staticmethod
        def _supports_routing_method(
            routing_method: Any, weight_key: Any, activation_key: Any
        ) -> bool:
            return True

        @staticmethod
        def _supports_router_logits_dtype(router_logits_dtype: Any, routing_method: Any) -> bool:
            return True

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # No prepack, no padding: the backends read [E_local, 2I, H] / [E_local, H, I].
            pass

        def workspace_shapes(
            self,
            M: int,
            N: int,
            K: int,
            topk: int,
            global_num_experts: int,
            local_num_experts: int,
            expert_tokens_meta: Any,
            activation: Any,
        ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
            return (0,), (0,), (M, K)

        def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
            return TopKWeightAndReduceNoOP()

        def apply(
            self,
            output: torch.Tensor,
            hidden_states: torch.Tensor,
            w1: torch.Tensor,
            w2: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            activation: Any,
            global_num_experts: int,
            expert_map: torch.Tensor | None,
            a1q_scale: torch.Tensor | None,
            a2_scale: torch.Tensor | None,
            workspace13: torch.Tensor,
            workspace2: torch.Tensor,
            expert_tokens_meta: Any,
            apply_router_weight_on_input: bool,
        ) -> None:
            # An opaque custom op: on CPU vLLM lets Dynamo trace the MoE layer (no
            # moe_forward custom op there), and the backends are not traceable.
            out = _ops().experts(
                hidden_states,
                w1,
                w2,
                topk_weights,
                topk_ids,
                expert_map,
                str(getattr(activation, "value", activation)),
                self.backend,
                bool(apply_router_weight_on_input),
            )
            output.copy_(out)

    return CapacityExperts


def _not_supported_reason(method: Any, layer: Any) -> str | None:
    """Why this layer keeps vLLM's own experts (None: we can take it over)."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    moe = method.moe
    backend = getattr(method, "unquantized_backend", None)
    if backend not in (UnquantizedMoeBackend.CPU, UnquantizedMoeBackend.TRITON):
        name = getattr(backend, "value", backend)
        return f"backend {name} keeps its own weight layout (CPU and TRITON are supported)"
    if moe.moe_parallel_config.use_batched_activation_format:
        return "batched activation format (DeepEP LL / NIXL EP)"
    if moe.has_bias:
        return "experts with bias"
    if moe.is_lora_enabled:
        return "MoE LoRA"
    if not moe.is_act_and_mul:
        return "non-gated activation"
    activation = getattr(layer.activation, "value", layer.activation)
    if activation not in _ACTIVATIONS:
        return f"activation {activation}"
    if any(
        getattr(layer, name, None) is not None
        for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")
    ):
        return "clamped/scaled SwiGLU"
    return None


def make_process_weights_after_loading(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.process_weights_after_loading(self, layer)."""
    _check_experts_interface()
    options = _options(ctx)
    stats = _stats_for(ctx)
    experts_cls = _make_experts_class(options.backend)
    _ops()

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        name = getattr(layer, "layer_name", type(layer).__name__)
        if not isinstance(getattr(self, "experts_cls", None), type) or not issubclass(
            self.experts_cls, experts_cls
        ):
            reason = _not_supported_reason(self, layer)
            if reason is not None:
                setattr(self, _TAKEN_OVER, False)
                stats.layer_not_taken_over(name, reason)
                logger.warning("moe.capacity: %s keeps vLLM's experts: %s", name, reason)
                return original(self, layer)
            _check_divisible(layer, options)
            # _init_moe_kernel (called by the original) builds the modular kernel from
            # self.experts_cls: ours never prepacks, so the layout stays standard.
            self.experts_cls = experts_cls
        original(self, layer)
        setattr(self, _TAKEN_OVER, True)
        _LAYERS[name] = layer
        _PLANNERS.pop(name, None)  # a new model in this process: plan for the new layer
        stats.layer_taken_over(name)

    return process_weights_after_loading


def _check_divisible(layer: Any, options: CapacityOptions) -> None:
    ranks = options.simulate_ep_size or layer.moe_config.moe_parallel_config.ep_size
    if layer.global_num_experts % ranks:
        raise ValueError(
            f"moe.capacity: {layer.global_num_experts} experts of {layer.layer_name} cannot "
            f"be split over {ranks} (simulated) EP ranks"
        )


# --------------------------------------------------------------------------------------
# apply: plan the drops on vLLM's router output, then run the original
# --------------------------------------------------------------------------------------


def make_apply(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.apply(self, layer, x, topk_weights, topk_ids,
    shared_experts, shared_experts_input)."""
    _check_experts_interface()
    options = _options(ctx)
    stats = _stats_for(ctx)
    _ops()  # register the custom ops now: never while Dynamo traces a forward
    global _APPLY_STATE
    _APPLY_STATE = (options, stats)
    _PLANNERS.clear()  # planners capture the options

    def apply(
        self: Any,
        layer: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> Any:
        if not getattr(self, _TAKEN_OVER, False):
            return original(
                self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
            )
        # Opaque to Dynamo for the same reason as the experts (host syncs, collectives).
        topk_weights, topk_ids = _ops().plan(topk_weights, topk_ids, layer.layer_name)
        return original(
            self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
        )

    return apply


def _make_planner(
    layer: Any, options: CapacityOptions, stats: CapacityStats
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer body of the plan op: (topk_weights, topk_ids) -> the same with dropped
    rows as (weight from the plan, id -1). Fresh tensors (a custom op may not alias)."""
    parallel = layer.moe_config.moe_parallel_config
    gather, rank = _token_sources(parallel)
    num_experts = layer.global_num_experts
    ep_size = parallel.ep_size
    name = layer.layer_name

    def planner(
        topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = plan_drops(
            topk_weights,
            _linear_placement_ids(layer, topk_ids, ep_size, options),
            num_experts=num_experts,
            ep_size=ep_size,
            options=options,
            all_gather_counts=gather,
            rank=rank,
        )
        stats.record(name, plan)
        if not plan.dropped_rows:
            return topk_weights.clone(), topk_ids.clone()
        return plan.weights.to(topk_weights.dtype).clone(), topk_ids.masked_fill(~plan.keep, -1)

    return planner


# --------------------------------------------------------------------------------------
# Custom ops (registered once per process, on first use)
# --------------------------------------------------------------------------------------

# Taken-over layers by name (filled at load), their planners (built on the first call, in
# the op, outside any tracing) and the (options, stats) of the `apply` site of this process.
_LAYERS: dict[str, Any] = {}
_PLANNERS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {}
_APPLY_STATE: tuple[CapacityOptions, CapacityStats] | None = None


class _Ops:
    def __init__(self) -> None:
        ns = "ascend_patch"
        plan_name, experts_name = f"{ns}::moe_capacity_plan", f"{ns}::moe_capacity_experts"
        if not hasattr(torch.ops.ascend_patch, "moe_capacity_plan"):
            plan = torch.library.custom_op(
                plan_name,
                mutates_args=(),
                schema="(Tensor topk_weights, Tensor topk_ids, str layer_name) -> (Tensor, Tensor)",
            )(_plan_impl)
            plan.register_fake(
                lambda topk_weights, topk_ids, layer_name: (
                    torch.empty_like(topk_weights),
                    torch.empty_like(topk_ids),
                )
            )
        if not hasattr(torch.ops.ascend_patch, "moe_capacity_experts"):
            experts = torch.library.custom_op(
                experts_name,
                mutates_args=(),
                schema=(
                    "(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, "
                    "Tensor topk_ids, Tensor? expert_map, str activation, str backend, "
                    "bool weights_on_input) -> Tensor"
                ),
            )(_experts_impl)
            experts.register_fake(lambda hidden_states, *args: torch.empty_like(hidden_states))
        self.plan = torch.ops.ascend_patch.moe_capacity_plan
        self.experts = torch.ops.ascend_patch.moe_capacity_experts


_OPS: _Ops | None = None


def _ops() -> _Ops:
    global _OPS
    if _OPS is None:
        _OPS = _Ops()
    return _OPS


def _plan_impl(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    planner = _PLANNERS.get(layer_name)
    if planner is None:
        if _APPLY_STATE is None or layer_name not in _LAYERS:
            raise RuntimeError(f"moe.capacity: no drop planner for MoE layer {layer_name!r}")
        options, stats = _APPLY_STATE
        planner = _PLANNERS[layer_name] = _make_planner(_LAYERS[layer_name], options, stats)
    return planner(topk_weights, topk_ids)


def _experts_impl(
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


def _token_sources(parallel: Any) -> tuple[Any, int]:
    """(all_gather_counts, rank) for plan_drops.

    The ranks of an EP group hold the same tokens unless DP > 1 (TP-only EP: every TP rank
    has the whole batch; DP + TP + EP: the TP ranks of one DP rank share its batch), so the
    token sources are the DP ranks: counts are all-gathered over the DP group. Sequence
    parallel MoE (tokens split over TP too) is not modelled: its counts would be partial.
    """
    if parallel.dp_size <= 1:
        return None, 0
    from vllm.distributed import get_dp_group

    group = get_dp_group()

    def all_gather_counts(counts: torch.Tensor) -> torch.Tensor:
        return group.all_gather(counts.unsqueeze(0).contiguous(), dim=0)

    return all_gather_counts, group.rank_in_group


def _linear_placement_ids(
    layer: Any, topk_ids: torch.Tensor, ep_size: int, options: CapacityOptions
) -> torch.Tensor:
    """plan_drops bins expert e on rank e // (E / R) (linear placement). With vLLM's
    round_robin placement (expert e on rank e % R) renumber so the bins are the real ranks."""
    if options.simulate_ep_size or ep_size <= 1:
        return topk_ids
    if getattr(layer, "expert_placement_strategy", "linear") != "round_robin":
        return topk_ids
    per_rank = layer.global_num_experts // ep_size
    return (topk_ids % ep_size) * per_rank + torch.div(topk_ids, ep_size, rounding_mode="floor")
