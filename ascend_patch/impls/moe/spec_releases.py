"""moe.capacity's site sets for the vllm-ascend releases before 0.23.0.post1 (light: no torch).

vllm-ascend 0.18.0 (vLLM 0.18) has 0.23.0.post1's MoE pipeline with a few names moved, so its
site set is 0.23.0.post1's with those edits, spelled out below; `validate --platform ascend
--vllm-line 0.18 --source vllm_ascend=DIR` checks every entry against the real 0.18.0 sdist.
Paths relative to vllm_ascend/ of 0.18.0 (FM = ops/fused_moe/fused_moe.py, AFC =
ascend_forward_context.py, RA = ops/fused_moe/moe_runtime_args.py):

* There is no fused_moe_0_23_0.py: AscendFusedMoE and its forward_impl (same signature) are in
  FM:287 and FM:434; AscendSharedFusedMoE.forward_impl calls AscendFusedMoE.forward_impl by
  class, so the one site sees shared-expert layers too.
* enable_fused_mc2 is the environment variable VLLM_ASCEND_ENABLE_FUSED_MC2, read through
  envs.py's `env_variables` table on every access (AFC:248-272), not an ascend_config field.
* MoEFusedExpertsInput has no lora_context (moe_stage_contracts.py:59-72): no MoE LoRA there.
* The all-gather combine calls torch_npu.npu_moe_token_unpermute directly on
  |expanded_row_idx| (token_dispatcher.py:380-384), the semantics 0.23's DeviceOperator wraps;
  npu_moe_init_routing has no act_quant_type; the unquantized apply takes global_num_experts.
"""

from __future__ import annotations

from dataclasses import replace

from ascend_patch.core.catalog import Attribute, Interface, Site, SiteSet

_FUSED_MOE = "vllm_ascend.ops.fused_moe"
_F23 = f"{_FUSED_MOE}.fused_moe_0_23_0:"
_FM = f"{_FUSED_MOE}.fused_moe:"
_TD = f"{_FUSED_MOE}.token_dispatcher:"
_CM = f"{_FUSED_MOE}.moe_comm_method:"
_QC = "vllm_ascend.quantization.quant_config:"


def carried_over(
    site_set: SiteSet,
    lines: tuple[str, ...],
    *,
    moved: dict[str, str],
    signatures: dict[str, str | None],
    dropped: frozenset[str],
    added: tuple[Interface, ...] = (),
    factories: dict[str, str] | None = None,
    reads_dropped: frozenset[str] = frozenset(),
    reads_added: tuple[Attribute, ...] = (),
) -> SiteSet:
    """`site_set` for other lines: targets renamed (`moved`: old prefix or target -> new, the
    attributes read too), signatures replaced (by new target), interfaces and read attributes
    left out (by old target), some added, site factories replaced (by new target). Sites are
    never dropped: a site set without one of its sites is a different design."""
    factories = factories or {}

    def target(old: str) -> str:
        for prefix, new in moved.items():
            if old.startswith(prefix):
                return new + old[len(prefix):]
        return old

    def edited(entry):
        new = target(entry.target)
        return replace(entry, target=new, signature=signatures.get(new, entry.signature))

    unused = (dropped - {i.target for i in site_set.relies_on}) | (
        reads_dropped - {a.target for a in site_set.reads})
    if unused:
        raise ValueError(f"carried_over drops entries the site set does not have: {unused}")
    return replace(
        site_set,
        lines=lines,
        sites=tuple(replace(site, factory=factories.get(site.target, site.factory))
                    for site in map(edited, site_set.sites)),
        relies_on=tuple(edited(i) for i in site_set.relies_on if i.target not in dropped)
        + added,
        reads=tuple(replace(a, target=target(a.target)) for a in site_set.reads
                    if a.target not in reads_dropped) + reads_added,
    )


# The MoE schemes 0.18.0 registers, each of whose apply calls MoECommMethod.fused_experts
# (quantization/methods/: w8a8_dynamic.py:108, w8a8_pdmix.py:88 (a W8A8_DYNAMIC subclass),
# w4a8.py:181, w4a16.py:103, w8a8_mxfp8.py:108); 0.23.0.post1's other schemes do not exist there.
_MOE_SCHEMES_0_18 = ("W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A16", "W8A8_MXFP8")


def ascend_0_18(site_set_0_23: SiteSet) -> SiteSet:
    """vllm-ascend 0.18.0's site set, from 0.23.0.post1's."""
    derived = _carried_0_18(site_set_0_23)
    return replace(derived, quantized_layers=tuple(
        s for s in site_set_0_23.quantized_layers or () if s in _MOE_SCHEMES_0_18))


def _carried_0_18(site_set_0_23: SiteSet) -> SiteSet:
    return carried_over(
        site_set_0_23,
        ("0.18",),
        moved={_F23: _FM},
        signatures={
            "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_init_routing":
                "(hidden_states, topk_ids, *, scale=…, active_num, expert_num, "
                "expert_tokens_num_type=…, expert_tokens_num_flag=…, active_expert_range=…, "
                "quant_mode=…)",
            f"{_FM}AscendUnquantizedFusedMoEMethod.apply":
                "(self, layer, x, use_grouped_topk, top_k, router_logits, renormalize, "
                "topk_group=…, num_expert_group=…, custom_routing_function=…, scoring_func=…, "
                "routed_scaling_factor=…, e_score_correction_bias=…, global_num_experts=…, "
                "expert_map=…, apply_router_weight_on_input=…, activation=…, "
                "enable_force_load_balance=…, log2phy=…, global_redundant_expert_num=…, "
                "pertoken_scale=…, mc2_mask=…)",
            "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod.apply":
                "(self, layer, x, router_logits, top_k, renormalize, use_grouped_topk=…, "
                "global_num_experts=…, expert_map=…, topk_group=…, num_expert_group=…, "
                "custom_routing_function=…, scoring_func=…, routed_scaling_factor=…, "
                "e_score_correction_bias=…, is_prefill=…, enable_force_load_balance=…, "
                "log2phy=…, global_redundant_expert_num=…, pertoken_scale=…, activation=…, "
                "apply_router_weight_on_input=…, mc2_mask=…)",
        },
        dropped=frozenset({
            # torch_npu's own op there (token_dispatcher.py:381), not a vllm-ascend symbol.
            "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_token_unpermute",
            # FUSED_MC2 is switched by the environment in 0.18.0 (env_variables below).
            "vllm_ascend.ascend_config:get_ascend_config",
            # No MoE LoRA in 0.18.0 (MoEFusedExpertsInput has no lora_context).
            f"{_FUSED_MOE}.moe_runtime_args:build_fused_experts_input",
        }),
        reads_dropped=frozenset({
            "vllm_ascend.ascend_config:AscendConfig.enable_fused_mc2",  # the env var instead
            # No MoE LoRA in 0.18.0 (the adapter reads it with a default).
            f"{_FUSED_MOE}.moe_stage_contracts:MoEFusedExpertsInput.lora_context",
            # The FUSED_MC2 limit is fixed at 65536 there (moe_comm_method.py:292).
            "vllm_ascend.ascend_config:AscendConfig.mega_moe_max_tokens",
        }),
        # Its fused_experts takes _apply_mlp's output alone (moe_comm_method.py:144).
        factories={f"{_CM}MoECommMethod._apply_mlp":
                   "ascend_patch.impls.moe.adapters.ascend_0_23:make_apply_mlp_tensor"},
        added=(
            Interface(
                "vllm_ascend.envs:env_variables", None,
                "VLLM_ASCEND_ENABLE_FUSED_MC2 (refused with drops on A3): 1 makes every step "
                "FUSED_MC2 when EP <= 32 (ascend_forward_context.py:248-272)",
            ),
        ),
    )



_TOKEN_DISPATCH = ("(self, hidden_states, topk_weights, topk_ids, expert_map=…, "
                   "global_redundant_expert_num=…, mc2_mask=…, apply_router_weight_on_input=…, "
                   "with_quant=…, dynamic_eplb=…, pertoken_scale=…)")
_FUSED_EXPERTS_0_13 = (
    "(self, hidden_states, w1, w2, topk_weights, topk_ids, activation=…, "
    "apply_router_weight_on_input=…, use_int8_w8a8=…, use_int4_w4a8=…, use_int4_w4a16=…, "
    "expert_map=…, w1_scale=…, w2_scale=…, w1_scale_bias=…, w2_scale_bias=…, w1_offset=…, "
    "w2_offset=…, log2phy=…, need_trans=…, dynamic_eplb=…, mc2_mask=…, pertoken_scale=…)"
)


_UNIFIED_APPLY_MLP = (
    "(hidden_states, w1, w2, group_list, w1_scale=…, w2_scale=…, dynamic_scale=…, "
    "group_list_type=…, w1_scale_bias=…, w2_scale_bias=…, w1_offset=…, w2_offset=…, "
    "topk_scales=…, with_quant=…, fusion=…, need_trans=…, dynamic_eplb=…)"
)
# The MoE schemes 0.13.0 registers (quantization/utils.py:20-47), each of whose apply calls
# MoECommMethod.fused_experts by keyword: w8a8_dynamic.py:272, w8a8_pdmix.py:43 (a
# W8A8_DYNAMIC subclass), w4a8_dynamic.py:378, w4a16.py:230.
_MOE_SCHEMES_0_13 = ("W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A16")


# What 0.23.0.post1's adapter reads that 0.13.0's does not: the stage dataclasses, QuantType and
# stage params (not in 0.13.0), vllm-ascend's own forward context, the FUSED_MC2 settings.
_NOT_READ_ON_0_13 = (
    f"{_FUSED_MOE}.moe_stage_contracts:",
    f"{_FUSED_MOE}.moe_stage_params:",
    "vllm_ascend.quantization.",
    "vllm_ascend.ascend_forward_context:_ExtraForwardContextProxy.",
    "vllm_ascend.ascend_config:AscendConfig.",
)


def ascend_0_13(site_set_0_23: SiteSet) -> SiteSet:
    """vllm-ascend 0.13.0's site set (adapters/ascend_token_dispatch.py: the hooks, file:line):
    no build_token_dispatch_input, so each dispatcher's token_dispatch takes the drop step;
    the interfaces 0.23.0.post1 relies on that 0.13.0 has alike are carried over."""
    adapter = "ascend_patch.impls.moe.adapters.ascend_token_dispatch"
    layer = replace(site_set_0_23.sites[1], target=f"{_FM}AscendFusedMoE.forward_impl",
                    factory=f"{adapter}:make_forward_impl")
    assert site_set_0_23.sites[1].role == "layer", site_set_0_23.sites
    carried = carried_over(
        site_set_0_23,
        ("0.13",),
        moved={_F23: _FM},
        signatures={
            f"{_CM}MoECommMethod.fused_experts": _FUSED_EXPERTS_0_13,
            f"{_CM}FusedMC2CommImpl.fused_experts": _FUSED_EXPERTS_0_13,
            f"{_TD}TokenDispatcherWithAll2AllV.token_combine":
                "(self, hidden_states, context_metadata, bias=…)",
            f"{_TD}TokenDispatcherWithAllGather.token_combine":
                "(self, hidden_states, context_metadata, bias=…)",
            f"{_FM}AscendUnquantizedFusedMoEMethod.apply":
                "(self, layer, x, use_grouped_topk, top_k, router_logits, renormalize, "
                "topk_group=…, num_expert_group=…, custom_routing_function=…, scoring_func=…, "
                "routed_scaling_factor=…, e_score_correction_bias=…, global_num_experts=…, "
                "expert_map=…, apply_router_weight_on_input=…, enable_force_load_balance=…, "
                "**kwargs)",
        },
        dropped=frozenset({
            # The 0.18/0.23 pipeline's stage dataclasses and device adaptor: not in 0.13.0.
            f"{_FUSED_MOE}.moe_stage_contracts:MoEFusedExpertsInput",
            f"{_FUSED_MOE}.moe_stage_contracts:MoETokenDispatchInput",
            f"{_FUSED_MOE}.moe_stage_contracts:MoEPrepareOutput",
            f"{_FUSED_MOE}.moe_stage_contracts:MoEAllToAllCombineMetadata",
            "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_init_routing",
            "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_token_unpermute",
            "vllm_ascend.ascend_forward_context:_EXTRA_CTX",
            f"{_F23}AscendFusedMoE.__init__",
            # Patched here (the sites below), not only relied on.
            f"{_TD}TokenDispatcherWithAll2AllV.token_dispatch",
            f"{_TD}TokenDispatcherWithAllGather.token_dispatch",
            f"{_CM}MoECommMethod.fused_experts",
            # 0.23's quantized path: 0.13.0 has the wrapper and registry elsewhere (added
            # below), no QuantType and no stage params.
            f"{_FUSED_MOE}.moe_stage_params:MoERoutingParams",
            "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod",
            "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod.apply",
            "vllm_ascend.quantization.methods.registry:_SCHEME_REGISTRY",
            "vllm_ascend.quantization.quant_type:QuantType",
            # FUSED_MC2 is switched by VLLM_ASCEND_ENABLE_FUSED_MC2 in 0.13.0, for
            # w8a8_dynamic models only (w8a8_fused_mc2_env below).
            "vllm_ascend.ascend_config:get_ascend_config",
            f"{_FUSED_MOE}.moe_runtime_args:build_fused_experts_input",  # no MoE LoRA there
        }),
        added=(
            Interface(
                f"{_TD}TokenDispatcherWithAll2AllV", None,
                "the step's path is its dispatcher's class (the comm method is on vLLM's "
                "forward context, ascend_forward_context.py:57-62)",
            ),
            Interface(f"{_TD}TokenDispatcherWithAllGather", None, "the all-gather path"),
            Interface(
                f"{_QC}AscendFusedMoEMethod", None,
                "the wrapper of every quantized MoE scheme (quant_method = the scheme); apply "
                "forwards to the scheme's apply, which ends in fused_experts",
            ),
            Interface(
                f"{_QC}AscendFusedMoEMethod.apply",
                "(self, layer, x, router_logits, top_k, renormalize, use_grouped_topk=…, "
                "global_num_experts=…, expert_map=…, topk_group=…, num_expert_group=…, "
                "custom_routing_function=…, scoring_func=…, routed_scaling_factor=…, "
                "e_score_correction_bias=…, is_prefill=…, enable_force_load_balance=…, "
                "log2phy=…, global_redundant_expert_num=…, **kwargs)",
                "forwards to the scheme (quant_config.py:551-570)",
                key="AscendFusedMoEMethod_apply",
            ),
            Interface(
                "vllm_ascend.quantization.utils:ASCEND_QUANTIZATION_METHOD_MAP", None,
                "scheme name -> {layer type: class}: names the layer's scheme",
            ),
            Interface(
                "vllm_ascend.envs:env_variables", None,
                "VLLM_ASCEND_ENABLE_FUSED_MC2 (refused with drops on A3 for W8A8_DYNAMIC "
                "layers): 1 makes every step of a w8a8_dynamic model FUSED_MC2 when EP <= 32 "
                "(ascend_forward_context.py:258-275)",
                key="w8a8_fused_mc2_env",
            ),
            Interface(
                f"{_FM}AscendFusedMoE.__init__", "(self, *args, **kwargs)",
                "sets global_num_experts and local_num_experts = the experts its expert_map "
                "holds (fused_moe.py:212-218): the EP rank of each physical id",
            ),
        ),
    )
    carried = replace(carried, reads=tuple(
        a for a in carried.reads if not a.target.startswith(_NOT_READ_ON_0_13)) + (
        Attribute(f"{_TD}TokenDispatcherWithAll2AllV.num_out_tokens",
                  "rows the permute keeps: set by _preprocess (token_dispatcher.py:543), "
                  "lowered to the rows sent"),
        Attribute(f"{_QC}AscendFusedMoEMethod.quant_method", "the layer's scheme object"),
    ))
    sites = (
        layer,
        Site(f"{_TD}TokenDispatcherWithAll2AllV.token_dispatch", _TOKEN_DISPATCH,
             f"{adapter}:make_token_dispatch", role="main"),
        Site(f"{_TD}TokenDispatcherWithAllGather.token_dispatch", _TOKEN_DISPATCH,
             f"{adapter}:make_token_dispatch", role="allgather_dispatch"),
        Site(f"{_TD}TokenDispatcherWithMC2.token_dispatch", _TOKEN_DISPATCH,
             f"{adapter}:make_token_dispatch", role="mc2_dispatch"),
        Site(f"{_TD}TokenDispatcherWithAll2AllV._preprocess", "(self, topk_ids)",
             f"{adapter}:make_all_to_all_preprocess", role="a2a_count"),
        Site(f"{_TD}TokenDispatcherWithAll2AllV._dispatch_preprocess",
             "(self, hidden_states, topk_ids)",
             f"{adapter}:make_all_to_all_dispatch_preprocess", role="a2a_permute"),
        Site(f"{_TD}TokenDispatcherWithAll2AllV._combine_postprocess",
             "(self, permutated_local_input_tokens, context_metadata)",
             f"{adapter}:make_all_to_all_combine_postprocess", role="a2a_combine"),
        # moe_comm_method.py:28, 147: a rank that received zero rows does not hand the
        # quantized MLP ops an empty input (undocumented in CANN).
        Site(f"{_CM}unified_apply_mlp", _UNIFIED_APPLY_MLP,
             f"{adapter}:make_unified_apply_mlp", role="quant_mlp_zero_rows"),
        # moe_comm_method.py:73, 96: overflow: reroute keeps the router logits prepare hands
        # on, and the log2phy fused_experts maps the ids with (token_dispatch is not told).
        Site(f"{_CM}MoECommMethod.prepare",
             "(self, hidden_states, router_logits, enable_shared_expert_dp=…, "
             "replace_allreduce=…, quant_type=…)",
             f"{adapter}:make_prepare", role="router_scores"),
        Site(f"{_CM}MoECommMethod.fused_experts", _FUSED_EXPERTS_0_13,
             f"{adapter}:make_fused_experts", role="reroute_log2phy"),
    )
    return replace(carried, sites=sites, quantized_layers=tuple(
        s for s in site_set_0_23.quantized_layers or () if s in _MOE_SCHEMES_0_13))
