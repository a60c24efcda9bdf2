"""`moe.capacity` inside vllm-ascend 0.23.0.post1's own fused MoE (Ascend NPU, vLLM 0.23).

Also vllm-ascend 0.18.0 (vLLM 0.18), whose MoE pipeline is the same with a few names moved
(spec_releases.py lists them, with file:line): the same sites, the same drop step; there the
FUSED_MC2 switch is the environment variable VLLM_ASCEND_ENABLE_FUSED_MC2 and there is no MoE
LoRA. File:line references below are 0.23.0.post1's.

vllm-ascend swaps vLLM's MoE layer, method and runner for its own (AscendFusedMoE,
AscendUnquantizedFusedMoEMethod or the quantized AscendFusedMoEMethod, AscendMoERunner), so
the vLLM-platform sites of this implementation never run there. Paths below are relative
to vllm_ascend/: F23 = ops/fused_moe/fused_moe_0_23_0.py, FM = ops/fused_moe/fused_moe.py, CM =
ops/fused_moe/moe_comm_method.py, TD = ops/fused_moe/token_dispatcher.py, PF =
ops/fused_moe/prepare_finalize.py, AFC = ascend_forward_context.py.

One MoE forward, patched:

    AscendFusedMoE.forward_impl (F23:420)     <- make_forward_impl: takes the layer over (once)
                                                 and records which comm method runs this step
      MoECommMethod.prepare (CM:97; A2A: TP slice PF:132-177; all-gather: DP/EP gather
        PF:343-493)                           <- make_prepare: overflow: reroute keeps the
                                                 router logits it hands on
      AscendUnquantizedFusedMoEMethod.apply (FM:141) or a quantized scheme's apply:
      select_experts, then MoECommMethod.fused_experts (CM:122)
        ids = log2phy[ids] (CM:140-142): EPLB's logical -> physical expert ids
        build_token_dispatch_input (CM:144)   <- make_build_token_dispatch_input: the drop step
                                                 on the physical ids; a dropped row gets weight
                                                 0 and the id its dispatcher skips; a rerouted
                                                 row its new physical id and weight
        token_dispatch -> unified_apply_mlp -> token_combine, with on the all-to-all path:
          TokenDispatcherWithAll2AllV._preprocess (TD:592)           <- num_out_tokens = rows sent
          TokenDispatcherWithAll2AllV._dispatch_preprocess (TD:563)  <- permuted rows = rows sent
          TokenDispatcherWithAll2AllV._combine_postprocess (TD:696)  <- zero rows for the unsent
        MoECommMethod._apply_mlp (CM:174)      <- a quantized MLP handed zero rows is skipped
      finalize, EPLB load, shared experts: vllm-ascend, unchanged

Why `build_token_dispatch_input` (moe_runtime_args.py:201): it is the only call between
log2phy and the dispatcher, and it receives the physical ids as an argument, so the drop step
bins each row by the rank that really owns its expert without redoing log2phy. Patching
`MoECommMethod.fused_experts` instead would mean applying log2phy ourselves and handing the
MLP (which reads fused_experts_input.topk_ids, for LoRA) ids it does not expect. The function
is imported by name into CM:32; the patcher rewrites that copy. It does not know its layer,
hence the forward_impl site, which also sees every MoE layer (quantized ones included) so
that those kept whole are reported.

All-to-all (TokenDispatcherWithAll2AllV): a dropped row gets id E + 1. `_preprocess`
histograms ids over [0, E] (TD:593), so input splits, the EP all-gather of per-expert
counts (TD:605-607), output splits and per-expert group sizes all leave it out. Its permute
sorts ids ascending and keeps the first `num_out_tokens` rows (CANN aclnnMoeTokenPermute:
"numOutTokens: 0 keeps every row, otherwise the sorted rows past it are dropped"; ids must be
>= 0, hence not -1): `num_out_tokens` becomes the rows sent, so dropped rows are never
copied, sent or computed. When a rank sends nothing, 0 would mean "all": `_dispatch_preprocess`
then cuts the permuted rows to the split sum itself. The combine's unpermute reads one row per
routed row (its sorted_indices is the full [N * k] inverse permutation, TD:702-707):
`_combine_postprocess` appends zero rows for the unsent ones, whose weight is zero too.

All-gather (TokenDispatcherWithAllGather): a dropped row keeps id -1 and weight 0. The routing
op gathers only ids in [rank * E_local, (rank + 1) * E_local) (TD:391-409; vllm-ascend's golden
for npu_moe_init_routing_custom sends ids below the range to the end with row index -1), so
the row is neither gathered nor computed; `expert_map[-1]` (TD:393) is a valid read and the
combine reads row |-1| = 1 (device_op.py:1101-1104) times weight 0.

Token sources and the cap. On the all-to-all path each EP rank holds different tokens (its TP
slice), so the drop step all-gathers its [2, E] per-expert counts over the EP device group
with vllm-ascend's own `gather_from_sequence_parallel_region` (the collective behind the
dispatcher's (ep, E) histogram): every rank gets the same [S, 2, E] and computes the same
capacity and per-(rank, bin) quotas (capacity.py). The dispatcher's own gather cannot be
reused: it runs inside `_preprocess` on the ids the drop produced, after the decision it
would have to feed. So the cost is one all-gather of 2 x E int64 per layer call. On the
all-gather path ids are already global over the EP group (PF:343-493: every rank routes the
same gathered tokens), so every rank plans the same rows with no collective. The first planned
call of a process compares config digest and options over the same EP group. Group and rank
come from the step's dispatcher (TD:72-83), the EP size and expert counts from the layer as
vllm-ascend sets them (F23:233-235), so what is relied on can be checked in vllm-ascend's
source alone (`validate --platform ascend --source vllm_ascend=DIR`).

MC2 and FUSED_MC2: rows are kept whole, never forced onto the all-to-all path.
  * They cannot express a per-row drop: `npu_moe_distribute_dispatch[_v2]` takes all k expert
    ids of a token, its only mask (`x_active_mask`, TD:182-183) is per token and only passed
    when global_bs == 0; the per-expert counts come out of the op (TD:236-244), so nothing
    can be planned before it; FUSED_MC2's dispatch_ffn_combine / dispatch_gmm_combine_decode
    (CM:286-346) likewise. A zero weight would still be sent and computed.
  * Forcing ALLTOALL through `select_moe_comm_method` (AFC:303) is not safe: MC2 is what the
    captured ACL graphs run (the MC2 capacity is derived from the largest capture size,
    AFC:208-209), while the all-to-all dispatcher synchronises with the host (TD:598-603,
    614-616, 627) and cannot be captured; the selector is also asked outside any step, by
    profile_run to reserve MC2's HCCL buffers (worker/model_runner_v1.py:3684-3689) and by
    should_skip_allreduce_across_dp_group (utils.py:1230-1275), whose answer decides whether
    DP ranks even agree on token counts; and on A2 vllm-ascend never selects ALLTOALL
    (AFC:240-252).
  * MC2 only runs up to the MC2 capacity, min(ceil(T / tp), 512) * tp tokens per DP rank
    (AFC:202-217, 250, 265): decode and short prefills, where vllm-ascend picks it for latency.
    The large prefill batches dropping is for run on ALLTOALL (A3) or ALLGATHER (A2).
  So MC2 and FUSED_MC2 steps are counted in `stats["ascend"]["kept_whole"]` and logged once.
  FUSED_MC2's own silent truncation (rows past mega_moe_max_tokens) is counted per layer and
  rank by ascend_fused_mc2.py, with or without drops.
  One setting makes every step FUSED_MC2: `enable_fused_mc2: 1` on A3 (AFC:264-282, EP <= 32):
  with a drop ratio > 0 the patch refuses it (nothing could ever be dropped).

Also kept whole: steps being captured into an ACL graph (the planner synchronises with the
host), layers with a MoE LoRA adapter (its MLP pairs the undropped ids with the dispatcher's
rows, moe_mlp.py:398-419).

Quantized MoE (QM = quantization/methods/). A quantized layer's quant_method is the wrapper
AscendFusedMoEMethod (quantization/method_adapters.py:201), whose apply forwards to the
registered scheme (:253-297); every scheme's apply ends in moe_comm_method.fused_experts
(build_fused_experts_input(...)), so the drop step runs at the same build_token_dispatch_input
with the same marks. What the dispatchers do with them, read in TD: on the all-to-all path
the dynamic quant runs on the permuted rows only, after _dispatch_preprocess (TD:498-501), and
the per-row scales take their own all-to-all with the same (post-drop) splits (TD:502-506):
a dropped row is neither quantized nor sent, nor is its scale. On the all-gather path the
routing op quantizes (quant_mode 1) or gathers the prepare-stage scale of (quant_mode -1)
only the rows in this rank's expert range (TD:374-411): id -1 is neither. The quantized MLP
(moe_mlp.py:88-362) reads rows, group sizes and scales, never expert ids. Each admitted
layer's report row names its scheme (`quant`). Registered MoE schemes and what is done:

    W8A8_DYNAMIC     QM/w8a8_dynamic.py:155  taken over; contract-tested on CPU (A2A, AG)
    W4A8_DYNAMIC     QM/w4a8.py:231          taken over; contract-tested on CPU (A2A, AG;
                                             per-group weights, non-Triton swiglu branch)
    W8A8_MIX         QM/w8a8_pdmix.py:88     taken over (inherits W8A8_DYNAMIC's apply); read
    W8A8FP8_DYNAMIC  QM/w8a8fp8_dynamic.py:69 taken over (inherits that apply); read only
    W4A16            QM/w4a16.py:111         taken over (apply :308, no dispatch quant); read
    W8A8_MXFP8, W4A8_MXFP, FP8 (w4a8_moe), W4A4_MXFP4, W4A16_MXFP4 (QM/w8a8_mxfp8.py:211,
    w4a8_mxfp4.py:99, fp8.py:81, w4a4_mxfp4.py:118, w4a16_mxfp4.py:55): taken over, read only;
    their MXFP ops run on A5 only (device_op.py:198-204 raises elsewhere)
    any other scheme class: not taken over, reported with its name

FUSED_MC2 exists for quantized models only (CM:290-292 asserts the scales): its refusal
above is unchanged. A rank that sends zero rows hands aclnnDynamicQuant a [0, H] input,
which CANN documents ("supports empty Tensor"); a rank that receives zero rows would hand the
quantized grouped matmuls (GroupedMatmulSwigluQuantWeightNZ, quantized GroupedMatmul) an
empty input, which CANN does not document: `_apply_mlp` skips such a call (make_apply_mlp)
for W8A8 / W4A8 / W4A16, whose MLP output dtype was read (BaseDeviceAdaptor, A2/A3);
W8A8FP8 and the MXFP schemes still hand their ops the empty input (A5DeviceAdaptor not read).

Side effects: dynamic EPLB's load counters (F23:521-539) see post-drop counts; routed-experts
capture (FM:201-204) sees pre-drop ids.

Verified on CPU only (tests/ascend: vllm-ascend's own forward_impl, dispatchers and MLP with
emulated torch_npu ops, two gloo ranks; unquantized, W8A8_DYNAMIC, W4A8_DYNAMIC); nothing here
has run on an NPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import ascend_dispatch
from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.planner.capacity import AllGatherCounts
from ascend_patch.impls.moe.planner.reroute import scores_from_logits
from ascend_patch.impls.moe.state import CapacityState

logger = logging.getLogger("ascend_patch.moe.capacity")

ALL_TO_ALL = "all_to_all"
ALL_GATHER = "allgather"
MC2 = "MC2"
FUSED_MC2 = "FUSED_MC2"
_DROPPING_PATHS = (ALL_TO_ALL, ALL_GATHER)
UNQUANTIZED = "unquantized"
# The scoring functions vllm-ascend's select_experts knows (experts_selector.py).
SCORING_FUNCS = ("softmax", "sigmoid")


# Tuple lengths of the TokenDispatcherWithAll2AllV helpers whose results are edited (TD:629-
# 635 and TD:581-590): a different length means the layout moved and the index is wrong.
_PREPROCESS_LEN = 5
_DISPATCH_PREPROCESS_LEN = 8

_KEPT_WHOLE_WHY = {
    MC2: "MC2 dispatch takes whole tokens (per-token mask only)",
    FUSED_MC2: "FUSED_MC2 dispatch takes whole tokens (per-token mask only)",
    "graph capture": "the drop planner synchronises with the host, which a captured graph "
    "cannot",
    "MoE LoRA": "the LoRA MLP pairs the router's ids with the dispatched rows",
}


@dataclass(frozen=True)
class LayerCall:
    """The taken-over layer whose forward is running, and its step's comm path."""

    name: str
    layer: Any
    path: str
    dispatcher: Any  # the step's token dispatcher (its EP group, rank and size)


class AscendCapacityState(CapacityState):
    """CapacityState plus what the vllm-ascend sites share within a process."""

    def __init__(self, ctx: PatchContext) -> None:
        super().__init__(ctx)
        self.current: LayerCall | None = None
        # Layer name -> (the layer object judged, taken over?): a new model in the process
        # brings new objects under the same names, and is judged again.
        self.admitted: dict[str, tuple[Any, bool]] = {}
        # One drop step per (layer, comm path): the token sources differ per path.
        self.path_steps: dict[tuple[str, str], DropStep] = {}
        self.warned: set[str] = set()
        self.counters = ctx.stats.setdefault("ascend", {"calls_by_path": {}, "kept_whole": {}})
        # The MoE layer whose forward_impl runs (taken over or not): FUSED_MC2 steps are
        # counted per layer (ascend_fused_mc2.py), and their OverflowRecorder.
        self.running: Any = None
        self.overflow: Any = None
        # overflow: reroute: the router logits the current layer call's prepare handed on
        # (TP slice or DP gather: aligned with the tokens its apply routes), and the log2phy
        # its comm method mapped the ids with where the dispatch hook cannot see it (0.13.0).
        self.logits: torch.Tensor | None = None
        self.log2phy: torch.Tensor | None = None
        if self.rerouting:
            self.route_scores = self._scored

    def count(self, kind: str, key: str) -> None:
        table = self.counters[kind]
        table[key] = table.get(key, 0) + 1

    def keep_whole(self, reason: str) -> None:
        self.count("kept_whole", reason)
        if reason not in self.warned:
            self.warned.add(reason)
            why = _KEPT_WHOLE_WHY.get(reason, "no drop step for this comm method")
            logger.warning("moe.capacity: %s steps keep every row: %s", reason, why)

    def add_layer(self, name: str, layer: Any) -> None:
        super().add_layer(name, layer)
        for key in [k for k in self.path_steps if k[0] == name]:
            del self.path_steps[key]

    def _scored(self, name: str, layer: Any) -> None:
        """At load, for a layer taken over with overflow: reroute: its scores can be made."""
        if layer.scoring_func not in SCORING_FUNCS:
            raise self.error(
                f"overflow: reroute: MoE layer {name!r} scores its experts with "
                f"{layer.scoring_func!r}; a rerouted row is weighed by softmax or sigmoid "
                "scores only: use overflow: drop"
            )


def state_of(ctx: PatchContext) -> AscendCapacityState:
    state = ctx.state(AscendCapacityState)
    if not isinstance(state, AscendCapacityState):
        raise ctx.error("the vllm-ascend sites cannot share a patch with vLLM-platform sites")
    return state


# --------------------------------------------------------------------------------------
# AscendFusedMoE.forward_impl: which layer, which comm method
# --------------------------------------------------------------------------------------


def make_forward_impl(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of AscendFusedMoE.forward_impl(self, hidden_states, router_logits,
    return_with_event=False)."""
    return wrap_forward_impl(original, state_of(ctx), _layer_call)


def wrap_forward_impl(
    original: Callable[..., Any],
    state: AscendCapacityState,
    layer_call: Callable[[AscendCapacityState, Any], LayerCall | None],
) -> Callable[..., Any]:
    """forward_impl(self, hidden_states, router_logits, return_with_event=False) with
    `layer_call(state, layer)` current while it runs."""

    def forward_impl(
        self: Any,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        return_with_event: bool = False,
    ) -> Any:
        call = layer_call(state, self)
        outer = state.current, state.running, state.logits, state.log2phy
        state.current, state.running, state.logits, state.log2phy = call, self, None, None
        try:
            return original(
                self, hidden_states, router_logits, return_with_event=return_with_event
            )
        finally:
            state.current, state.running, state.logits, state.log2phy = outer

    return forward_impl


def _step_comm_method(upstream: Any) -> Any:
    """The step's MoECommMethod, on vllm-ascend's forward context (0.18.0, 0.23.0.post1; 0.13.0
    keeps it on vLLM's and tells the path by dispatcher, ascend_token_dispatch.py)."""
    if "_EXTRA_CTX" in upstream:
        return upstream._EXTRA_CTX.moe_comm_method
    raise LookupError("this release's site set declares no vllm-ascend forward context")


def layer_name(layer: Any) -> str:
    return str(getattr(layer, "layer_name", None) or f"moe@{id(layer):x}")


def _layer_call(state: AscendCapacityState, layer: Any) -> LayerCall | None:
    """The call record for the drop hook; None when this call keeps every row."""
    name = layer_name(layer)
    if not admitted(state, name, layer):
        return None
    method = _step_comm_method(state.upstream)
    path = _comm_path(method, state.upstream)
    state.count("calls_by_path", path)
    if path not in _DROPPING_PATHS:
        state.keep_whole(path)
        return None
    if capturing():
        state.keep_whole("graph capture")
        return None
    return LayerCall(name, layer, path, method.token_dispatcher)


def admitted(state: AscendCapacityState, name: str, layer: Any) -> bool:
    known = state.admitted.get(name)
    if known is None or known[0] is not layer:
        known = state.admitted[name] = (layer, _admit(state, name, layer))
    return known[1]


def _admit(state: AscendCapacityState, name: str, layer: Any) -> bool:
    # The schemes the release's site set declares (schemes.py, spec_releases.py): what `plan`
    # shows is what runs.
    admitted = state.ctx.site_set.quantized_layers or ()
    scheme, reason = _scheme_of(getattr(layer, "quant_method", None), state.upstream, admitted)
    reason = reason or _layout_reason(layer)
    if reason is not None:
        state.stats.layer_not_taken_over(name, reason)
        logger.warning("moe.capacity: %s keeps every row: %s", name, reason)
        return False
    _refuse_fused_mc2(state, scheme)
    state.add_layer(name, layer)
    state.stats.layer_quant(name, scheme)
    return True


def _layout_reason(layer: Any) -> str | None:
    experts, ep_size, local = layer.global_num_experts, layer.ep_size, layer.local_num_experts
    if ep_size > 1 and experts != ep_size * local:
        return f"{experts} physical experts are not {ep_size} EP ranks x {local} local experts"
    return None


def _scheme_of(method: Any, upstream: Any, admitted: tuple[str, ...]) -> tuple[str, str | None]:
    """(the layer's MoE scheme name, why it is not taken over or None)."""
    if isinstance(method, upstream.AscendUnquantizedFusedMoEMethod):
        return UNQUANTIZED, None
    if not isinstance(method, upstream.AscendFusedMoEMethod):
        return type(method).__name__, (
            f"MoE method {type(method).__name__} is neither vllm-ascend's unquantized method "
            "nor its quantization wrapper AscendFusedMoEMethod"
        )
    scheme = method.quant_method
    name = _registered_name(type(scheme), _moe_registry(upstream))
    if name not in admitted:
        return str(name or type(scheme).__name__), (
            f"quantized MoE scheme {name or type(scheme).__name__} "
            f"({type(scheme).__name__}) is not one whose apply was read to reach "
            "MoECommMethod.fused_experts"
        )
    return name, None


def _moe_registry(upstream: Any) -> dict[tuple[str, str], type]:
    """(scheme name, layer type) -> class. vllm-ascend 0.13.0 keeps it as name -> {layer
    type: class} in ASCEND_QUANTIZATION_METHOD_MAP (quantization/utils.py:20 there)."""
    if "_SCHEME_REGISTRY" in upstream:
        return upstream._SCHEME_REGISTRY
    return {(name, kind): cls
            for name, kinds in upstream.ASCEND_QUANTIZATION_METHOD_MAP.items()
            for kind, cls in kinds.items()}


def _registered_name(cls: type, registry: dict[tuple[str, str], type]) -> str | None:
    """The name the scheme class was registered under for MoE layers (exact class: W8A8_MIX
    subclasses W8A8_DYNAMIC)."""
    for (name, layer_type), registered in registry.items():
        if layer_type.endswith("moe") and registered is cls:  # FP8 registers "w4a8_moe"
            return name
    return None


def _refuse_fused_mc2(state: AscendCapacityState, scheme: str) -> None:
    if state.options.drop_token_ratio <= 0:
        return
    upstream = state.upstream
    setting, value, where = _fused_mc2_setting(upstream, scheme)
    if value == 1 and upstream.get_ascend_device_type() == upstream.AscendDeviceType.A3:
        raise state.error(
            f"drop_token_ratio > 0 with vllm-ascend's {setting} on A3: every step of an "
            "EP <= 32 deployment then runs the FUSED_MC2 comm method (dispatch_ffn_combine, "
            f"{where}), which takes whole tokens only, so no row could be dropped; unset "
            "it or set drop_token_ratio: 0"
        )


def _fused_mc2_setting(upstream: Any, scheme: str) -> tuple[str, Any, str]:
    """(the setting as a user writes it, its value, where vllm-ascend reads it): 0.18.0 reads
    an environment variable through envs.py's table, 0.23.0.post1 its additional config.
    0.13.0 reads the same variable, but sends only w8a8_dynamic models to FUSED_MC2
    (ascend_forward_context.py:258-275 there): its site set names the table
    `w8a8_fused_mc2_env`, and only W8A8_DYNAMIC layers are refused (other layers never run
    FUSED_MC2 there)."""
    setting: tuple[str, Any, str] = ("", None, "")
    if "w8a8_fused_mc2_env" in upstream and scheme == "W8A8_DYNAMIC":
        setting = ("VLLM_ASCEND_ENABLE_FUSED_MC2=1",
                   upstream.w8a8_fused_mc2_env["VLLM_ASCEND_ENABLE_FUSED_MC2"](),
                   "ascend_forward_context.py:258-275 in 0.13.0, w8a8_dynamic models")
    elif "env_variables" in upstream:
        setting = ("VLLM_ASCEND_ENABLE_FUSED_MC2=1",
                   upstream.env_variables["VLLM_ASCEND_ENABLE_FUSED_MC2"](),
                   "ascend_forward_context.py:248-272 in 0.18.0")
    elif "get_ascend_config" in upstream:
        setting = ("enable_fused_mc2: 1", upstream.get_ascend_config().enable_fused_mc2,
                   "ascend_forward_context.py:264-282")
    return setting


def _comm_path(method: Any, upstream: Any) -> str:
    for cls, path in (
        (upstream.AlltoAllCommImpl, ALL_TO_ALL),
        (upstream.AllGatherCommImpl, ALL_GATHER),
        (upstream.MC2CommImpl, MC2),
        (upstream.FusedMC2CommImpl, FUSED_MC2),
    ):
        if isinstance(method, cls):
            return path
    return type(method).__name__


def capturing() -> bool:
    npu = getattr(torch, "npu", None)
    is_capturing = getattr(npu, "is_current_stream_capturing", None)
    return bool(is_capturing()) if is_capturing is not None else False


# --------------------------------------------------------------------------------------
# build_token_dispatch_input: the drop step on the physical ids
# --------------------------------------------------------------------------------------


def make_build_token_dispatch_input(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of moe_runtime_args.build_token_dispatch_input(*, fused_experts_input,
    topk_ids=None)."""
    state = state_of(ctx)

    def build_token_dispatch_input(
        *, fused_experts_input: Any, topk_ids: torch.Tensor | None = None
    ) -> Any:
        call = state.current
        if call is not None:
            dropped = _drop(state, call, fused_experts_input, topk_ids)
            if dropped is not None:
                fused_experts_input, topk_ids = dropped
        return original(fused_experts_input=fused_experts_input, topk_ids=topk_ids)

    return build_token_dispatch_input


def _drop(
    state: AscendCapacityState, call: LayerCall, inputs: Any, topk_ids: torch.Tensor | None
) -> tuple[Any, torch.Tensor] | None:
    """(inputs with the kept weights, ids in the dispatcher's form); None: keep every row."""
    if _has_moe_lora(state.upstream, inputs):
        state.keep_whole("MoE LoRA")
        return None
    ids = inputs.topk_ids if topk_ids is None else topk_ids
    weights, ids = drop_rows(state, call, inputs.topk_weights, ids, _log2phy(state, inputs))
    return dataclasses.replace(inputs, topk_weights=weights), ids


def _log2phy(state: AscendCapacityState, inputs: Any) -> torch.Tensor | None:
    """The map fused_experts sent the ids through (CM:140-142), for overflow: reroute; only
    the releases with stage dataclasses (0.18.0, 0.23.0.post1) reach this site."""
    if "MoEFusedExpertsInput" in state.upstream:
        return inputs.routing.log2phy if state.rerouting else None
    return None


def _has_moe_lora(upstream: Any, inputs: Any) -> bool:
    """Whether the layer call carries a MoE LoRA adapter: only 0.23.0.post1 has MoE LoRA (its
    site set declares `moe_lora`; 0.18.0's MoEFusedExpertsInput has no lora_context)."""
    if "moe_lora" in upstream:
        return inputs.lora_context is not None
    return False


def drop_rows(
    state: AscendCapacityState, call: LayerCall, weights: torch.Tensor, ids: torch.Tensor,
    log2phy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drop step on physical ids (`log2phy`: the map they went through, or None):
    (kept weights, ids in the step's dispatcher's form)."""
    scores = _physical_scores(state, call, ids, log2phy) if state.rerouting else None
    weights, ids = _step(state, call)(weights, ids, scores)
    if call.path == ALL_TO_ALL:
        ids = ascend_dispatch.mark_unsent(ids, call.layer.global_num_experts)
    return weights, ids


def _physical_scores(
    state: AscendCapacityState, call: LayerCall, ids: torch.Tensor, log2phy: torch.Tensor | None
) -> torch.Tensor:
    """overflow: reroute: the router's scores of every physical expert for the rows of this
    step, from the logits its prepare handed on (make_prepare)."""
    logits = state.logits
    if logits is None or logits.shape[0] != ids.shape[0]:
        got = "none" if logits is None else f"{logits.shape[0]} tokens"
        raise state.error(
            f"overflow: reroute: MoE layer {call.name!r} routes {ids.shape[0]} tokens here, "
            f"but the router logits its comm method's prepare handed on cover {got}; the "
            "scores cannot be lined up with the rows: use overflow: drop"
        )
    scores = scores_from_logits(logits, call.layer.scoring_func)
    try:
        return ascend_dispatch.physical_scores(scores, log2phy, call.layer.global_num_experts)
    except ValueError as exc:
        raise state.error(f"overflow: reroute: MoE layer {call.name!r}: {exc}") from None


def _step(state: AscendCapacityState, call: LayerCall) -> DropStep:
    key = (call.name, call.path)
    step = state.path_steps.get(key)
    if step is None:
        check_config_once(state, call.layer, call.dispatcher)
        step = state.path_steps[key] = _make_step(state, call)
    return step


def _make_step(state: AscendCapacityState, call: LayerCall) -> DropStep:
    layer = call.layer
    ep_size = max(int(layer.ep_size), 1)
    gather, rank = _token_sources(call, state.upstream)
    owners = None
    if not state.options.simulate_ep_size:
        owners = ascend_dispatch.contiguous_owners(
            layer.global_num_experts, ep_size, layer.local_num_experts
        )
    return state.drop_step(
        call.name,
        num_experts=layer.global_num_experts,
        ep_size=ep_size,
        gather=gather,
        rank=rank,
        owners=owners,
    )


def _token_sources(call: LayerCall, upstream: Any) -> tuple[AllGatherCounts | None, int]:
    """(all-gather of per-expert counts, this rank's index among the sources): on the
    all-to-all path, over its dispatcher's EP device group, as its own count exchange."""
    if call.path != ALL_TO_ALL:
        return None, 0
    gather_from_sequence_parallel_region = upstream.gather_from_sequence_parallel_region
    dispatcher = call.dispatcher
    group = dispatcher.ep_group

    def all_gather_counts(counts: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence_parallel_region(counts, group=group)

    return all_gather_counts, dispatcher.ep_rank


# --------------------------------------------------------------------------------------
# MoECommMethod.prepare: the router logits that line up with the routed tokens
# --------------------------------------------------------------------------------------


def make_prepare(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of MoECommMethod.prepare(self, hidden_states, router_logits,
    enable_shared_expert_dp=False, replace_allreduce=False, quant_type=...) (CM:97), which
    returns MoEPrepareOutput (0.18.0 too; 0.13.0's returns a tuple: ascend_token_dispatch)."""
    if "MoEPrepareOutput" in ctx.upstream:
        return keep_prepared_logits(original, state_of(ctx), lambda out: out.router_logits)
    raise ctx.error("this release's site set declares no MoEPrepareOutput")


def keep_prepared_logits(
    original: Callable[..., Any], state: AscendCapacityState,
    logits_of: Callable[[Any], torch.Tensor],
) -> Callable[..., Any]:
    """prepare(self, hidden_states, router_logits, ...) that, with overflow: reroute inside a
    taken-over layer's call, keeps `logits_of(its output)` for the drop step.

    Why here: the logits forward_impl receives are the layer's input tokens, while the
    rows the drop step sees are those prepare hands on (PF: a TP slice on the all-to-all
    path, the DP/EP gather on the all-gather path, MC2's padding); the quantized and
    unquantized applies all route prepare's logits, so one site serves every scheme."""
    reroute = state.rerouting

    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if reroute and state.current is not None:
            state.logits = logits_of(out)
        return out

    return prepare


def check_config_once(state: AscendCapacityState, layer: Any, dispatcher: Any) -> None:
    """Every EP rank reaches its first planned (or fused MC2) call in the same layer call (the
    comm method is chosen from DP-wide token counts), so this collective lines up; the
    config is compared over the step's dispatcher's EP group."""
    if state.config_checked:
        return
    state.config_checked = True
    if int(layer.ep_size) <= 1:
        return
    from ascend_patch.core.runtime import DIGEST_ENV
    from ascend_patch.impls.distributed.consistency import (
        ConfigCheckTimeout,
        ConfigMismatchError,
        check_same_config,
        exit_later,
    )

    digest = os.environ.get(DIGEST_ENV, "")
    try:
        check_same_config(digest, state.options.model_dump(mode="json"), dispatcher.ep_group)
    except (ConfigMismatchError, ConfigCheckTimeout) as exc:
        exit_later(str(exc))  # this process may not serve: never let it linger
        raise
    state.stats.config_checked(dispatcher.ep_size)


# --------------------------------------------------------------------------------------
# TokenDispatcherWithAll2AllV: dropped rows out of the permute, back as zeros in combine
# --------------------------------------------------------------------------------------


def make_all_to_all_preprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._preprocess(self, topk_ids).

    Stateless: without dropped rows every id is in [0, E), the splits add up to
    topk_ids.numel() and nothing changes. The input splits are the host numpy array the
    dispatcher itself hands to the all-to-all as sizes right after (TD:598-603, 508), so
    reading them here is exactly as safe as its own use."""

    def _preprocess(self: Any, topk_ids: torch.Tensor) -> tuple[Any, ...]:
        result = checked_tuple(ctx, original(self, topk_ids), _PREPROCESS_LEN, "_preprocess")
        sent = ascend_dispatch.rows_sent(result[1])
        if 0 < sent < result[4]:
            result = (*result[:4], sent)
        return result

    return _preprocess


def make_all_to_all_dispatch_preprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._dispatch_preprocess(self, hidden_states,
    topk_ids): when a rank sends no row, num_out_tokens 0 makes the permute keep them all, and
    the all-to-all would be handed more rows than its input splits add up to."""

    return cut_permuted_rows(original, ctx, _DISPATCH_PREPROCESS_LEN)


def cut_permuted_rows(
    original: Callable[..., Any], ctx: PatchContext, length: int
) -> Callable[..., Any]:
    """_dispatch_preprocess(self, hidden_states, topk_ids) returning a `length`-tuple that
    starts (permuted rows, reversed mapping, tokens per expert, input splits, ...), with the
    permuted rows cut to the input splits' sum."""

    def _dispatch_preprocess(
        self: Any, hidden_states: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[Any, ...]:
        result = checked_tuple(
            ctx, original(self, hidden_states, topk_ids), length, "_dispatch_preprocess"
        )
        sent = ascend_dispatch.rows_sent(result[3])
        if result[0].shape[0] > sent:
            result = (result[0][:sent], *result[1:])
        return result

    return _dispatch_preprocess


def make_all_to_all_combine_postprocess(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of TokenDispatcherWithAll2AllV._combine_postprocess(self,
    permutated_local_input_tokens, combine_metadata)."""

    if "MoEAllToAllCombineMetadata" in ctx.upstream:
        return pad_combined_rows(
            original, lambda metadata: metadata.reversed_local_input_permutation_mapping
        )
    raise ctx.error("this release's site set declares no MoEAllToAllCombineMetadata")


def pad_combined_rows(
    original: Callable[..., Any], mapping_of: Callable[[Any], torch.Tensor]
) -> Callable[..., Any]:
    """_combine_postprocess(self, tokens, metadata) with a zero row appended for each routed
    row not sent; `mapping_of(metadata)` is the local unpermute's map, one entry a row."""

    def _combine_postprocess(
        self: Any, permutated_local_input_tokens: torch.Tensor, metadata: Any
    ) -> torch.Tensor:
        rows = mapping_of(metadata).numel()
        tokens = ascend_dispatch.pad_rows(permutated_local_input_tokens, rows)
        return original(self, tokens, metadata)

    return _combine_postprocess


def checked_tuple(ctx: PatchContext, result: Any, length: int, name: str) -> tuple[Any, ...]:
    """`result`, the tuple vllm-ascend's `name` returned (a bare name: a method of
    TokenDispatcherWithAll2AllV), when it has the `length` the adapter indexes it by."""
    if not isinstance(result, tuple) or len(result) != length:
        got = len(result) if isinstance(result, tuple) else type(result).__name__
        owner = "" if "." in name else "TokenDispatcherWithAll2AllV."
        raise ctx.error(
            f"{owner}{name} returned {got} values, expected {length}: vllm-ascend changed "
            "its layout, the adapter's index into it would be wrong"
        )
    return result


# --------------------------------------------------------------------------------------
# MoECommMethod._apply_mlp: no quantized op is handed a rank that received zero rows
# --------------------------------------------------------------------------------------


def make_apply_mlp(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of MoECommMethod._apply_mlp(self, mlp_compute_input) (CM:174).

    An EP rank can receive no row at all on the all-to-all path (every row for its experts
    dropped, or none routed there; the second happens without drops too). vllm-ascend then
    hands its quantized MLP a [0, H] input. CANN documents empty input for aclnnDynamicQuant
    (x "supports empty Tensor") but not for aclnnGroupedMatmulSwigluQuantWeightNZ, the
    grouped_matmul_swiglu_quant* custom ops or the quantized / antiquant aclnnGroupedMatmul:
    unknown, so such a call skips the MLP and hands the combine a [0, H] tensor of the dtype
    the MLP would have returned (its all-to-all sizes the receive buffer from it,
    comm_utils.py:32-36; its unpermute skips zero rows, TD:692). Only for the A2/A3 schemes
    whose output dtype is read here (_zero_row_output); W8A8FP8 and the MXFP schemes go to
    their ops as before. Counted per quant type in stats["ascend"]["zero_row_mlp_skipped"].
    0.23.0.post1's fused_experts unpacks (output, event) from it (CM:156)."""
    return _zero_row_guard(original, ctx, with_event=True)


def make_apply_mlp_tensor(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """make_apply_mlp for vllm-ascend 0.18.0, whose fused_experts takes the output alone
    (moe_comm_method.py:144 there)."""
    return _zero_row_guard(original, ctx, with_event=False)


def _zero_row_guard(
    original: Callable[..., Any], ctx: PatchContext, *, with_event: bool
) -> Callable[..., Any]:
    state = state_of(ctx)

    def _apply_mlp(self: Any, mlp_compute_input: Any) -> Any:
        skipped = _zero_row_output(mlp_compute_input, state.upstream)
        if skipped is not None:
            like, quant_type = skipped
            count_zero_row_skip(state, quant_type)
            if with_event:
                return like, torch.npu.current_stream().record_event()
            return like
        return original(self, mlp_compute_input)

    return _apply_mlp


def count_zero_row_skip(state: AscendCapacityState, quant_type: str) -> None:
    state.counters.setdefault("zero_row_mlp_skipped", {})
    state.count("zero_row_mlp_skipped", quant_type)


def _zero_row_output(mlp_compute_input: Any, upstream: Any) -> tuple[torch.Tensor, str] | None:
    """For a call with zero rows: the [0, H] tensor quant_apply_mlp would return, for W8A8 /
    W4A8 / W4A16 (their dispatched rows are int8 or the activation dtype: one element per
    hidden unit), and the quant type's name; None for a call with rows, an unquantized call
    or another scheme. gmm2's output dtype is bf16 where scale biases are given (W4A8), else
    w2_scale's dtype (moe_mlp.py:258-266, 322-333). Only site sets with the quantized stage
    dataclasses (0.18.0, 0.23.0.post1) have this site."""
    if "QuantType" in upstream:
        hidden = mlp_compute_input.hidden_states
        quant = mlp_compute_input.quant.quant_type
        types = upstream.QuantType
        if hidden.shape[0] != 0 or quant not in (types.W8A8, types.W4A8, types.W4A16):
            return None
        weights = mlp_compute_input.weights
        if weights.w1_scale_bias is not None:
            dtype = torch.bfloat16
        else:
            scale = weights.w2_scale[0] if isinstance(weights.w2_scale, list) else weights.w2_scale
            dtype = scale.dtype
        return hidden.new_empty((0, hidden.shape[-1]), dtype=dtype), quant.name
    return None
