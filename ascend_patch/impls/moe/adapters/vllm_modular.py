"""`moe.capacity` in vLLM's modular MoE kernel: the adapter both vLLM lines share.

vLLM 0.23 and 0.32 build unquantized MoE the same way where it matters here (the interfaces
below are declared in spec.py and checked by the loader): the method's `apply(layer, x,
topk_weights, topk_ids, ...)` runs after the router, and the modular kernel
(`FusedMoEKernel(prepare_finalize, experts)`) dispatches, computes and combines. How one
forward runs once patched (0.32 file:line in docs/explanation/vllm-moe-internals.md):

    MoERunner._apply_quant_method                       runner/moe_runner.py:598
      shared experts (NO_OVERLAP order)                 vLLM, unchanged
      router.select_experts -> topk_weights, topk_ids   vLLM, unchanged
        UnquantizedFusedMoEMethod.apply   <- make_apply: the drop step (drop_step.py) on this
                                             rank's rows, dropped row -> id -1, then the original
          forward_native -> FusedMoEKernel.apply        modular_kernel.py:1424
            prepare (NoDPEP: nothing; DP: all-gather dispatch)     vLLM, unchanged, or
                                          <- dispatch all_to_all: kept rows to their owner
            experts.apply                 <- CapacityExperts: torch/npu backend, only kept
                                             rows of local experts (expert_map honoured)
            finalize (weight-and-reduce is a no-op; DP: reduce-scatter combine, or
                      <- all_to_all: results back to the source rank, summed per token)
    then the runner's routed_scaling_factor, shared + routed add, TP/EP all-reduce: vLLM

`make_process_weights_after_loading` puts CapacityExperts in place of 0.32's modular CPU
experts class before the modular kernel is built, so weights keep vLLM's standard layout.
On CUDA vLLM's Triton experts stay: `apply` hands them the dropped rows as an expert they
skip (triton_route.py), or the layer is refused where no path skips them. vLLM 0.23's CPU
backend has no modular kernel at all (a monolithic kernel that routes by itself):
vllm_0_23_cpu_monolithic.py builds one for it and routes in `apply_monolithic`, then the rest
is this module's. With `dispatch: all_to_all` (or `auto` under DP > 1 + EP)
the layer's kernel is rebuilt with the all-to-all prepare/finalize of transport/all_to_all_dispatch.py.
The first drop step of a process compares the config digest and options over the EP group.
The drop plan and the expert compute run as custom ops (custom_ops.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe import custom_ops
from ascend_patch.impls.moe.adapters.triton_route import triton_route
from ascend_patch.impls.moe.adapters.vllm_cpu_experts import experts_class_for
from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.state import CapacityState

logger = logging.getLogger("ascend_patch.moe.capacity")

# Attribute set on each UnquantizedFusedMoEMethod instance: EXPERTS (our experts compute
# only kept rows), TRITON (vLLM's Triton experts stay and skip the dropped rows:
# triton_route.py) or False (untouched).
TAKEN_OVER = "_ascend_patch_moe_capacity"
EXPERTS = "experts"
TRITON = "triton"
# The TritonRoute of a TRITON layer, on its method instance.
ROUTE = "_ascend_patch_moe_triton_route"

# Activations the backends compute (torch: silu, gelu; npu: silu).
_ACTIVATIONS = ("silu", "gelu")


def taken_over(method: Any) -> bool:
    return bool(getattr(method, TAKEN_OVER, False))


def state_of(ctx: PatchContext) -> CapacityState:
    """The patch's state, with this adapter's drop-step maker."""
    state = ctx.state(CapacityState)
    if state.make_step is None:
        state.make_step = make_step
        state.experts_cls = _make_experts_class(state.options.backend, state.upstream)
    return state


# --------------------------------------------------------------------------------------
# The experts: what runs inside vLLM's modular kernel in place of the CPU/Triton experts
# --------------------------------------------------------------------------------------


def _make_experts_class(backend_name: str, upstream: Any) -> type:
    standard = upstream.FusedMoEActivationFormat.Standard
    no_op_reduce = upstream.TopKWeightAndReduceNoOP

    class CapacityExperts(upstream.FusedMoEExpertsModular):
        """Standard-format modular experts: weighted, top-k-reduced output like the CPU
        experts (finalize's weight-and-reduce is a no-op). Rows with id -1 (dropped by
        make_apply) and rows of experts another EP rank owns are not computed."""

        ascend_patch_backend = backend_name
        # Marks our class (a second load of the same layer finds it in method.experts_cls).
        ascend_patch_capacity = True

        @property
        def expects_unquantized_inputs(self) -> bool:
            return True

        @staticmethod
        def activation_format() -> Any:
            return standard

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

        def finalize_weight_and_reduce_impl(self) -> Any:
            return no_op_reduce()

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
            out = custom_ops.experts(
                hidden_states,
                w1,
                w2,
                topk_weights,
                topk_ids,
                expert_map,
                str(getattr(activation, "value", activation)),
                self.ascend_patch_backend,
                bool(apply_router_weight_on_input),
            )
            output.copy_(out)

    return CapacityExperts


def _not_supported_reason(method: Any, layer: Any, upstream: Any) -> str | None:
    """Why this layer keeps vLLM's own experts (None: we can take it over)."""
    backends = upstream.UnquantizedMoeBackend
    if getattr(getattr(method, "experts_cls", None), "ascend_patch_capacity", False):
        return None  # ours already (a second load of the same layer)
    moe = method.moe
    backend = getattr(method, "unquantized_backend", None)
    if backend not in (backends.CPU, backends.TRITON):
        name = getattr(backend, "value", backend)
        return f"backend {name} keeps its own weight layout (CPU and TRITON are supported)"
    unhandled = _unhandled_format(method, layer, upstream)
    if unhandled is not None:
        return unhandled
    if moe.has_bias:
        return "experts with bias"
    if getattr(moe, "is_lora_enabled", False):
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


def _unhandled_format(method: Any, layer: Any, upstream: Any) -> str | None:
    """Why the layer's activation format or expert layout is not ours to take over. Each
    line exposes the format its own way: the catalog declares which (impls/moe/spec.py)."""
    moe = method.moe
    if "activation_format" in upstream:
        # 0.34: FusedMoEConfig.activation_format; PaddedStandard is DeepEP v2's format, which
        # vLLM's kernel builder refuses for Standard experts (oracle/base.py:277).
        fmt = moe.activation_format
        if fmt != upstream.FusedMoEActivationFormat.Standard:
            # Member names (the values are 1-tuples: ("padded_standard",)).
            return (f"activation format {getattr(fmt, 'name', fmt)} (our experts take "
                    "Standard only: DeepEP LL / NIXL EP / batched_triton are batched, "
                    "DeepEP v2 is padded_standard)")
    elif moe.moe_parallel_config.use_batched_activation_format:
        return "batched activation format (DeepEP LL / NIXL EP)"
    if "SubstitutedRoutedExperts" in upstream and isinstance(
            layer, upstream.SubstitutedRoutedExperts):
        # MoNE rewrites substituted routes to expert 0 with weight 0 before apply
        # (expert_substitution.py:232-262): the planner would count them as load on expert 0.
        return "MoNE expert substitution (substituted routes would count as load on expert 0)"
    return None


def make_process_weights_after_loading(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.process_weights_after_loading(self, layer)."""
    state = state_of(ctx)
    return process_weights_factory(original, state, build_kernel=None)


def process_weights_factory(
    original: Callable[..., Any],
    state: CapacityState,
    build_kernel: Callable[[Any, Any, type], bool] | None,
) -> Callable[..., Any]:
    """The replacement, given how a line builds our kernel for a backend the original
    cannot build it for: `build_kernel(method, layer, experts_cls)` returns True when it
    built one (vLLM 0.23's CPU backend), False to let the original build it."""
    experts_cls = state.experts_cls
    upstream = state.upstream

    def keep_vllms(method: Any, layer: Any, name: str, reason: str) -> None:
        setattr(method, TAKEN_OVER, False)
        state.stats.layer_not_taken_over(name, reason)
        logger.warning("moe.capacity: %s keeps vLLM's experts: %s", name, reason)
        return original(method, layer)

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        # At load, before any forward: whatever this layer's fate, so that every rank takes
        # part (and a CPU engine in eager mode runs no forward before it reports ready).
        check_config_once(state, layer.moe_config.moe_parallel_config)
        name = getattr(layer, "layer_name", type(layer).__name__)
        reason = _not_supported_reason(self, layer, upstream)
        if reason is not None:
            return keep_vllms(self, layer, name, reason)
        if _is_triton(self, upstream):
            # CUDA: vLLM's Triton experts stay (one fused kernel, not a per-expert loop) and
            # are handed the dropped rows so that they skip them. Read from vLLM's source,
            # never run on a GPU here.
            route = triton_route(layer.moe_config.moe_parallel_config,
                                 layer.global_num_experts, state.options.drop_token_ratio)
            if isinstance(route, str):
                return keep_vllms(self, layer, name, route)
            original(self, layer)
            setattr(self, TAKEN_OVER, TRITON)
            setattr(self, ROUTE, route)
            state.add_layer(name, layer)
            state.stats.dispatch_path(name, "vllm", f"CUDA Triton experts, {route.kind}: "
                                      f"{route.why} (unverified on GPU)")
            return
        if build_kernel is None or not build_kernel(self, layer, experts_cls):
            # The original builds the modular kernel from self.experts_cls: on vLLM's CPU
            # backend a subclass of vLLM's CPU experts (vllm_cpu_experts.py: its prepack
            # in place, its kernel on the kept rows), else ours (standard layout).
            self.experts_cls = experts_class_for(self, state)
            original(self, layer)
        setattr(self, TAKEN_OVER, EXPERTS)
        state.add_layer(name, layer)
        _install_dispatch(self, layer, state)

    return process_weights_after_loading


def _is_triton(method: Any, upstream: Any) -> bool:
    return getattr(method, "unquantized_backend", None) == upstream.UnquantizedMoeBackend.TRITON


# --------------------------------------------------------------------------------------
# dispatch: all_to_all replaces the modular kernel's prepare/finalize for our layers
# --------------------------------------------------------------------------------------


def _dispatch_plan(layer: Any, options: Any, upstream: Any) -> tuple[str, str]:
    """("all_to_all" | "allgather", why). Raises for an explicit all_to_all that cannot run."""
    from ascend_patch.impls.moe.transport.all_to_all_dispatch import expert_owners

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
    if parallel.enable_eplb:
        blockers.append("EPLB (redundant physical experts)")
    graphs = _graph_capture(upstream)
    if graphs is not None:
        blockers.append(
            f"CUDA graphs (cudagraph_mode {graphs}: the dispatch sizes its messages on the "
            "host, which a captured graph cannot replay; use enforce_eager or "
            "-cc.cudagraph_mode=NONE)"
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
                f"dispatch: all_to_all cannot run for {layer.layer_name}: "
                + "; ".join(blockers) + " (use dispatch: auto or allgather)"
            )
        return "allgather", "auto: " + "; ".join(blockers)
    return "all_to_all", f"{options.dispatch}: DP={parallel.dp_size}, EP={parallel.ep_size}"


def _graph_capture(upstream: Any) -> str | None:
    """vLLM's CUDA-graph mode when it captures graphs, else None. torch.compile itself is
    fine: the all-to-all kernel is one opaque custom op (all_to_all_dispatch.py). The CPU
    platform never captures (vllm/platforms/cpu.py empties the capture sizes)."""
    config = upstream.get_current_vllm_config_or_none()
    if config is None or upstream.current_platform.is_cpu():
        return None
    mode = config.compilation_config.cudagraph_mode
    if mode is None or mode == upstream.CUDAGraphMode.NONE:
        return None
    return str(getattr(mode, "name", mode))


def _install_dispatch(method: Any, layer: Any, state: CapacityState) -> None:
    """Rebuild the layer's modular kernel with the all-to-all prepare/finalize when the
    `dispatch` option asks for it; record the choice in the stats either way."""
    stats = state.stats
    upstream = state.upstream
    try:
        path, why = _dispatch_plan(layer, state.options, upstream)
    except ValueError as exc:
        raise state.error(str(exc)) from None
    stats.dispatch_path(layer.layer_name, path, why)
    if path != "all_to_all":
        return
    from ascend_patch.impls.moe.transport.all_to_all_dispatch import (
        expert_owners,
        make_kernel_class,
        make_prepare_finalize_class,
    )

    parallel = layer.moe_config.moe_parallel_config
    if parallel.is_sequence_parallel:
        # Sequence-parallel MoE (vLLM's choice for DP > 1 with TP > 1 and EP): the model
        # already split each DP rank's tokens over its TP ranks; each sends its own chunk.
        num_sharers, sharer = 1, 0
    else:
        # The ranks of one DP rank (its TP ranks) hold the same tokens: they split them.
        num_sharers = parallel.ep_size // (parallel.dp_size * parallel.pcp_size)
        sharer = parallel.ep_rank - parallel.dp_rank * num_sharers
    placement = getattr(layer, "expert_placement_strategy", "linear")
    prepare_finalize = make_prepare_finalize_class(upstream)(
        group_fn=upstream.get_ep_group,
        owners=expert_owners(layer.global_num_experts, parallel.ep_size, placement),
        ep_size=parallel.ep_size,
        sharer=sharer,
        num_sharers=num_sharers,
        counters=stats.dispatch_counters(),
        on_call=lambda nbytes, name=layer.layer_name: stats.dispatch_recorded(name, nbytes),
    )
    # Same experts object (CapacityExperts, built by the original from self.experts_cls),
    # new prepare/finalize, the whole kernel behind one custom op (torch.compile). Nothing
    # else holds the old kernel: the runner reads moe_kernel through the method on every
    # forward (fused_moe_method_base.py:35-47).
    kernel = make_kernel_class(upstream)(prepare_finalize, method.moe_kernel.fused_experts, layer)
    method.moe_kernel = state.kernels[layer.layer_name] = kernel


# --------------------------------------------------------------------------------------
# apply: the drop step on vLLM's router output, then the original
# --------------------------------------------------------------------------------------


def make_apply(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of UnquantizedFusedMoEMethod.apply(self, layer, x, topk_weights, topk_ids,
    shared_experts, shared_experts_input)."""
    # overflow: reroute: the layer's router planned already, with the scores
    # (router_scores.py); planning again would take rows off twice.
    planned_by_router = state_of(ctx).rerouting

    def apply(
        self: Any,
        layer: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> Any:
        mode = getattr(self, TAKEN_OVER, False)
        if mode and not planned_by_router:
            topk_weights, topk_ids = custom_ops.plan(topk_weights, topk_ids, layer.layer_name)
        if mode == TRITON:
            return _apply_triton(self, layer, x, topk_weights, topk_ids, shared_experts,
                                 shared_experts_input)
        return original(
            self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
        )

    return apply


def _apply_triton(method: Any, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_experts: Any,
                  shared_experts_input: torch.Tensor | None) -> Any:
    """vLLM's forward_native (unquantized_fused_moe_method.py) with the route's ids and
    expert_map: the kernel skips the dropped rows instead of computing them at weight 0."""
    route = getattr(method, ROUTE)
    return method.moe_kernel.apply(
        hidden_states=x,
        w1=layer.w13_weight,
        w2=layer.w2_weight,
        topk_weights=topk_weights,
        topk_ids=route.ids(topk_ids),
        activation=layer.activation,
        apply_router_weight_on_input=layer.apply_router_weight_on_input,
        global_num_experts=route.kernel_num_experts(layer.global_num_experts),
        expert_map=route.expert_map(layer.expert_map, topk_ids.device),
        shared_experts=shared_experts,
        shared_experts_input=shared_experts_input,
    )


def check_config_once(state: CapacityState, parallel: Any) -> None:
    """Compare config digest and options over the EP group, once per process.

    Done when the first MoE layer's weights are processed at load (every rank builds the
    same model, layer by layer, so the collective lines up), i.e. before the engine reports
    ready: vLLM's CPU worker in eager mode runs no warm-up forward, and a mismatched
    launch would otherwise answer /health until its first request. The first drop step
    checks too, for a layer loaded some other way. A mismatch raises ConfigMismatchError
    on every rank; without the check a rank with another drop ratio would plan different
    capacities (silently wrong outputs) or send rows its peers do not expect (a hang)."""
    if state.config_checked:
        return
    state.config_checked = True
    if parallel.ep_size <= 1:
        return
    from ascend_patch.impls.distributed.consistency import (
        ConfigCheckTimeout,
        ConfigMismatchError,
        exit_later,
    )

    group = state.upstream.get_ep_group()
    try:
        check_config_over_group(state.options, group)
    except (ConfigMismatchError, ConfigCheckTimeout) as exc:
        exit_later(str(exc))  # this process may not serve: never let it linger
        raise
    state.stats.config_checked(group.world_size)


def make_step(layer: Any, state: CapacityState) -> DropStep:
    """The drop step of a taken-over layer (built at its first call, in the plan op)."""
    parallel = layer.moe_config.moe_parallel_config
    check_config_once(state, parallel)
    gather, rank = token_sources(parallel, state.upstream)
    export_layer_metrics(state, layer.layer_name, parallel)
    return state.drop_step(
        layer.layer_name,
        num_experts=layer.global_num_experts,
        ep_size=parallel.ep_size,
        gather=gather,
        rank=rank,
        owners=_owners(layer, parallel.ep_size, state),
    )


def rank_within_dp(parallel: Any) -> int:
    """This rank's index among the ranks holding its DP rank's tokens (its TP and PCP
    ranks). vLLM flattens the MoE ranks DP-major (FusedMoEParallelConfig.make): ep_rank
    (with EP) or tp_rank (without) = dp_rank * (ranks per DP rank) + index."""
    flat, size = ((parallel.ep_rank, parallel.ep_size) if parallel.use_ep
                  else (parallel.tp_rank, parallel.tp_size))
    return flat - parallel.dp_rank * max(size // max(parallel.dp_size, 1), 1)


def export_layer_metrics(state: CapacityState, layer_name: str, parallel: Any) -> None:
    """Put the layer's counters on /metrics (core/metrics.py), if metrics are on here: per
    DP rank, rows written by the first of the ranks that share its tokens."""
    from ascend_patch.core import metrics as process_metrics
    from ascend_patch.impls.moe.telemetry.metrics import layer_series

    writer = process_metrics.writer()
    if writer is not None:
        # Under sequence-parallel MoE every rank holds its own tokens and writes its rows.
        planned = bool(parallel.is_sequence_parallel) or rank_within_dp(parallel) == 0
        state.stats.export_layer(layer_name, layer_series(
            writer, state.ctx.patch_name, layer_name, parallel.dp_rank, planned=planned,
            rerouting=state.rerouting))


def check_config_over_group(options: Any, group: Any, digest: str | None = None) -> None:
    """check_same_config with this process's config digest and the patch's options."""
    import os

    from ascend_patch.core.runtime import DIGEST_ENV
    from ascend_patch.impls.distributed.consistency import check_same_config

    if digest is None:
        digest = os.environ.get(DIGEST_ENV, "")
    check_same_config(digest, options.model_dump(mode="json"), group)


def token_sources(parallel: Any, upstream: Any) -> tuple[Any, int]:
    """(all_gather_counts, rank) for the drop step.

    The ranks of an EP group hold the same tokens unless DP > 1 (TP-only EP: every TP rank
    has the whole batch; DP + TP + EP: the TP ranks of one DP rank share its batch), so the
    token sources are the DP ranks: counts are all-gathered over the DP group. Under
    sequence-parallel MoE (DP > 1 with TP > 1 and EP) the model splits each DP rank's
    tokens over its TP ranks before the MoE: every EP rank is a source, counts are
    all-gathered over the EP group.
    """
    if parallel.dp_size <= 1:
        return None, 0
    group = (upstream.get_ep_group() if parallel.is_sequence_parallel
             else upstream.get_dp_group())

    def all_gather_counts(counts: torch.Tensor) -> torch.Tensor:
        return group.all_gather(counts.unsqueeze(0).contiguous(), dim=0)

    return all_gather_counts, group.rank_in_group


def _owners(layer: Any, ep_size: int, state: CapacityState) -> torch.Tensor | None:
    """The EP rank of each global expert (None: the planner's linear placement, also what
    `simulate_ep_size` models)."""
    if state.options.simulate_ep_size or ep_size <= 1:
        return None
    from ascend_patch.impls.moe.transport.all_to_all_dispatch import expert_owners

    placement = getattr(layer, "expert_placement_strategy", "linear")
    return expert_owners(layer.global_num_experts, ep_size, placement)
