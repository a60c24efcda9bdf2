"""The contract run's rank on vllm-ascend 0.13.0 (test only; contract_worker.py starts it).

0.13.0 runs the same dispatchers as 0.23.0.post1 behind an older API (adapters/
ascend_token_dispatch.py): MoECommMethod.fused_experts and token_dispatch take keyword
arguments, results are TokenDispatchResult / TokenCombineResult with dict metadata, the MLP is
unified_apply_mlp(hidden_states=..., w1=..., ...), the all-gather routing calls
torch.ops._C_ascend.npu_moe_init_routing_custom itself, and the step's comm method is on vLLM's
forward context. This module swaps those pieces into contract_worker's Run and Spy; the
scenarios and what the tests check are the same, except where 0.13.0 differs (its unquantized
method does not pass log2phy to fused_experts, fused_moe.py:153-162; FUSED_MC2 takes only
w8a8_dynamic models, so only a W8A8_DYNAMIC layer is refused under the switch; there is no
MoE LoRA). The quantized scenarios (quant_worker.py) run 0.13.0's real AscendFusedMoEMethod
(quantization/quant_config.py:491) around AscendW8A8DynamicFusedMoEMethod
(quantization/w8a8_dynamic.py:103) and AscendW4A8DynamicFusedMoEMethod (w4a8_dynamic.py:210),
whose apply calls fused_experts by keyword (w8a8_dynamic.py:272, w4a8_dynamic.py:378).
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager

import contract_worker as base
import npu_ops

from contract_worker import EXPERTS, TOKENS


class Run(base.Run):
    """contract_worker.Run with 0.13.0's calls."""

    def make_spy(self):
        return Spy(self.mods)

    def adapter(self):
        from ascend_patch.impls.moe.adapters import ascend_token_dispatch

        return ascend_token_dispatch

    def dropless_with_kept_weights(self, seen: dict) -> dict:
        import torch

        keep = seen["dispatch_in"]["ids"] < EXPERTS
        layer = self.layer()
        with self.forward_context(self.a2a):
            routed = self.a2a.fused_experts(
                hidden_states=seen["dispatch_in"]["hidden"], w1=layer.w13_weight,
                w2=layer.w2_weight, topk_weights=seen["fused_in"]["weights"] * keep,
                topk_ids=seen["fused_in"]["ids"], expert_map=layer._expert_map,
            ).routed_out
        return {"routed": routed, "drop_routed": seen["routed"], "keep": keep.to(torch.int8)}

    def dispatch_mlp_combine(self, comm, hidden, weights, ids):
        layer = self.layer()
        dispatcher = comm.token_dispatcher
        output = dispatcher.token_dispatch(
            hidden_states=hidden, topk_weights=weights, topk_ids=ids,
            expert_map=layer._expert_map,
        )
        mlp_out = self.mods.mlp.unified_apply_mlp(
            hidden_states=output.hidden_states, w1=layer.w13_weight, w2=layer.w2_weight,
            group_list=output.group_list, group_list_type=output.group_list_type,
            topk_scales=output.topk_scales, need_trans=False,
        )
        return dispatcher.token_combine(
            hidden_states=mlp_out, context_metadata=output.context_metadata
        ).routed_out

    def quant_fused_input(self, layer, hidden, weights, ids) -> dict:
        """What the scheme's apply passes fused_experts, the ids already physical:
        W8A8_DYNAMIC (w8a8_dynamic.py:272-285) or W4A8_DYNAMIC, the one with scale biases
        (w4a8_dynamic.py:378-392)."""
        inputs = {"hidden_states": hidden, "w1": [layer.w13_weight], "w2": [layer.w2_weight],
                  "w2_scale": [layer.w2_weight_scale], "topk_weights": weights,
                  "topk_ids": ids, "expert_map": layer._expert_map, "log2phy": None,
                  "dynamic_eplb": False, "mc2_mask": None}
        if getattr(layer, "w13_scale_bias", None) is None:
            return {**inputs, "pertoken_scale": None, "use_int8_w8a8": True,
                    "w1_scale": [layer.w13_weight_scale_fp32]}
        return {**inputs, "use_int4_w4a8": True, "w1_scale": [layer.w13_weight_scale],
                "w1_scale_bias": layer.w13_scale_bias, "w2_scale_bias": layer.w2_scale_bias}

    def quant_fused_experts(self, comm, inputs: dict, keep=None):
        if keep is not None:
            inputs = {**inputs, "topk_weights": inputs["topk_weights"] * keep}
        return comm.fused_experts(**inputs).routed_out

    def unguarded_zero_row_mlp(self, inputs: dict) -> str:
        """Planted bug: moe_mlp's own unified_apply_mlp (the patch replaces only the copy
        moe_comm_method calls) on the zero rows a rank received, as fused_experts calls it
        (moe_comm_method.py:147-164). The strict emulation refuses, as CANN documents no such
        input."""
        import torch

        hidden = inputs["hidden_states"]
        try:
            with self.forward_context(self.a2a):
                self.mods.mlp.unified_apply_mlp(
                    hidden_states=hidden.new_empty((0, hidden.shape[1]), dtype=torch.int8),
                    w1=inputs["w1"], w1_scale=inputs["w1_scale"], w2=inputs["w2"],
                    w2_scale=inputs["w2_scale"], w1_scale_bias=inputs.get("w1_scale_bias"),
                    w2_scale_bias=inputs.get("w2_scale_bias"),
                    group_list=torch.zeros(EXPERTS // self.world, dtype=torch.int64),
                    dynamic_scale=torch.empty(0, dtype=torch.float32), group_list_type=1,
                    with_quant=True, fusion=inputs.get("use_int8_w8a8", False),
                    dynamic_eplb=False)
        except AssertionError as exc:
            return f"failed: {exc}"
        return "ran"

    def kept_whole_cases(self, record) -> dict:
        """MC2 (a bare dispatcher: its HCCL ops cannot run here) and a step under graph
        capture, each through the patch's own forward_impl and token_dispatch."""
        import torch

        ctx = record.context
        cls = self.mods.td.TokenDispatcherWithMC2
        out = {"MC2": self._through_dispatch(ctx, cls.__new__(cls))}
        torch.npu.capture.active = True
        try:
            out["graph capture"] = self._through_dispatch(ctx, self.a2a.token_dispatcher)
        finally:
            torch.npu.capture.active = False
        quantized = self.layer(name="model.layers.9.mlp.experts", quantized=True)
        out["quantized_current"] = self._current_during(ctx, quantized, self.allgather)
        return out

    def _through_dispatch(self, ctx, dispatcher) -> dict:
        adapter = self.adapter()
        hidden, weights, ids = self._slice_routing()
        seen = {}

        def original(_dispatcher, hidden_states, topk_weights, topk_ids, **kwargs):
            seen.update(ids=topk_ids, weights=topk_weights)

        dispatch = adapter.make_token_dispatch(original, ctx)
        forward_impl = adapter.make_forward_impl(
            lambda *a, **k: dispatch(dispatcher, hidden, weights, ids), ctx
        )
        with self.forward_context(self.a2a):
            forward_impl(self.layer(), hidden, hidden)
        return {"same_ids": bool(seen["ids"].equal(ids)),
                "same_weights": bool(seen["weights"].equal(weights))}

    def layer(self, name: str = "model.layers.3.mlp.experts", quantized: bool = False):
        layer = super().layer(name, quantized)
        layer.quant_type = self.mods.pf.QuantType.NONE
        layer.activation = "silu"
        if not quantized:
            layer.quant_method.dynamic_eplb = False
        return layer

    @contextmanager
    def forward_context(self, comm):
        with super().forward_context(comm) as context:
            context.sp_enabled = False
            context.mc2_mask = None
            yield context

    def fused_mc2_refused(self) -> dict:
        """The unquantized layer (never FUSED_MC2 on 0.13.0) and a W8A8_DYNAMIC one, the only
        kind 0.13.0 sends to FUSED_MC2, each first judged under the switch."""
        out = {"unquantized": super().fused_mc2_refused()}
        layer = base.quant_worker.quant_layer(self, "W8A8_DYNAMIC")
        layer.layer_name = "model.layers.13.mlp.experts"
        with self.fused_mc2_enabled():
            try:
                self.forward("allgather", layer=layer)
            except Exception as exc:  # noqa: BLE001 - the message is what is checked
                out["W8A8_DYNAMIC"] = f"{type(exc).__name__}: {exc}"
            else:
                out["W8A8_DYNAMIC"] = "ran"
        return out

    def fused_mc2_enabled(self):
        return _env("VLLM_ASCEND_ENABLE_FUSED_MC2", "1")


@contextmanager
def _env(name: str, value: str):
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


class Spy(base.Spy):
    """contract_worker.Spy for 0.13.0's keyword-argument boundaries."""

    def _wrap_routing(self, mods) -> None:
        self._wrap(npu_ops, "npu_moe_init_routing_custom", self._routing)

    def wrap_quant_mlp(self, mods) -> None:
        def mlp(original):
            def unified_apply_mlp(**kwargs):
                base.quant_worker.record_mlp(self, kwargs["hidden_states"],
                                             kwargs.get("dynamic_scale"))
                return original(**kwargs)
            return unified_apply_mlp

        self._wrap(mods.cm, "unified_apply_mlp", mlp)

    def _fused(self, original):
        def fused_experts(comm, **kwargs):
            if self.records:
                ids, log2phy = kwargs["topk_ids"], kwargs.get("log2phy")
                self.records["fused_in"] = {
                    "weights": kwargs["topk_weights"].clone(),
                    "ids": (log2phy[ids] if log2phy is not None else ids).clone(),
                }
                self.records["fused_input"] = dict(kwargs)
            return original(comm, **kwargs)

        return fused_experts

    def _dispatched(self, original):
        def token_dispatch(dispatcher, hidden_states, topk_weights, topk_ids, **kwargs):
            if self.records:
                self.records["dispatch_in"] = {
                    "hidden": hidden_states.clone(), "weights": topk_weights.clone(),
                    "ids": topk_ids.clone(),
                }
            return original(dispatcher, hidden_states, topk_weights, topk_ids, **kwargs)

        return token_dispatch

    def _routing(self, original):
        @functools.wraps(original)
        def npu_moe_init_routing_custom(x, expert_idx, **kwargs):
            out = original(x, expert_idx, **kwargs)
            if self.records:
                self.records["routing"].append({"expert_tokens": out[2].clone(),
                                                "quant_mode": kwargs.get("quant_mode")})
            return out

        return npu_moe_init_routing_custom


def import_vllm_ascend() -> types.SimpleNamespace:
    import vllm_ascend.ops.fused_moe.fused_moe as fm
    from vllm_ascend.ops.fused_moe import comm_utils, moe_mlp, prepare_finalize
    from vllm_ascend.ops.fused_moe import moe_comm_method as cm
    from vllm_ascend.ops.fused_moe import token_dispatcher as td

    return types.SimpleNamespace(
        fm=fm, layer=fm, cm=cm, td=td, mlp=moe_mlp, pf=prepare_finalize,
        comm_utils=comm_utils, MoEActivation=types.SimpleNamespace(SILU="silu"),
        QuantType=prepare_finalize.QuantType,
    )


__all__ = ["Run", "Spy", "TOKENS", "import_vllm_ascend"]
