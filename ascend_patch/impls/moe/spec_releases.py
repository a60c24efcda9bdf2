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

from ascend_patch.core.catalog import Interface, SiteSet

_FUSED_MOE = "vllm_ascend.ops.fused_moe"
_F23 = f"{_FUSED_MOE}.fused_moe_0_23_0:"
_FM = f"{_FUSED_MOE}.fused_moe:"


def carried_over(
    site_set: SiteSet,
    lines: tuple[str, ...],
    *,
    moved: dict[str, str],
    signatures: dict[str, str | None],
    dropped: frozenset[str],
    added: tuple[Interface, ...] = (),
) -> SiteSet:
    """`site_set` for other lines: targets renamed (`moved`: old prefix or target -> new),
    signatures replaced (by new target), interfaces left out (by old target), some added.
    Sites are never dropped: a site set without one of its sites is a different design."""

    def target(old: str) -> str:
        for prefix, new in moved.items():
            if old.startswith(prefix):
                return new + old[len(prefix):]
        return old

    def edited(entry):
        new = target(entry.target)
        return replace(entry, target=new, signature=signatures.get(new, entry.signature))

    unused = dropped - {i.target for i in site_set.relies_on}
    if unused:
        raise ValueError(f"carried_over drops interfaces the site set does not have: {unused}")
    return replace(
        site_set,
        lines=lines,
        sites=tuple(edited(s) for s in site_set.sites),
        relies_on=tuple(edited(i) for i in site_set.relies_on if i.target not in dropped)
        + added,
    )


def ascend_0_18(site_set_0_23: SiteSet) -> SiteSet:
    """vllm-ascend 0.18.0's site set, from 0.23.0.post1's."""
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
        },
        dropped=frozenset({
            # torch_npu's own op there (token_dispatcher.py:381), not a vllm-ascend symbol.
            "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_token_unpermute",
            # FUSED_MC2 is switched by the environment in 0.18.0 (env_variables below).
            "vllm_ascend.ascend_config:get_ascend_config",
        }),
        added=(
            Interface(
                "vllm_ascend.envs:env_variables", None,
                "VLLM_ASCEND_ENABLE_FUSED_MC2 (refused with drops on A3): 1 makes every step "
                "FUSED_MC2 when EP <= 32 (ascend_forward_context.py:248-272)",
            ),
        ),
    )


def ascend_0_13_pending() -> SiteSet:
    """vllm-ascend 0.13.0: no site set yet (its hook points differ, see the docstring above)."""
    return SiteSet(
        lines=("0.13",),
        platform="ascend",
        unsupported="vllm-ascend 0.13.0 has no build_token_dispatch_input between log2phy and "
        "its dispatchers (moe_comm_method.py:130-145): its site set is not written yet",
    )
