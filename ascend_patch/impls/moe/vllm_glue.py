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
            prepare (NoDPEP: nothing; DP: all-gather dispatch)     vLLM, unchanged, or
                                          <- dispatch all_to_all: kept rows to their owner
            experts.apply                 <- CapacityExperts: torch/npu backend, only kept
                                             rows of local experts (expert_map honoured)
            finalize (weight-and-reduce is a no-op; DP: reduce-scatter combine, or
                      <- all_to_all: results back to the source rank, summed per token;
                      shared experts when the MK overlaps them)   vLLM, unchanged
    then the runner's routed_scaling_factor, shared + routed add, TP/EP all-reduce: vLLM

`make_process_weights_after_loading` puts CapacityExperts in place of the CPU (or Triton)
experts class before the modular kernel is built, so the CPU grouped-gemm prepack never
runs and w13/w2 keep vLLM's standard layout. With `dispatch: all_to_all` (or `auto` under
DP > 1 + EP) it then rebuilds the layer's kernel with the all-to-all prepare/finalize of
all_to_all_dispatch.py, so prepare sends only the kept rows to their experts' ranks and
finalize returns them (instead of vLLM's all-gather dispatch / reduce-scatter combine).
The first plan call of a process compares the config digest and options over the EP group.

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
    from ascend_patch.impls.moe.all_to_all_dispatch import check_prepare_finalize_interface

    check_prepare_finalize_interface()
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
        _install_dispatch(self, layer, options, stats)

    return process_weights_after_loading


# --------------------------------------------------------------------------------------
# dispatch: all_to_all replaces the modular kernel's prepare/finalize for our layers
# --------------------------------------------------------------------------------------


def _dispatch_plan(layer: Any, options: CapacityOptions) -> tuple[str, str]:
    """("all_to_all" | "allgather", why). Raises for an explicit all_to_all that cannot run."""
    from ascend_patch.impls.moe.all_to_all_dispatch import expert_owners

    parallel = layer.moe_config.moe_parallel_config
    if options.dispatch == "allgather":
        return "allgather", "dispatch: allgather"
    if not parallel.use_ep or parallel.ep_size <= 1:
        # One EP rank holds every expert: there is nothing to send anywhere.
        return "allgather", "no expert parallelism (vLLM's path)"
    if options.dispatch == "auto" and parallel.dp_size <= 1:
        return "allgather", "auto: DP = 1 (every EP rank holds the same tokens; vLLM's path)"
    blockers = []
    if parallel.pcp_size > 1:
        blockers.append("prefill context parallel (tokens split over PCP are not modelled)")
    if parallel.is_sequence_parallel:
        blockers.append("sequence-parallel MoE (tokens split over TP are not modelled)")
    if parallel.enable_eplb:
        blockers.append("EPLB (redundant physical experts)")
    if not _eager():
        blockers.append(
            "torch.compile (prepare/finalize hold collectives with data-dependent shapes: "
            "use enforce_eager)"
        )
    expert_map = layer.expert_map
    if expert_map is not None and not blockers:
        placement = getattr(layer, "expert_placement_strategy", "linear")
        owners = expert_owners(layer.global_num_experts, parallel.ep_size, placement)
        mine = (expert_map.to("cpu") >= 0)
        if not torch.equal(mine, owners == parallel.ep_rank):
            blockers.append(f"expert_map does not match the {placement} placement")
    if blockers:
        if options.dispatch == "all_to_all":
            raise ValueError(
                f"moe.capacity: dispatch: all_to_all cannot run for {layer.layer_name}: "
                + "; ".join(blockers) + " (use dispatch: auto or allgather)"
            )
        return "allgather", "auto: " + "; ".join(blockers)
    return "all_to_all", f"{options.dispatch}: DP={parallel.dp_size}, EP={parallel.ep_size}"


def _eager() -> bool:
    try:
        from vllm.config import CompilationMode
        from vllm.config.vllm import get_current_vllm_config_or_none
    except ImportError:  # pragma: no cover - other vLLM layouts are refused by the spec
        return True
    config = get_current_vllm_config_or_none()
    if config is None:
        return True
    return config.compilation_config.mode == CompilationMode.NONE


def _install_dispatch(method: Any, layer: Any, options: CapacityOptions, stats: CapacityStats) -> None:
    """Rebuild the layer's modular kernel with the all-to-all prepare/finalize when the
    `dispatch` option asks for it; record the choice in the stats either way."""
    path, why = _dispatch_plan(layer, options)
    stats.dispatch_path(layer.layer_name, path, why)
    if path != "all_to_all":
        return
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.distributed import get_ep_group

    from ascend_patch.impls.moe.all_to_all_dispatch import (
        expert_owners,
        make_prepare_finalize_class,
    )

    parallel = layer.moe_config.moe_parallel_config
    # The ranks of one DP rank (its TP ranks) hold the same tokens: they split them.
    num_sharers = parallel.ep_size // (parallel.dp_size * parallel.pcp_size)
    sharer = parallel.ep_rank - parallel.dp_rank * num_sharers
    placement = getattr(layer, "expert_placement_strategy", "linear")
    prepare_finalize = make_prepare_finalize_class()(
        group_fn=get_ep_group,
        owners=expert_owners(layer.global_num_experts, parallel.ep_size, placement),
        ep_size=parallel.ep_size,
        sharer=sharer,
        num_sharers=num_sharers,
        counters=stats.dispatch_counters(),
        on_call=stats.dispatch_recorded,
    )
    # Same experts object (CapacityExperts, built by the original from self.experts_cls),
    # new prepare/finalize. Nothing else holds the old kernel: the runner reads
    # moe_kernel through the method on every forward (fused_moe_method_base.py:35-47).
    method.moe_kernel = mk.FusedMoEKernel(prepare_finalize, method.moe_kernel.fused_experts)


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
    global _APPLY_STATE, _CONFIG_CHECKED
    _APPLY_STATE = (options, stats)
    _PLANNERS.clear()  # planners capture the options
    _CONFIG_CHECKED = False

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
        if not _CONFIG_CHECKED:
            _check_config_across_ranks(_LAYERS[layer_name], options, stats)
        planner = _PLANNERS[layer_name] = _make_planner(_LAYERS[layer_name], options, stats)
    return planner(topk_weights, topk_ids)


# Set once this process has compared its config with the rest of its EP group.
_CONFIG_CHECKED = False


def _check_config_across_ranks(layer: Any, options: CapacityOptions, stats: CapacityStats) -> None:
    """At the first MoE call of this process, compare config digest + options over the EP
    group. Every rank reaches this point in the same collective order: the first MoE layer's
    first forward (under DP idle ranks run dummy batches through every MoE layer), before
    any other MoE collective of that call. A mismatch raises ConfigMismatchError on every
    rank; without the check a rank with another drop ratio would plan different capacities
    (silently wrong outputs) or send rows its peers do not expect (a hang)."""
    global _CONFIG_CHECKED
    _CONFIG_CHECKED = True
    if layer.moe_config.moe_parallel_config.ep_size <= 1:
        return
    from vllm.distributed import get_ep_group

    group = get_ep_group()
    check_config_over_group(options, group)
    stats.config_checked(group.world_size)


def check_config_over_group(options: CapacityOptions, group: Any, digest: str | None = None) -> None:
    """check_same_config with this process's config digest and the patch's options."""
    import os

    from ascend_patch.core.runtime import DIGEST_ENV
    from ascend_patch.impls.distributed.consistency import check_same_config

    if digest is None:
        digest = os.environ.get(DIGEST_ENV, "")
    check_same_config(digest, options.model_dump(mode="json"), group)


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
