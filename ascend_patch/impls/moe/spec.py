"""Catalog entry of `moe.capacity` (light: pydantic, the catalog and the options only).

What is replaced in vLLM 0.32 and why (details, with file:line, in docs/vllm-moe-internals.md):

* `UnquantizedFusedMoEMethod.apply(self, layer, x, topk_weights, topk_ids, shared_experts,
  shared_experts_input)` (unquantized_fused_moe_method.py:283). This is the one call every
  unquantized fused-MoE layer makes per forward, from `RoutedExperts.forward_modular`
  (routed_experts.py:1374), right after `MoERunner._apply_quant_method` ran vLLM's own router
  (runner/moe_runner.py:629) and before the modular kernel's prepare (the DP/EP dispatch). So
  it sees the router output of this rank's own tokens, which is where a drop must be decided
  (before any all-to-all). The replacement plans the drops with `plan_drops`, writes them into
  the router output (dropped row: id -1, weight 0) and calls the original `apply`, so the
  modular kernel, the shared experts and the DP dispatch/combine stay vLLM's own code.

* `UnquantizedFusedMoEMethod.process_weights_after_loading(self, layer)`
  (unquantized_fused_moe_method.py:220). On CPU the original ends in
  `CPUUnquantizedExperts.process_weights_after_loading` (experts/cpu_moe.py:208), which pads
  the intermediate size and prepacks w13/w2 into the CPU grouped-gemm layout
  (`cpu_prepack_moe_weight`), and the CPU kernel `cpu_fused_moe` ignores `expert_map`
  (TP + --enable-expert-parallel segfaults). The replacement swaps the method's experts class
  for our capacity experts before the kernel is built: the layer keeps the standard
  [E_local, 2I, H] / [E_local, H, I] layout (no second copy of the weights, the prepack never
  runs) and the experts compute with the `torch`/`npu` backend, honouring `expert_map` and
  skipping dropped rows. Backends whose weight layout or activation format we cannot read
  (MoonEP, TPU, out-of-tree, XPU, batched formats, biased/LoRA MoE, non-silu) keep the
  original path and are counted as not taken over.

Only unquantized MoE is covered: quantized methods (Fp8MoEMethod, ...) have their own
`apply`, and vllm-ascend's `AscendUnquantizedFusedMoEMethod` overrides `apply` too.
"""

from __future__ import annotations

from ascend_patch.core.catalog import Implementation, Site
from ascend_patch.impls.moe.options import CapacityOptions

_METHOD = (
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.UnquantizedFusedMoEMethod"
)

IMPLEMENTATIONS = {
    "moe.capacity": Implementation(
        name="moe.capacity",
        summary=(
            "Capacity-aware unquantized fused MoE: drop up to a ratio r of the routed "
            "(token, expert) rows so the most loaded EP rank/expert is capped at the water "
            "level; computes only local experts (expert_map honoured)."
        ),
        why=(
            "With expert parallelism the most loaded EP rank sets every MoE layer's step "
            "time (vllm-ascend PR #1067 capped it for 10-15% prefill). vLLM 0.32 never drops. "
            "Replaces UnquantizedFusedMoEMethod.apply (plans drops on vLLM's own router output, "
            "before the DP/EP dispatch, then calls the original so shared experts and the "
            "modular kernel's prepare/finalize stay vLLM's) and "
            "UnquantizedFusedMoEMethod.process_weights_after_loading (swaps the modular "
            "kernel's experts for ours so weights keep the standard layout instead of the CPU "
            "grouped-gemm prepack, and expert_map is honoured: stock CPU TP+EP segfaults). "
            "r=0 keeps every row."
        ),
        vllm_versions=">=0.32,<0.33",
        sites=(
            # unquantized_fused_moe_method.py:283; called by RoutedExperts.forward_modular
            # (routed_experts.py:1374) after the runner's router.select_experts.
            Site(
                target=f"{_METHOD}.apply",
                signature=(
                    "(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)"
                ),
                factory="ascend_patch.impls.moe.vllm_glue:make_apply",
                role="main",
            ),
            # unquantized_fused_moe_method.py:220; runs once per layer after loading, before
            # the first forward. Must be patched together with `apply`.
            Site(
                target=f"{_METHOD}.process_weights_after_loading",
                signature="(self, layer)",
                factory="ascend_patch.impls.moe.vllm_glue:make_process_weights_after_loading",
                role="weights",
            ),
        ),
        options=CapacityOptions,
        platforms=("cpu", "cuda"),
    ),
}
