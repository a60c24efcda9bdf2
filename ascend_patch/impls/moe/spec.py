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

All-to-all dispatch (option `dispatch`, module all_to_all_dispatch.py). With DP > 1 and EP,
vLLM builds `MoEPrepareAndFinalizeNaiveDPEPModular` (all2all_utils.py:209-221, 399-403): an
all-gather of every token to every EP rank and a reduce-scatter of the full output
(naive_dp_ep.py:181, :241), whatever was dropped. `dispatch: all_to_all` (what `auto` picks
for DP > 1 + EP) replaces that prepare/finalize, for our layers only, by
`CapacityAllToAllPrepareAndFinalize`: prepare sends each token's hidden state once to every
EP rank owning one of its kept rows (id >= 0), with a 12-byte record per row, by
`all_to_all_uneven` on the EP group; finalize sends one weighted, summed row per (token, rank)
back and sums them per token. Hook chosen: the `weights` site above, after the original has built the
kernel, rebuilds it as `FusedMoEKernel(our prepare/finalize, the same CapacityExperts)`
(modular_kernel.py:1613). No new patch site, because:
  * only layers whose experts are CapacityExperts may get it (the combine relies on their
    weighted, already reduced output and on expert_map-aware compute); patching
    `maybe_make_prepare_finalize` (all2all_utils.py:182) would hand it to every MoE method of
    the process (quantized, monolithic) and would need the EP facts at a point that does
    not know the experts class;
  * `maybe_make_prepare_finalize` is imported by name into oracle/*.py and quantization
    methods, so it would need copy patching, and it is one more signature to track;
  * the kernel is built once per layer (unquantized_fused_moe_method.py:197-205) and the
    runner reads `method.moe_kernel` on every call, so replacing it right after the build is
    safe. `output_is_reduced()` stays False: the runner's TP all-reduce
    (runner/moe_runner.py:483-517) is a no-op at TP = 1 and sums the per-TP-rank token
    slices otherwise, so no token is counted twice; shared experts stay the runner's.
The first plan call of a process also runs `check_same_config` over the EP group.

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
            "r=0 keeps every row. With DP>1 and EP (dispatch: auto/all_to_all) the "
            "modular kernel's prepare/finalize becomes an all-to-all of the kept rows only "
            "(dropped rows are never sent), replacing vLLM's all-gather/reduce-scatter."
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
