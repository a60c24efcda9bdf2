"""Catalog entry of `moe.capacity` (light: pydantic, the catalog and the options only).

Site sets: vLLM 0.23, 0.32 and 0.33, and 0.34 on vLLM's own platforms (CPU, CUDA), and
vllm-ascend 0.23.0.post1 (adapters/ascend_0_23.py says what is replaced there and why). 0.33
and 0.34 patch the same methods with the same signatures as 0.32 (read from their wheels);
0.34 has its own set because it moved the batched-format flag to
`FusedMoEConfig.activation_format` and added DeepEP v2's PaddedStandard format and MoNE
expert substitution, which the adapter refuses per layer. What is replaced in vLLM 0.32 and
why (details, with file:line, in docs/explanation/vllm-moe-internals.md):

* `UnquantizedFusedMoEMethod.apply(self, layer, x, topk_weights, topk_ids, shared_experts,
  shared_experts_input)` (unquantized_fused_moe_method.py:283). This is the one call every
  unquantized fused-MoE layer makes per forward, from `RoutedExperts.forward_modular`
  (routed_experts.py:1374), right after `MoERunner._apply_quant_method` ran vLLM's own router
  (runner/moe_runner.py:629) and before the modular kernel's prepare (the DP/EP dispatch). So
  it sees the router output of this rank's own tokens, which is where a drop must be decided
  (before any all-to-all). The replacement plans the drops with `plan_drops`, writes them into
  the router output (dropped row: id -1, weight 0) and calls the original `apply`, so the
  modular kernel, the shared experts and the DP dispatch/combine stay vLLM's own code. On
  CUDA (Triton experts) it calls the layer's kernel as the original's forward does, with the
  ids and expert_map of adapters/triton_route.py, so that the kernel skips dropped rows.

* `UnquantizedFusedMoEMethod.process_weights_after_loading(self, layer)`
  (unquantized_fused_moe_method.py:220). On CPU the original ends in
  `CPUUnquantizedExperts.process_weights_after_loading` (experts/cpu_moe.py:208), which pads
  the intermediate size and prepacks w13/w2 into the CPU grouped-gemm layout
  (`cpu_prepack_moe_weight`), and the CPU kernel `cpu_fused_moe` ignores `expert_map`
  (TP + --enable-expert-parallel segfaults). The replacement swaps the method's experts class
  before the kernel is built: on the CPU backend (option `backend` auto or vllm_cpu) for a
  subclass of the CPU experts class vLLM chose, whose prepack runs as vLLM's and whose
  `apply` hands vLLM's only the kept rows of local experts (adapters/vllm_cpu_experts.py);
  with `backend: torch` (and on Triton's mask path) for our capacity experts on the standard
  [E_local, 2I, H] / [E_local, H, I] layout (the prepack never runs). Either way no second
  copy of the weights, `expert_map` honoured, dropped rows skipped. Backends whose weight
  layout or activation format we cannot read (MoonEP, TPU, out-of-tree, XPU, batched formats,
  biased/LoRA MoE, non-silu) keep the original path and are counted as not taken over.

All-to-all dispatch (option `dispatch`, module transport/all_to_all_dispatch.py). With DP > 1
and EP, vLLM builds `MoEPrepareAndFinalizeNaiveDPEPModular` (all2all_utils.py:209-221, 399-403): an
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

vLLM 0.23 has the same modular-kernel interfaces (declared below as relied-on, checked by
the loader and `validate`), but its CPU backend is a monolithic kernel that routes by itself:
adapters/vllm_0_23_cpu_monolithic.py takes over `apply_monolithic` there (a third site).

Quantized MoE on vLLM 0.32: W8A8 int8 (online `experts_int8` and compressed-tensors) on CPU,
adapters/vllm_int8_cpu.py (three more sites, below). Other quantized methods (Fp8MoEMethod,
...) have their own `apply` and keep every row.
"""

from __future__ import annotations

import dataclasses

from ascend_patch.core.catalog import (
    Attribute,
    Implementation,
    Interface,
    Site,
    SiteSet,
    ascend_only_lines,
    no_ascend_release,
)
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.schemes import ASCEND_0_23_MOE_SCHEMES
from ascend_patch.impls.moe.spec_releases import ascend_0_13, ascend_0_18

_FM = "vllm.model_executor.layers.fused_moe"
_METHOD = f"{_FM}.unquantized_fused_moe_method:UnquantizedFusedMoEMethod"
_MK = f"{_FM}.modular_kernel"
_MODULAR = "ascend_patch.impls.moe.adapters.vllm_modular"
_CPU_0_23 = "ascend_patch.impls.moe.adapters.vllm_0_23_cpu_monolithic"
_ASCEND_0_23 = "ascend_patch.impls.moe.adapters.ascend_0_23"
_FUSED_MC2 = "ascend_patch.impls.moe.adapters.ascend_fused_mc2"


def _apply_site() -> Site:
    # 0.32 unquantized_fused_moe_method.py:283, 0.23 :284; called by the runner right after
    # its router.select_experts (0.32 routed_experts.py:1374, 0.23 runner/moe_runner.py:532).
    return Site(
        target=f"{_METHOD}.apply",
        signature="(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)",
        factory=f"{_MODULAR}:make_apply",
        role="main",
    )


def _weights_site(factory: str) -> Site:
    # Runs once per layer after loading, before the first forward (0.32 :220, 0.23 :204).
    return Site(
        target=f"{_METHOD}.process_weights_after_loading",
        signature="(self, layer)",
        factory=factory,
        role="weights",
    )


_WORKERS = {"cpu": ("cpu_worker", "CPUWorker"), "gpu": ("gpu_worker", "Worker")}


def _warmup_sites(*devices: str) -> tuple[Site, ...]:
    # vLLM's start-up warm-up on dummy data, counted apart from serving (vllm_warmup.py):
    # the memory profile and the compile warm-up of the CPU worker (0.32 cpu_worker.py:204,
    # :264; 0.23 :169, :228), which overrides both, and of the GPU worker (0.32
    # gpu_worker.py:634, :908; 0.23 :372, :592; 0.33 :641, :933; 0.34 :673, :1017).
    # Optional: only workers import them.
    return tuple(
        Site(target=f"vllm.v1.worker.{_WORKERS[device][0]}:{_WORKERS[device][1]}.{method}",
             signature="(self)",
             factory="ascend_patch.impls.moe.adapters.vllm_warmup:make_warmup",
             role=f"warmup_{device}_{step}", optional=True)
        for device in devices
        for method, step in (("determine_available_memory", "profile"),
                             ("compile_or_warm_up_model", "compile"))
    )


# What the vLLM adapter calls, subclasses or reads without patching it
# (adapters/vllm_modular.py, transport/all_to_all_dispatch.py), the same on 0.23 and 0.32.
# The adapters reach each as ctx.upstream.<key> (the target's last name unless key= says).
_MODULAR_INTERFACES = (
    Interface(f"{_MK}:FusedMoEExpertsModular", None, "CapacityExperts subclasses it"),
    Interface(f"{_MK}:FusedMoEPrepareAndFinalizeModular", None,
              "the all-to-all prepare/finalize subclasses it"),
    Interface(f"{_MK}:FusedMoEKernel", None,
              "the all-to-all kernel subclasses it and runs its apply eagerly"),
    Interface(f"{_MK}:FusedMoEActivationFormat", None,
              "Standard: the format our experts and prepare/finalize take"),
    Interface(
        f"{_MK}:FusedMoEExpertsModular.apply",
        "(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, "
        "global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2, "
        "expert_tokens_meta, apply_router_weight_on_input)",
        "CapacityExperts implements it; the modular kernel calls it",
    ),
    Interface(
        f"{_MK}:FusedMoEExpertsModular.workspace_shapes",
        "(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, "
        "activation)",
        "CapacityExperts implements it",
    ),
    Interface(
        f"{_MK}:FusedMoEPrepareAndFinalizeModular.prepare",
        "(self, a1, topk_weights, topk_ids, num_experts, expert_map, "
        "apply_router_weight_on_input, quant_config, defer_input_quant)",
        "the all-to-all dispatch implements it",
    ),
    Interface(
        f"{_MK}:FusedMoEPrepareAndFinalizeModular.finalize",
        "(self, output, fused_expert_output, topk_weights, topk_ids, "
        "apply_router_weight_on_input, weight_and_reduce_impl)",
        "the all-to-all combine implements it",
    ),
    Interface(
        f"{_MK}:FusedMoEKernel.__init__",
        "(self, prepare_finalize, fused_experts)",
        "the all-to-all dispatch rebuilds the layer's kernel",
    ),
    Interface(
        f"{_MK}:FusedMoEKernel.apply",
        "(self, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, "
        "expert_map, apply_router_weight_on_input, shared_experts=…, shared_experts_input=…)",
        "the all-to-all kernel overrides it with its custom op and runs the original inside",
    ),
    Interface(
        f"{_FM}.topk_weight_and_reduce:TopKWeightAndReduceNoOP",
        None,
        "CapacityExperts reduce their output themselves",
    ),
    Interface(
        f"{_FM}.oracle.unquantized:UnquantizedMoeBackend",
        None,
        "which backends are taken over (CPU, TRITON)",
    ),
    Interface("vllm.distributed:get_ep_group", "()", "the cross-rank config check"),
    Interface("vllm.distributed:get_dp_group", "()", "per-expert counts are all-gathered over DP"),
    Interface(
        "vllm.config.vllm:get_current_vllm_config_or_none",
        "()",
        "all_to_all is refused under CUDA graphs",
    ),
    Interface("vllm.config:CUDAGraphMode", None,
              "NONE: the compilation config captures no CUDA graph"),
    Interface("vllm.platforms:current_platform", None,
              "is_cpu(): the CPU platform never captures graphs"),
)

# vLLM 0.32's W8A8 int8 MoE (adapters/vllm_int8_cpu.py: which methods lead there and why the
# CPU int8 experts are replaced). Sites and what they rely on, 0.32 file:line. Optional: only
# int8 models import these modules (an unquantized run never does, and is applied without).
_INT8 = "ascend_patch.impls.moe.adapters.vllm_int8_cpu"
_QUANT = "vllm.model_executor.layers.quantization"
_INT8_APPLY_SIGNATURE = (
    "(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)"
)
_INT8_SITES = (
    # oracle/int8.py:103, called by both int8 methods' __init__ (imported by name there:
    # the patcher rebinds those copies).
    Site(
        target=f"{_FM}.oracle.int8:select_int8_moe_backend",
        signature="(config, weight_key=…, activation_key=…)",
        factory=f"{_INT8}:make_select_int8_moe_backend",
        role="int8_select",
        optional=True,
    ),
    # online/moe_base.py:169: Int8OnlineMoEMethod's apply (shared by every online MoE method;
    # only layers whose experts are ours drop).
    Site(
        target=f"{_QUANT}.online.moe_base:OnlineMoEMethodBase.apply",
        signature=_INT8_APPLY_SIGNATURE,
        factory=f"{_INT8}:make_apply",
        role="int8_apply_online",
        optional=True,
    ),
    # compressed_tensors_moe_w8a8_int8.py:248.
    Site(
        target=f"{_QUANT}.compressed_tensors.compressed_tensors_moe."
        "compressed_tensors_moe_w8a8_int8:CompressedTensorsW8A8Int8MoEMethod.apply",
        signature=_INT8_APPLY_SIGNATURE,
        factory=f"{_INT8}:make_apply",
        role="int8_apply_compressed_tensors",
        optional=True,
    ),
)
_INT8_INTERFACES = (
    Interface(f"{_FM}.oracle.int8:Int8MoeBackend", None,
              "CPU: the backend our selection reports (no weight conversion for it)"),
    Interface(f"{_QUANT}.utils.quant_utils:kInt8StaticChannelSym", None,
              "the weight key of the W8A8 scheme the int8 experts compute"),
    Interface(f"{_QUANT}.utils.quant_utils:kInt8DynamicTokenSym", None,
              "the activation key of that scheme"),
    Interface(
        f"{_FM}.experts.cpu_moe:CPUExpertsInt8.apply",
        "(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, "
        "global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2, "
        "expert_tokens_meta, apply_router_weight_on_input)",
        "the experts replaced: fused_experts_cpu INT8_W8A8, whose arithmetic "
        "experts/int8_backend.py reproduces",
        key="CPUExpertsInt8_apply",
    ),
    Interface(
        f"{_QUANT}.online.int8:Int8OnlineMoEMethod.process_weights_after_loading",
        "(self, layer)",
        "quantises per channel, builds the kernel, then calls our experts' "
        "process_weights_after_loading (layer registration)",
        key="Int8OnlineMoEMethod_process_weights",
    ),
)

# What the vLLM adapter reads on the objects vLLM hands it, or overrides in its subclasses
# (checks/attribute_audit.py requires each to be declared; `validate --source` finds each).
_PARALLEL = f"{_FM}.config:FusedMoEParallelConfig"
_MOE_CONFIG = f"{_FM}.config:FusedMoEConfig"
_GROUP = "vllm.distributed.parallel_state:GroupCoordinator"
_EXPERTS_OVERRIDES = tuple(
    Attribute(f"{_MK}:FusedMoEExpertsModular.{name}", "CapacityExperts overrides it")
    for name in (
        "activation_format", "expects_unquantized_inputs", "process_weights_after_loading",
        "finalize_weight_and_reduce_impl", "_supports_current_device",
        "_supports_no_act_and_mul", "_supports_quant_scheme", "_supports_activation",
        "_supports_parallel_config", "_supports_routing_method",
        "_supports_router_logits_dtype",
    )
)
_MODULAR_READS = _EXPERTS_OVERRIDES + (
    Attribute(f"{_MK}:FusedMoEActivationFormat.Standard", "our experts' activation format"),
    Attribute(f"{_MK}:FusedMoEKernel.fused_experts", "the all-to-all kernel keeps the experts"),
    Attribute(f"{_FM}.oracle.unquantized:UnquantizedMoeBackend.CPU", "taken over"),
    Attribute(f"{_FM}.oracle.unquantized:UnquantizedMoeBackend.TRITON", "taken over (mask)"),
    Attribute(f"{_METHOD}.moe", "the layer's FusedMoEConfig"),
    Attribute(f"{_METHOD}.unquantized_backend", "which backends are taken over"),
    Attribute(f"{_METHOD}.experts_cls", "replaced by CapacityExperts before the kernel build"),
    Attribute(f"{_METHOD}.moe_kernel", "rebuilt with the all-to-all prepare/finalize"),
    Attribute(f"{_MOE_CONFIG}.moe_parallel_config", "EP/DP facts"),
    Attribute(f"{_MOE_CONFIG}.has_bias", "biased experts are refused"),
    Attribute(f"{_MOE_CONFIG}.is_lora_enabled", "MoE LoRA is refused"),
    Attribute(f"{_MOE_CONFIG}.is_act_and_mul", "non-gated activations are refused"),
    *(Attribute(f"{_PARALLEL}.{name}", "EP/DP/TP layout of the drop step and the dispatch")
      for name in ("tp_size", "tp_rank", "dp_size", "dp_rank", "ep_size", "ep_rank",
                   "pcp_size", "use_ep", "enable_eplb", "is_sequence_parallel")),
    # adapters/triton_route.py: whether the Triton path's all-to-all leaves id -1 rows out.
    Attribute(f"{_PARALLEL}.all2all_backend", "which dispatch a Triton layer's rows take"),
    Attribute(f"{_PARALLEL}.use_all2all_kernels", "no all-to-all kernels: expert_map route"),
    # The Triton path calls the kernel with the layer's weights, as forward_native does.
    *(Attribute(f"{_METHOD}.{name}", "create_weights registers it on the layer")
      for name in ("w13_weight", "w2_weight")),
    *(Attribute(f"{_GROUP}.{name}", "the EP/DP group: counts all-gather, config check")
      for name in ("all_gather", "rank_in_group", "world_size", "cpu_group", "device_group")),
    Attribute("vllm.config.vllm:VllmConfig.compilation_config", "CUDA-graph mode"),
    Attribute("vllm.config.compilation:CompilationConfig.cudagraph_mode",
              "all_to_all is refused while graphs are captured"),
    Attribute("vllm.config:CUDAGraphMode.NONE", "no graph captured"),
    Attribute("vllm.platforms.interface:Platform.is_cpu", "the CPU platform never captures"),
)


# vLLM 0.32's CPU experts (adapters/vllm_cpu_experts.py): subclassed for a taken-over CPU
# layer, so that vLLM's prepack and kernel compute the kept rows (experts/cpu_moe.py:85-300).
_CPU_EXPERTS = f"{_FM}.experts.cpu_moe:CPUUnquantizedExperts"
_CPU_EXPERTS_INTERFACES = (
    Interface(_CPU_EXPERTS, None,
              "the class (or ISA variant) vLLM chose for a CPU layer: subclassed"),
    Interface(
        f"{_CPU_EXPERTS}.apply",
        "(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, "
        "global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2, "
        "expert_tokens_meta, apply_router_weight_on_input)",
        "called per group of tokens with local ids only (cpu_fused_moe at its isa)",
        key="CPUUnquantizedExperts_apply",
    ),
    Interface(
        f"{_CPU_EXPERTS}.process_weights_after_loading", "(self, layer)",
        "pads the intermediate size and prepacks w13/w2 in place; the subclass calls it",
        key="CPUUnquantizedExperts_process_weights",
    ),
)
_CPU_EXPERTS_READS = (
    # and FusedMoEConfig.activation (declared with the int8 reads)
    Attribute(f"{_MK}:FusedMoEExperts.moe_config", "the layer's activation, for vLLM's apply"),
)


# What adapters/vllm_int8_cpu.py reads on 0.32's int8 objects (only that line takes them over).
_INT8_CT = (f"{_QUANT}.compressed_tensors.compressed_tensors_moe."
            "compressed_tensors_moe_w8a8_int8:CompressedTensorsW8A8Int8MoEMethod")
_INT8_READS = (
    Attribute(f"{_MOE_CONFIG}.moe_backend", "an explicit --moe-backend keeps vLLM's experts"),
    Attribute(f"{_MOE_CONFIG}.activation", "silu only"),
    *(Attribute(f"{_MK}:FusedMoEExperts.{name}", "the int8 experts' per-channel scales")
      for name in ("w1_scale", "w2_scale")),
    Attribute(f"{_FM}.routed_experts:RoutedExperts.quant_method",
              "the int8 method whose kernel gets the all-to-all dispatch"),
    *(Attribute(f"{method}.moe_kernel", "its experts tell whether the layer is ours")
      for method in (f"{_QUANT}.online.int8:Int8OnlineMoEMethod", _INT8_CT)),
)

_LAYER_NAMES = ("layer_name", "moe_config", "expert_map", "expert_placement_strategy",
                "global_num_experts", "activation", "swiglu_limit")


def _layer_reads(layer_cls: str, *extra: str) -> tuple[Attribute, ...]:
    """What the adapter reads on the MoE layer (0.23 layer:FusedMoE, 0.32+ RoutedExperts)."""
    return tuple(
        Attribute(f"{_FM}.{layer_cls}.{name}", "read on the MoE layer")
        for name in _LAYER_NAMES + extra
    )


# Clamped/scaled SwiGLU, refused where set; 0.23 has neither (read with a default: None).
_SWIGLU_0_32 = ("swiglu_alpha", "swiglu_beta")

# 0.23 to 0.33: the batched formats are flagged on the parallel config.
_BATCHED_FLAG = Attribute(f"{_PARALLEL}.use_batched_activation_format",
                          "batched formats (DeepEP LL, NIXL EP) are refused")
# 0.34 moved it to FusedMoEConfig.activation_format (fused_moe/config.py:1468), which also
# names DeepEP v2's PaddedStandard (modular_kernel.py:117-140); `make_moe_kernel`
# (oracle/base.py:241) refuses experts that are not a superset of the P/F's format. The
# adapter tests `"activation_format" in ctx.upstream` to choose how to read it.
_INTERFACES_0_34 = (
    Interface(f"{_MOE_CONFIG}.activation_format", None,
              "anything but Standard (BatchedExperts, PaddedStandard) is refused"),
    Interface(f"{_FM}.expert_substitution:SubstitutedRoutedExperts", None,
              "MoNE-substituted layers are refused: substituted routes reach apply as load "
              "on expert 0 (expert_substitution.py:232-262)"),
)
_READS_0_34 = (
    Attribute(f"{_MK}:FusedMoEActivationFormat.BatchedExperts", "refused"),
    Attribute(f"{_MK}:FusedMoEActivationFormat.PaddedStandard", "refused (DeepEP v2)"),
)

# vLLM 0.23's CPU backend (adapters/vllm_0_23_cpu_monolithic.py).
_CPU_0_23_INTERFACES = (
    Interface(
        f"{_FM}.cpu_fused_moe:select_experts",
        "(hidden_states, router_logits, top_k, use_grouped_topk, renormalize, topk_group=…, "
        "num_expert_group=…, custom_routing_function=…, scoring_func=…, "
        "routed_scaling_factor=…, e_score_correction_bias=…)",
        "the CPU backend's own routing, called as its monolithic kernel does",
    ),
    Interface(
        f"{_FM}.oracle.unquantized:make_unquantized_moe_kernel",
        "(quant_config, moe_config, backend, experts_cls, routing_tables=…)",
        "builds the modular kernel the CPU backend lacks",
    ),
    Interface(
        "vllm.v1.worker.workspace:init_workspace_manager",
        "(device, num_ubatches=…)",
        "0.23 kernels allocate from the workspace manager, which CPU workers never set up",
    ),
    Interface(
        "vllm.v1.worker.workspace:is_workspace_manager_initialized", "()",
        "set it up once per process",
    ),
    # adapters/vllm_cpu_experts.py: vLLM's own prepack and kernel on the kept rows.
    Interface(f"{_FM}.cpu_fused_moe:CPUFusedMOE", None,
              "prepacks the layer's weights in place and picks the isa (cpu_fused_moe.py:228)"),
    Interface(f"{_FM}.cpu_fused_moe:CPUFusedMOE.check_grouped_gemm", "(self, layer)",
              "whether vLLM would run its grouped gemm on the layer, at which isa",
              key="CPUFusedMOE_check_grouped_gemm"),
    Interface("vllm._custom_ops:cpu_fused_moe",
              "(input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa, "
              "skip_weighted=…)",
              "the grouped-gemm kernel, handed only the kept rows of local experts"),
)

# What adapters/ascend_0_23.py reads on vllm-ascend's (and, under it, vLLM 0.23's) objects.
_VA_MOE = "vllm_ascend.ops.fused_moe"
_ASCEND_READS = (
    Attribute("vllm_ascend.utils:AscendDeviceType.A3", "fused MC2 runs on A3 only"),
    Attribute("vllm_ascend.ascend_config:AscendConfig.enable_fused_mc2",
              "refused with drops (every step FUSED_MC2)"),
    Attribute("vllm_ascend.ascend_forward_context:_ExtraForwardContextProxy.moe_comm_method",
              "the step's comm method (_EXTRA_CTX)"),
    Attribute(f"{_VA_MOE}.moe_comm_method:MoECommMethod.token_dispatcher",
              "its EP group and rank"),
    Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEFusedExpertsInput.lora_context",
              "MoE LoRA keeps every row"),
    Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEAllToAllCombineMetadata."
              "reversed_local_input_permutation_mapping", "one entry per routed row"),
    *(Attribute(f"{_VA_MOE}.fused_moe_0_23_0:AscendFusedMoE.{name}", "read on the MoE layer")
      for name in ("layer_name", "global_num_experts", "local_num_experts", "ep_size",
                   "quant_method")),
    # overflow: reroute: the logits prepare hands on, scored as the layer's router scores.
    Attribute(f"{_VA_MOE}.fused_moe_0_23_0:AscendFusedMoE.scoring_func",
              "softmax or sigmoid: how the router's logits become scores"),
    Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEPrepareOutput.router_logits",
              "the logits lined up with the tokens the step routes"),
    Attribute(f"{_GROUP}.cpu_group",
              "the config check runs on a GroupCoordinator's gloo group when given one"),
    # The zero-row guard of quantized MLP calls (ascend_0_23.make_apply_mlp).
    *(Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEMlpComputeInput.{name}",
                "a quantized MLP call that received no row is skipped")
      for name in ("hidden_states", "quant", "weights")),
    Attribute(f"{_VA_MOE}.moe_stage_params:MoEQuantParams.quant_type", "which scheme's dtype"),
    *(Attribute(f"vllm_ascend.quantization.quant_type:QuantType.{name}",
                "the schemes whose zero-row output dtype is known")
      for name in ("W8A8", "W4A8", "W4A16")),
    *(Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEWeights.{name}", "gmm2's output dtype")
      for name in ("w1_scale_bias", "w2_scale")),
    # The FUSED_MC2 row counter (ascend_fused_mc2.py).
    Attribute(f"{_VA_MOE}.moe_comm_method:MoECommMethod.moe_config", "local experts per rank"),
    Attribute(f"{_FM}.config:FusedMoEConfig.num_local_experts", "local experts per rank"),
    Attribute(f"{_VA_MOE}.moe_stage_contracts:MoEFusedExpertsInput.routing",
              "log2phy and the token mask of the step"),
    *(Attribute(f"{_VA_MOE}.moe_stage_params:MoERoutingParams.{name}",
                "physical ids, and which tokens the kernel sends")
      for name in ("log2phy", "mc2_mask")),
)
# 0.23.0.post1 passes ascend_config.mega_moe_max_tokens to the fused MC2 kernel (CM:321).
_MEGA_MOE_LIMIT = Attribute("vllm_ascend.ascend_config:AscendConfig.mega_moe_max_tokens",
                            "the row limit the fused MC2 kernel truncates at")

_CPU_0_23_READS = (
    Attribute(f"{_FM}.cpu_fused_moe:CPUFusedMOE.isa", "the isa the kernel is called at"),
    Attribute(f"{_METHOD}.moe_quant_config", "set before the kernel build, as the original does"),
    Attribute(f"{_METHOD}.get_fused_moe_quant_config", "the kernel's quant config (None)"),
    *(Attribute(f"{_FM}.layer:FusedMoE.{name}", "routing and weights of the CPU backend")
      for name in ("_expert_routing_tables", "top_k", "use_grouped_topk", "renormalize",
                   "quant_method",
                   "topk_group", "num_expert_group", "custom_routing_function", "scoring_func",
                   "routed_scaling_factor", "e_score_correction_bias",
                   "apply_router_weight_on_input")),
)

# The modular-kernel site sets of 0.32, 0.33 and 0.34: the same two sites, and the same reads
# on vLLM's RoutedExperts layer; each line adds what it alone has.
_MODULAR_SITES = (_apply_site(), _weights_site(f"{_MODULAR}:make_process_weights_after_loading"),
                  *_warmup_sites("gpu"))
# 0.32 router/fused_moe_router.py:48, called by MoERunner._apply_quant_method with the router
# logits (runner/moe_runner.py:628): with overflow: reroute the drop step runs here, where
# the scores of every expert are at hand (adapters/router_scores.py); else vLLM's own.
_ROUTER_SCORES_SITE = Site(
    target=f"{_FM}.router.fused_moe_router:FusedMoERouter.select_experts",
    signature="(self, hidden_states, router_logits, topk_indices_dtype=…, *, input_ids=…)",
    factory="ascend_patch.impls.moe.adapters.router_scores:make_select_experts",
    role="router_scores",
)
_ROUTED_READS = _MODULAR_READS + _layer_reads("routed_experts:RoutedExperts", *_SWIGLU_0_32)
# overflow: reroute on 0.32 (adapters/router_scores.py): each taken-over layer's router is
# found at load under its name in the compilation config (moe_runner.py:59 registers it).
_ROUTER_SCORES_READS = (
    Attribute("vllm.config.compilation:CompilationConfig.static_forward_context",
              "the MoE runner of a layer, by the layer's name"),
    Attribute(f"{_FM}.runner.moe_runner:MoERunner.router", "the layer's FusedMoERouter"),
    Attribute(f"{_FM}.routed_experts:RoutedExperts.scoring_func",
              "softmax or sigmoid: how the router's logits become scores"),
)

IMPLEMENTATIONS = {
    "moe.capacity": Implementation(
        name="moe.capacity",
        summary=(
            "Capacity-aware fused MoE: drop up to a ratio r of the routed (token, expert) rows "
            "so the most loaded EP rank/expert is capped at the water level; dropped rows are "
            "neither sent nor computed (CPU, CUDA Triton experts, vllm-ascend all-to-all and "
            "all-gather; unquantized, vLLM's CPU int8 and vllm-ascend's quantized schemes)."
        ),
        why=(
            "With expert parallelism the most loaded EP rank sets every MoE layer's step "
            "time (vllm-ascend PR #1067 capped it for 10-15% prefill). Neither vLLM nor "
            "vllm-ascend drops by a budget. The drop step runs on the router's output, before "
            "any dispatch; the platform adapter keeps dropped rows out of its dispatcher and "
            "experts. r=0 keeps every row."
        ),
        site_sets=(
            SiteSet(
                lines=("0.32",),
                sites=(*_MODULAR_SITES, *_INT8_SITES, *_warmup_sites("cpu"), _ROUTER_SCORES_SITE),
                relies_on=_MODULAR_INTERFACES + _INT8_INTERFACES + _CPU_EXPERTS_INTERFACES,
                reads=_ROUTED_READS + (_BATCHED_FLAG,) + _INT8_READS + _ROUTER_SCORES_READS
                + _CPU_EXPERTS_READS,
                # vLLM's --quantization names (plan matches a model's method against them).
                quantized_layers=("experts_int8", "compressed-tensors W8A8 int8"),
            ),
            # 0.33: the 0.32 sites without the int8 takeover (never run: no CPU build).
            SiteSet(
                lines=("0.33",),
                sites=_MODULAR_SITES,
                relies_on=_MODULAR_INTERFACES,
                reads=_ROUTED_READS + (_BATCHED_FLAG,),
                quantized_layers=(),
            ),
            # 0.34: same sites and interfaces (unquantized_fused_moe_method.py:264, :213).
            SiteSet(
                lines=("0.34",),
                sites=_MODULAR_SITES,
                relies_on=_MODULAR_INTERFACES + _INTERFACES_0_34,
                reads=_ROUTED_READS + _READS_0_34,
                quantized_layers=(),
            ),
            SiteSet(
                lines=("0.23",),
                sites=(
                    _apply_site(),
                    _weights_site(f"{_CPU_0_23}:make_process_weights_after_loading"),
                    # 0.23 unquantized_fused_moe_method.py:344; the runner calls it for the
                    # CPU backend (runner/moe_runner.py:516).
                    Site(
                        target=f"{_METHOD}.apply_monolithic",
                        signature="(self, layer, x, router_logits, input_ids=…)",
                        factory=f"{_CPU_0_23}:make_apply_monolithic",
                        role="monolithic",
                    ),
                    *_warmup_sites("cpu", "gpu"),
                ),
                relies_on=_MODULAR_INTERFACES + _CPU_0_23_INTERFACES,
                quantized_layers=(),
                reads=_MODULAR_READS + _layer_reads("layer:FusedMoE") + (_BATCHED_FLAG,)
                + _CPU_0_23_READS,
            ),
            # vllm-ascend 0.23.0.post1 (adapters/ascend_0_23.py: hooks, MC2 decision, file:line).
            SiteSet(
                lines=("0.23",),
                platform="ascend",
                sites=(
                    # moe_runtime_args.py:201, called by MoECommMethod.fused_experts
                    # (moe_comm_method.py:144) right after log2phy, before token_dispatch.
                    Site(
                        target="vllm_ascend.ops.fused_moe.moe_runtime_args:"
                        "build_token_dispatch_input",
                        signature="(*, fused_experts_input, topk_ids=…)",
                        factory=f"{_ASCEND_0_23}:make_build_token_dispatch_input",
                        role="main",
                    ),
                    # fused_moe_0_23_0.py:420: every MoE layer call; names the layer.
                    Site(
                        target="vllm_ascend.ops.fused_moe.fused_moe_0_23_0:"
                        "AscendFusedMoE.forward_impl",
                        signature="(self, hidden_states, router_logits, return_with_event=…)",
                        factory=f"{_ASCEND_0_23}:make_forward_impl",
                        role="layer",
                    ),
                    # token_dispatcher.py:592, :563, :696: dropped rows out of the
                    # all-to-all permute and back as zeros in its combine.
                    Site(
                        target="vllm_ascend.ops.fused_moe.token_dispatcher:"
                        "TokenDispatcherWithAll2AllV._preprocess",
                        signature="(self, topk_ids)",
                        factory=f"{_ASCEND_0_23}:make_all_to_all_preprocess",
                        role="a2a_count",
                    ),
                    Site(
                        target="vllm_ascend.ops.fused_moe.token_dispatcher:"
                        "TokenDispatcherWithAll2AllV._dispatch_preprocess",
                        signature="(self, hidden_states, topk_ids)",
                        factory=f"{_ASCEND_0_23}:make_all_to_all_dispatch_preprocess",
                        role="a2a_permute",
                    ),
                    Site(
                        target="vllm_ascend.ops.fused_moe.token_dispatcher:"
                        "TokenDispatcherWithAll2AllV._combine_postprocess",
                        signature="(self, permutated_local_input_tokens, combine_metadata)",
                        factory=f"{_ASCEND_0_23}:make_all_to_all_combine_postprocess",
                        role="a2a_combine",
                    ),
                    # moe_comm_method.py:97: overflow: reroute keeps the router logits
                    # prepare hands on (TP slice / DP gather), aligned with the routed rows.
                    Site(
                        target="vllm_ascend.ops.fused_moe.moe_comm_method:"
                        "MoECommMethod.prepare",
                        signature="(self, hidden_states, router_logits, "
                        "enable_shared_expert_dp=…, replace_allreduce=…, quant_type=…)",
                        factory=f"{_ASCEND_0_23}:make_prepare",
                        role="router_scores",
                    ),
                    # moe_comm_method.py:174: a rank that received zero rows does not hand
                    # the quantized MLP ops an empty input (undocumented in CANN).
                    Site(
                        target="vllm_ascend.ops.fused_moe.moe_comm_method:"
                        "MoECommMethod._apply_mlp",
                        signature="(self, mlp_compute_input)",
                        factory=f"{_ASCEND_0_23}:make_apply_mlp",
                        role="quant_mlp_zero_rows",
                    ),
                    # moe_comm_method.py:286: FUSED_MC2 bypasses build_token_dispatch_input;
                    # its kernel truncates rows past mega_moe_max_tokens (CM:310-327):
                    # counted here, the call unchanged (adapters/ascend_fused_mc2.py).
                    Site(
                        target="vllm_ascend.ops.fused_moe.moe_comm_method:FusedMC2CommImpl."
                        "fused_experts",
                        signature="(self, fused_experts_input)",
                        factory=f"{_FUSED_MC2}:make_fused_experts",
                        role="fused_mc2",
                    ),
                ),
                relies_on=(
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:MoECommMethod.fused_experts",
                        "(self, fused_experts_input)",
                        "maps ids through log2phy, then calls build_token_dispatch_input and "
                        "the step's dispatcher",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:FusedMC2CommImpl.__init__",
                        "(self, moe_config)",
                        "moe_config.num_local_experts: the kernel's experts per rank "
                        "(its expert_token_nums, CM:270-275)",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_stage_params:MoERoutingParams", None,
                        "log2phy and mc2_mask: the ids and active tokens dispatch_ffn_combine "
                        "gets on FUSED_MC2 steps",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:AlltoAllCommImpl", None,
                        "the step's comm method decides how a dropped row is marked",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:AllGatherCommImpl", None,
                        "the step's comm method decides how a dropped row is marked",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:MC2CommImpl", None,
                        "MC2 steps keep every row",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:FusedMC2CommImpl", None,
                        "FUSED_MC2 steps keep every row",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.fused_moe:AscendUnquantizedFusedMoEMethod",
                        None,
                        "the unquantized method: taken over",
                    ),
                    Interface(
                        "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod",
                        None,
                        "the wrapper of every quantized MoE scheme (quant_method = the "
                        "scheme); apply forwards to the scheme's apply",
                    ),
                    Interface(
                        "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod.apply",
                        "(self, layer, x, router_logits, top_k, renormalize, "
                        "use_grouped_topk=…, num_experts=…, expert_map=…, topk_group=…, "
                        "num_expert_group=…, custom_routing_function=…, scoring_func=…, "
                        "routed_scaling_factor=…, e_score_correction_bias=…, is_prefill=…, "
                        "enable_force_load_balance=…, log2phy=…, "
                        "global_redundant_expert_num=…, pertoken_scale=…, activation=…, "
                        "apply_router_weight_on_input=…, mc2_mask=…)",
                        "forwards to the scheme, whose apply ends in fused_experts",
                        key="AscendFusedMoEMethod_apply",
                    ),
                    Interface(
                        "vllm_ascend.quantization.methods.registry:_SCHEME_REGISTRY", None,
                        "(scheme name, layer type) -> class: names the layer's scheme",
                    ),
                    Interface(
                        "vllm_ascend.quantization.quant_type:QuantType", None,
                        "W8A8, W4A8, W4A16: the schemes whose zero-row MLP call is skipped",
                    ),
                    Interface(
                        "vllm_ascend.ascend_forward_context:select_moe_comm_method",
                        "(num_tokens, vllm_config, is_draft_model=…)",
                        "MC2 only up to the MC2 capacity; deliberately not forced to all-to-all",
                    ),
                    Interface(
                        "vllm_ascend.ascend_forward_context:_EXTRA_CTX", None,
                        "the step's comm method (moe_comm_method)",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_stage_contracts:MoEFusedExpertsInput",
                        None,
                        "frozen dataclass: the drop replaces topk_weights, reads topk_ids, "
                        "topk_weights and lora_context",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_stage_contracts:MoEPrepareOutput", None,
                        "what prepare returns: router_logits lined up with the tokens the "
                        "step routes (overflow: reroute scores them)",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_stage_contracts:MoETokenDispatchInput",
                        None,
                        "what build_token_dispatch_input returns: the dispatchers read the "
                        "(dropped) topk_ids and topk_weights from it",
                    ),
                    Interface(
                        "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_init_routing",
                        "(hidden_states, topk_ids, *, scale=…, active_num, expert_num, "
                        "expert_tokens_num_type=…, expert_tokens_num_flag=…, "
                        "active_expert_range=…, quant_mode=…, act_quant_type=…)",
                        "all-gather routing on A2/A3: ids outside active_expert_range (-1) are "
                        "neither gathered nor counted",
                    ),
                    Interface(
                        "vllm_ascend.device.device_op:BaseDeviceAdaptor.npu_moe_token_unpermute",
                        "(permuted_tokens, sorted_indices, probs)",
                        "all-gather combine: row |index| times the row's (zeroed) weight",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_stage_contracts:"
                        "MoEAllToAllCombineMetadata",
                        None,
                        "reversed_local_input_permutation_mapping: one entry per routed row",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithAll2AllV."
                        "token_dispatch",
                        "(self, token_dispatch_input)",
                        "histc of ids over [0, E] -> splits; permute with num_out_tokens",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithAll2AllV."
                        "token_combine",
                        "(self, hidden_states, combine_metadata, bias=…)",
                        "all-to-all back, then _combine_postprocess unpermutes with the weights",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithAllGather."
                        "token_dispatch",
                        "(self, token_dispatch_input)",
                        "gathers only ids in this rank's expert range (id -1 never)",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithAllGather."
                        "token_combine",
                        "(self, hidden_states, combine_metadata, bias=…)",
                        "unpermute weighted by the dispatch input's (zeroed) weights",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.comm_utils:"
                        "gather_from_sequence_parallel_region",
                        "(input_, group, output_split_sizes=…)",
                        "all-gathers the per-expert counts over the EP group, as the "
                        "all-to-all dispatcher does",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.fused_moe:AscendUnquantizedFusedMoEMethod."
                        "apply",
                        "(self, layer, x, use_grouped_topk, top_k, router_logits, renormalize, "
                        "topk_group=…, num_expert_group=…, custom_routing_function=…, "
                        "scoring_func=…, routed_scaling_factor=…, e_score_correction_bias=…, "
                        "num_experts=…, expert_map=…, apply_router_weight_on_input=…, "
                        "activation=…, enable_force_load_balance=…, log2phy=…, "
                        "global_redundant_expert_num=…, pertoken_scale=…, mc2_mask=…)",
                        "the unquantized method taken over: routes, then fused_experts",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.fused_moe_0_23_0:AscendFusedMoE.__init__",
                        "(self, *args, **kwargs)",
                        "sets global_num_experts and local_num_experts = global // ep_size "
                        "(physical ids, redundant experts included; ep_size inherited from "
                        "vLLM's FusedMoE): the EP rank of each physical id",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_runtime_args:build_fused_experts_input",
                        "(*, hidden_states, topk_weights, topk_ids, w1, w2, quant_type, "
                        "dynamic_eplb, expert_map=…, global_redundant_expert_num=…, mc2_mask=…, "
                        "apply_router_weight_on_input=…, log2phy=…, pertoken_scale=…, "
                        "activation=…, need_trans=…, w1_bias=…, w2_bias=…, comm_quant_mode=…, "
                        "mxfp_act_quant_type=…, mxfp_weight_quant_type=…, mxfp_scale_dtype=…, "
                        "mxfp_per_token_scale_dtype=…, mxfp_use_bf16=…, is_per_channel_weight=…, "
                        "w1_scale=…, w2_scale=…, w1_scale_bias=…, w2_scale_bias=…, w1_offset=…, "
                        "w2_offset=…, swiglu_limit=…, lora_context=…)",
                        "this release has MoE LoRA (lora_context): a layer call with an adapter "
                        "keeps every row",
                        key="moe_lora",
                    ),
                    Interface(
                        "vllm_ascend.ascend_config:get_ascend_config", "()",
                        "enable_fused_mc2 (refused with drops on A3) and mega_moe_max_tokens "
                        "(dispatch_ffn_combine's max_output_size, counted on FUSED_MC2 steps)",
                    ),
                    Interface(
                        "vllm_ascend.utils:get_ascend_device_type", "()",
                        "enable_fused_mc2 routes every step to FUSED_MC2 on A3 only",
                    ),
                    Interface("vllm_ascend.utils:AscendDeviceType", None, "A3"),
                    Interface(
                        "vllm_ascend.ops.fused_moe.moe_comm_method:MoECommMethod.__init__",
                        "(self, moe_config)",
                        "sets token_dispatcher, whose EP group the counts are gathered over",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:MoETokenDispatcher.ep_group",
                        None,
                        "EP device group: count all-gather and first-call config check",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:MoETokenDispatcher.ep_rank",
                        None,
                        "this rank's row among the gathered counts",
                    ),
                    Interface(
                        "vllm_ascend.ops.fused_moe.token_dispatcher:MoETokenDispatcher.ep_size",
                        None,
                        "size of the group the config check ran over",
                    ),
                ),
                # Every registered MoE scheme reaches build_token_dispatch_input (schemes.py).
                quantized_layers=ASCEND_0_23_MOE_SCHEMES,
                reads=_ASCEND_READS + (_MEGA_MOE_LIMIT,),
            ),
            no_ascend_release(),
        ),
        options=CapacityOptions,
    ),
}

# vllm-ascend 0.18.0: 0.23.0.post1's ascend site set with the names that moved; 0.13.0: its
# own sites, 0.23.0.post1's interfaces where alike (spec_releases.py says which and where).
_CAPACITY = IMPLEMENTATIONS["moe.capacity"]
IMPLEMENTATIONS["moe.capacity"] = dataclasses.replace(
    _CAPACITY,
    site_sets=(*_CAPACITY.site_sets, ascend_0_18(_CAPACITY.site_set("0.23", "ascend")),
               ascend_0_13(_CAPACITY.site_set("0.23", "ascend")), ascend_only_lines()),
)
