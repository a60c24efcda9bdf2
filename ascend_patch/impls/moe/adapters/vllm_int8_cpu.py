"""`moe.capacity` for vLLM 0.32's W8A8 int8 MoE on CPU (the shape `CPUExpertsInt8` has).

Two int8 MoE methods lead to the CPU int8 experts (0.32 file:line):
  * online quantisation, `--quantization experts_int8` / `int8_per_channel_static`:
    `Int8OnlineMoEMethod` (quantization/online/int8.py:34) quantises bf16 weights per output
    channel at load; its `apply` is `OnlineMoEMethodBase.apply` (online/moe_base.py:169);
  * compressed-tensors W8A8 int8 checkpoints (channel weights, dynamic token activations):
    `CompressedTensorsW8A8Int8MoEMethod` (compressed_tensors_moe_w8a8_int8.py:38, apply :248).
Both call `select_int8_moe_backend` (fused_moe/oracle/int8.py:103) in `__init__`, build the
modular kernel with `make_int8_moe_kernel` from the chosen experts class, and call that
class's `process_weights_after_loading(layer)` once the kernel exists.

Why vLLM's own CPU int8 experts cannot stay:
  * `CPUExpertsInt8._supports_current_device` (cpu_moe.py:998) wants AMX tiles; the Zen,
    Arm and Power variants want zentorch or another architecture. On an x86 CPU without AMX
    (this bench: AVX512-VNNI, no AMX, no avx512_bf16 flag, so vLLM loads `_C_AVX512`, which
    does not even contain `fused_experts_cpu`) `select_int8_moe_backend` raises
    NotImplementedError and the model does not load at all.
  * where it does run, its kernel refuses id -1 (moe_align_block_size checks that every row
    lands in a block: "Expected offsets[num_token_blocks] == numel") and ignores expert_map.
So on CPU the selection returns our experts instead (`make_select_int8_moe_backend`): the
same W8A8 arithmetic (experts/int8_backend.py says step by step, and where it can differ),
on the standard int8 layout (no VNNI prepack), computing only kept rows of local experts.
The drop step runs in the two methods' `apply` on vLLM's router output, as for unquantized
layers (vllm_modular.make_apply). Off CPU (Triton, Humming) the selection is vLLM's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe import custom_ops
from ascend_patch.impls.moe.adapters.vllm_modular import _install_dispatch, state_of
from ascend_patch.impls.moe.state import CapacityState

logger = logging.getLogger("ascend_patch.moe.capacity")

# What the report says each int8 layer runs, and its label on /metrics.
QUANTIZATION_LABEL = "int8_w8a8"
SCHEME = ("int8 W8A8: per-channel int8 weights, dynamic per-token int8 activations "
          "(CPUExpertsInt8 arithmetic, torch, kept rows only)")
_OP = "moe_capacity_experts_int8"
_DEFAULT = object()


# --------------------------------------------------------------------------------------
# selection: our experts in place of the CPU int8 experts
# --------------------------------------------------------------------------------------


def make_select_int8_moe_backend(
    original: Callable[..., Any], ctx: PatchContext
) -> Callable[..., Any]:
    """Replacement of oracle.int8.select_int8_moe_backend(config, weight_key, activation_key)."""
    state = state_of(ctx)
    upstream = state.upstream
    experts_cls = int8_experts_class(state)

    def select_int8_moe_backend(config: Any, weight_key: Any = _DEFAULT,
                                activation_key: Any = _DEFAULT) -> Any:
        keys = {}
        if weight_key is not _DEFAULT:
            keys["weight_key"] = weight_key
        if activation_key is not _DEFAULT:
            keys["activation_key"] = activation_key
        reason = not_supported_reason(
            config, keys.get("weight_key", upstream.kInt8StaticChannelSym),
            keys.get("activation_key", upstream.kInt8DynamicTokenSym), upstream)
        if reason is not None:
            logger.warning("moe.capacity: int8 MoE keeps vLLM's experts: %s", reason)
            return original(config, **keys)
        return upstream.Int8MoeBackend.CPU, experts_cls

    return select_int8_moe_backend


def not_supported_reason(config: Any, weight_key: Any, activation_key: Any,
                         upstream: Any) -> str | None:
    """Why an int8 MoE layer keeps vLLM's selection (None: our int8 experts take it)."""
    if not upstream.current_platform.is_cpu():
        return "not the CPU platform (its Triton/Humming int8 experts stay)"
    if config.moe_backend != "auto":
        return f"moe_backend {config.moe_backend!r} asked for explicitly"
    if (weight_key, activation_key) != (upstream.kInt8StaticChannelSym,
                                        upstream.kInt8DynamicTokenSym):
        return f"quant scheme {weight_key}/{activation_key} (W8A8 channel/token only)"
    if config.moe_parallel_config.use_batched_activation_format:
        return "batched activation format"
    if config.has_bias:
        return "experts with bias"
    if config.is_lora_enabled:
        return "MoE LoRA"
    if not config.is_act_and_mul or getattr(config.activation, "value", None) != "silu":
        return f"activation {getattr(config.activation, 'value', config.activation)} (silu only)"
    if any(getattr(config, name, None) is not None
           for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")):
        return "clamped/scaled SwiGLU"
    return None


# --------------------------------------------------------------------------------------
# the experts
# --------------------------------------------------------------------------------------


def int8_experts_class(state: CapacityState) -> type:
    """The int8 experts class of this patch (one per state: it registers its layers there)."""
    cls = state.int8_experts_cls
    if cls is None:
        register_op()
        cls = state.int8_experts_cls = _make_int8_experts_class(state)
    return cls


def _make_int8_experts_class(state: CapacityState) -> type:
    upstream = state.upstream
    standard = upstream.FusedMoEActivationFormat.Standard
    no_op_reduce = upstream.TopKWeightAndReduceNoOP
    scheme = (upstream.kInt8StaticChannelSym, upstream.kInt8DynamicTokenSym)

    class CapacityInt8Experts(upstream.FusedMoEExpertsModular):
        """Standard-format W8A8 int8 experts: weighted, top-k-reduced output like
        CPUExpertsInt8 (whose finalize is a no-op too). Rows with id -1 (dropped) and rows
        of experts another EP rank owns are not computed."""

        ascend_patch_int8 = True

        @property
        def expects_unquantized_inputs(self) -> bool:
            return True  # activations are quantised per row inside, as the CPU kernel does

        @staticmethod
        def activation_format() -> Any:
            return standard

        @staticmethod
        def _supports_current_device() -> bool:
            return upstream.current_platform.is_cpu()

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_quant_scheme(weight_key: Any, activation_key: Any) -> bool:
            return (weight_key, activation_key) == scheme

        @staticmethod
        def _supports_activation(activation: Any) -> bool:
            return getattr(activation, "value", activation) == "silu"

        @staticmethod
        def _supports_parallel_config(moe_parallel_config: Any) -> bool:
            return True

        @staticmethod
        def _supports_routing_method(routing_method: Any, weight_key: Any,
                                     activation_key: Any) -> bool:
            return True  # vLLM's router has run before the experts: any routing will do

        @staticmethod
        def _supports_router_logits_dtype(router_logits_dtype: Any, routing_method: Any) -> bool:
            return True

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # No VNNI prepack: the torch compute reads [E, 2I, H] / [E, H, I] int8. Both
            # int8 methods call this once their kernel (with these experts) is built.
            register_layer(state, layer)

        def workspace_shapes(self, M: int, N: int, K: int, topk: int, global_num_experts: int,
                             local_num_experts: int, expert_tokens_meta: Any,
                             activation: Any) -> tuple[tuple[int, ...], ...]:
            return (0,), (0,), (M, K)

        def finalize_weight_and_reduce_impl(self) -> Any:
            return no_op_reduce()

        def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  activation: Any, global_num_experts: int, expert_map: torch.Tensor | None,
                  a1q_scale: torch.Tensor | None, a2_scale: torch.Tensor | None,
                  workspace13: torch.Tensor, workspace2: torch.Tensor,
                  expert_tokens_meta: Any, apply_router_weight_on_input: bool) -> None:
            if apply_router_weight_on_input:
                # As CPUExpertsInt8 (cpu_moe.py:1122): prepare() would already have scaled
                # the input, and the int8 arithmetic weights the output.
                raise NotImplementedError(
                    "int8 MoE experts do not support apply_router_weight_on_input=True")
            out = getattr(torch.ops.ascend_patch, _OP)(
                hidden_states, w1, w2, self.w1_scale, self.w2_scale, topk_weights, topk_ids,
                expert_map)
            output.copy_(out)

    return CapacityInt8Experts


def register_layer(state: CapacityState, layer: Any) -> None:
    name = layer.layer_name
    state.add_layer(name, layer)
    state.stats.layer_quantization(name, SCHEME)
    _export_quantization(state, name)
    _install_dispatch(layer.quant_method, layer, state)


def _export_quantization(state: CapacityState, layer_name: str) -> None:
    """ascend_patch_moe_layer_quantization{layer, quantization="int8_w8a8"} 1 on /metrics
    (when metrics are on here): the layer's drop series carry no scheme label."""
    from ascend_patch.core import metrics as process_metrics
    from ascend_patch.impls.moe.telemetry.metrics import GAUGE_MODE, name

    writer = process_metrics.writer()
    if writer is None:
        return
    labels = {"patch": state.ctx.patch_name, "layer": layer_name,
              "process": process_metrics.process_label(), "quantization": QUANTIZATION_LABEL}
    writer.gauge(name("layer_quantization"), "quantized MoE layer taken over by moe.capacity "
                 "(1), labelled with its scheme", labels, GAUGE_MODE).set(1)


def _experts_impl(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    from ascend_patch.impls.moe.experts.int8_backend import moe_forward_int8

    keep = topk_ids >= 0
    return moe_forward_int8(hidden_states, w13, w2, w13_scale, w2_scale, topk_weights,
                            topk_ids.clamp(min=0), keep, expert_map)


def register_op() -> None:
    """The int8 expert compute as an opaque custom op: vLLM lets Dynamo trace the MoE layer
    on CPU, and the compute has data-dependent shapes (see custom_ops.py)."""
    if hasattr(torch.ops.ascend_patch, _OP):
        return
    op = torch.library.custom_op(
        f"ascend_patch::{_OP}", mutates_args=(),
        schema="(Tensor hidden_states, Tensor w13, Tensor w2, Tensor w13_scale, "
               "Tensor w2_scale, Tensor topk_weights, Tensor topk_ids, Tensor? expert_map) "
               "-> Tensor")
    op(_experts_impl).register_fake(lambda hidden_states, *args: torch.empty_like(hidden_states))


# --------------------------------------------------------------------------------------
# apply: the drop step on vLLM's router output, then the original
# --------------------------------------------------------------------------------------


def make_apply(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    """Replacement of the int8 methods' apply(self, layer, x, topk_weights, topk_ids,
    shared_experts, shared_experts_input): OnlineMoEMethodBase's (every online-quantised
    MoE method shares it: only layers whose experts are ours drop) and
    CompressedTensorsW8A8Int8MoEMethod's."""
    # overflow: reroute: the layer's router planned already (router_scores.py).
    planned_by_router = state_of(ctx).rerouting

    def apply(self: Any, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_experts: Any,
              shared_experts_input: torch.Tensor | None) -> Any:
        ours = getattr(getattr(self.moe_kernel, "fused_experts", None), "ascend_patch_int8",
                       False)
        if ours and not planned_by_router:
            topk_weights, topk_ids = custom_ops.plan(topk_weights, topk_ids, layer.layer_name)
        return original(self, layer, x, topk_weights, topk_ids, shared_experts,
                        shared_experts_input)

    return apply
