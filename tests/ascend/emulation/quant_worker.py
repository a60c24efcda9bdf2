"""The quantized part of the vllm-ascend contract run (test only; called by contract_worker).

Layers whose quant_method is vllm-ascend's real AscendFusedMoEMethod wrapping its real
AscendW8A8DynamicFusedMoEMethod / AscendW4A8DynamicFusedMoEMethod (the scheme objects are made
without their constructors, which want a loaded quant config and an HCCL MC2 group; `apply`
reads only the attributes set below). Weights are built directly in the layout `apply` reads
after process_weights_after_loading (which itself needs npu_format_cast / npu_quantize):

* W8A8_DYNAMIC (w8a8_dynamic.py:324-331, 380-387): w13_weight int8 [E, H, 2I], w2_weight int8
  [E, I, H], w13_weight_scale_fp32 float32 [E, 2I], w2_weight_scale bf16 [E, H].
* W4A8_DYNAMIC per group (w4a8.py:556-562 and its docstring): w13_weight int32 [E, H, 2I / 8],
  w2_weight int32 [E, I, H / 8] (int4 packed), w13_weight_scale int64 [E, H / G, 2I],
  w2_weight_scale int64 [E, I / G, H] (float32 bits in the low half), w13_scale_bias float32
  [E, 2I] and w2_scale_bias [E, H] = 8 * sum_k(w * scale), the offset correction of
  process_scale (w4a8.py:604-609) that makes the A8W4 kernel compute x @ (w * scale).
"""

from __future__ import annotations

import dataclasses
import importlib

import quant_ops
import torch

SCHEMES = {
    "W8A8_DYNAMIC": "model.layers.11.mlp.experts",
    "W4A8_DYNAMIC": "model.layers.12.mlp.experts",
}
W4A8_GROUP = 8


# Where each release keeps the wrapper and the schemes run here (old_api: 0.13.0, whose
# quantization/ is flat: quant_config.py:491, w8a8_dynamic.py:103, w4a8_dynamic.py:210).
_CLASSES = {
    False: ("vllm_ascend.quantization.method_adapters", {
        "W8A8_DYNAMIC": "vllm_ascend.quantization.methods.w8a8_dynamic",
        "W4A8_DYNAMIC": "vllm_ascend.quantization.methods.w4a8"}),
    True: ("vllm_ascend.quantization.quant_config", {
        "W8A8_DYNAMIC": "vllm_ascend.quantization.w8a8_dynamic",
        "W4A8_DYNAMIC": "vllm_ascend.quantization.w4a8_dynamic"}),
}
_CLASS_NAMES = {"W8A8_DYNAMIC": "AscendW8A8DynamicFusedMoEMethod",
                "W4A8_DYNAMIC": "AscendW4A8DynamicFusedMoEMethod"}
# The layer's quant_type (the scheme's own on 0.18.0 / 0.23.0.post1; AscendFusedMoE.
# _get_quant_type on 0.13.0, fused_moe.py:253-266 there): the same names.
_QUANT_TYPE = {"W8A8_DYNAMIC": "W8A8", "W4A8_DYNAMIC": "W4A8"}


def quant_layer(run, scheme: str):
    """A layer of `run` (contract_worker.Run) whose quant_method is the real wrapper and
    scheme, with this rank's local experts' quantized weights."""
    wrapper_module, schemes = _CLASSES[run.release.old_api]
    wrapper_cls = importlib.import_module(wrapper_module).AscendFusedMoEMethod
    scheme_cls = getattr(importlib.import_module(schemes[scheme]), _CLASS_NAMES[scheme])
    layer = run.layer(name=SCHEMES[scheme])
    wrapper = wrapper_cls.__new__(wrapper_cls)
    wrapper.quant_method, wrapper.tid2eid = _scheme(scheme_cls), None
    layer.quant_method = wrapper
    layer.quant_type = run.mods.QuantType[_QUANT_TYPE[scheme]]
    layer.n_shared_experts, layer.mix_placement = 0, False  # read by 0.13.0's apply
    local = run.mine()
    for key, value in expert_weights(scheme).items():
        setattr(layer, key, value[local])
    return layer


def _scheme(cls):
    method = cls.__new__(cls)
    method.multistream_overlap_gate = False
    method.dynamic_eplb = False
    method.in_dtype = torch.bfloat16
    method.is_per_channel_weight = False
    method.group_size = W4A8_GROUP
    return method


def expert_weights(scheme: str) -> dict[str, torch.Tensor]:
    """Every physical expert's weights (seeded: each rank builds the same, keeps its own)."""
    from contract_worker import EXPERTS, HIDDEN, INTER

    gen = torch.Generator().manual_seed(23)
    if scheme == "W8A8_DYNAMIC":
        return {
            "w13_weight": torch.randint(-127, 128, (EXPERTS, HIDDEN, 2 * INTER), generator=gen,
                                        dtype=torch.int8),
            "w2_weight": torch.randint(-127, 128, (EXPERTS, INTER, HIDDEN), generator=gen,
                                       dtype=torch.int8),
            "w13_weight_scale_fp32": torch.rand(EXPERTS, 2 * INTER, generator=gen) / 2000 + 1e-4,
            "w2_weight_scale": (torch.rand(EXPERTS, HIDDEN, generator=gen) / 400 + 1e-4).to(
                torch.bfloat16),
        }
    w13 = torch.randint(-8, 8, (EXPERTS, HIDDEN, 2 * INTER), generator=gen, dtype=torch.int8)
    w2 = torch.randint(-8, 8, (EXPERTS, INTER, HIDDEN), generator=gen, dtype=torch.int8)
    s13 = torch.rand(EXPERTS, HIDDEN // W4A8_GROUP, 2 * INTER, generator=gen) / 200 + 1e-3
    s2 = torch.rand(EXPERTS, INTER // W4A8_GROUP, HIDDEN, generator=gen) / 20 + 1e-3
    return {
        "w13_weight": quant_ops.pack_int4(w13), "w2_weight": quant_ops.pack_int4(w2),
        "w13_weight_scale": quant_ops.float_scale_to_int64(s13),
        "w2_weight_scale": quant_ops.float_scale_to_int64(s2),
        "w13_scale_bias": _offset_correction(w13, s13), "w2_scale_bias": _offset_correction(w2, s2),
    }


def _offset_correction(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    groups = scale.shape[1]
    per_row = scale.repeat_interleave(weight.shape[1] // groups, dim=1)
    return 8 * (weight.float() * per_row).sum(dim=1)


def dequantized(scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, H, 2I], w2 [E, I, H]) float32 with their scales applied."""
    weights = expert_weights(scheme)
    if scheme == "W8A8_DYNAMIC":
        return (weights["w13_weight"].float() * weights["w13_weight_scale_fp32"].unsqueeze(1),
                weights["w2_weight"].float() * weights["w2_weight_scale"].float().unsqueeze(1))
    out = []
    for key in ("w13", "w2"):
        weight = quant_ops.unpack_int4(weights[f"{key}_weight"]).float()
        scale = quant_ops.int64_scale_to_float(weights[f"{key}_weight_scale"])
        out.append(weight * scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1))
    return out[0], out[1]


# -- scenarios (every rank runs the same sequence: they share collectives) -----------------


def unpatched(run) -> dict:
    return {s: {p: run.forward(p, layer=quant_layer(run, s)) for p in ("all_to_all", "allgather")}
            for s in SCHEMES}


def with_drops(run) -> dict:
    out = {}
    for scheme in SCHEMES:
        layer = quant_layer(run, scheme)
        seen = {path: run.observed_forward(path, layer=layer, keep_input=True)
                for path in ("all_to_all", "allgather")}
        for path, comm in (("all_to_all", run.a2a), ("allgather", run.allgather)):
            seen[path]["dropless_kept"] = _dropless_with_kept_weights(run, seen[path], comm)
            seen[path].pop("fused_input")
        seen["zero_rows"] = _zero_rows(run, layer)
        out[scheme] = seen
    return out


def ratio0(run) -> dict:
    return unpatched(run)


def _dropless_with_kept_weights(run, seen: dict, comm) -> torch.Tensor:
    """vllm-ascend's own dropless fused_experts (no layer call is current: every site passes
    through) on the input the real scheme built, dropped rows kept with weight 0."""
    from contract_worker import EXPERTS

    ids = seen["dispatch_in"]["ids"]
    keep = (ids >= 0) & (ids < EXPERTS)
    with run.forward_context(comm):
        return run.quant_fused_experts(comm, seen["fused_input"], keep)


def _zero_rows(run, layer) -> dict:
    """Rank 0 keeps no row at all and rank 1 keeps only rows for its own experts: rank 0
    sends nothing (a [0, H] input to the dynamic quant) and receives nothing (its MLP gets
    zero rows); rank 1 is unaffected."""
    from contract_worker import EXPERTS, TOP_K

    hidden, weights, ids = run._slice_routing()
    hidden = hidden.to(torch.bfloat16)
    weights = weights.to(torch.bfloat16)
    local = EXPERTS // run.world
    drop = torch.ones_like(ids, dtype=torch.bool) if run.rank == 0 else ids < local
    ids = torch.where(drop, torch.full_like(ids, EXPERTS + 1), ids)
    weights = weights * ~drop
    inputs = run.quant_fused_input(layer, hidden, weights, ids)
    run.spy.reset()
    with run.forward_context(run.a2a):
        out = run.quant_fused_experts(run.a2a, inputs)
    seen = run.spy.take()
    assert ids.shape[1] == TOP_K
    return {"out": out, "hidden": hidden, "weights": weights, "ids": ids, "a2a": seen["a2a"],
            "quant_rows": seen["quant_rows"], "mlp_rows": seen["mlp_rows"],
            "unguarded": run.unguarded_zero_row_mlp(inputs)}


def fused_experts(comm, inputs, keep=None) -> torch.Tensor:
    """MoECommMethod.fused_experts on the scheme's input, the weights times `keep` if given."""
    if keep is not None:
        inputs = dataclasses.replace(inputs, topk_weights=inputs.topk_weights * keep)
    return comm.fused_experts(fused_experts_input=inputs).routed_out


def unguarded_zero_row_mlp(run, inputs) -> str:
    """Planted bug: vllm-ascend's own MLP on the zero rows a rank received (a local call: no
    collective waits on it). The strict emulation refuses, as CANN documents no such input."""
    from contract_worker import EXPERTS

    mods = run.mods
    dispatched = mods.contracts.MoETokenDispatchOutput(
        hidden_states=inputs.hidden_states.new_empty((0, inputs.hidden_states.shape[1]),
                                                      dtype=torch.int8),
        group_list=torch.zeros(EXPERTS // run.world, dtype=torch.int64), group_list_type=1,
        combine_metadata=None, dynamic_scale=torch.empty(0, dtype=torch.float32))
    mlp_in = mods.args.build_mlp_compute_input(
        fused_experts_input=inputs, token_dispatch_output=dispatched,
        use_fusion_ops=run.a2a.use_fusion_ops)
    try:
        with run.forward_context(run.a2a):
            mods.mlp.unified_apply_mlp(mlp_compute_input=mlp_in)
    except AssertionError as exc:
        return f"failed: {exc}"
    return "ran"


def fused_input(run, layer, hidden, weights, ids):
    """What the scheme's apply builds (w8a8_dynamic.py:326-346, w4a8.py:570-588)."""
    scheme = layer.quant_method.quant_method
    scale_bias = getattr(layer, "w13_scale_bias", None)
    # 0.18.0's builder has no is_per_channel_weight (its W4A8 is per-group only).
    extra = {"is_per_channel_weight": False} if run.release.per_channel_arg else {}
    return run.mods.args.build_fused_experts_input(
        hidden_states=hidden, topk_weights=weights, topk_ids=ids, w1=[layer.w13_weight],
        w2=[layer.w2_weight], quant_type=scheme.quant_type, dynamic_eplb=False,
        expert_map=layer._expert_map, activation=run.mods.MoEActivation.SILU,
        w1_scale=[getattr(layer, "w13_weight_scale_fp32", None)
                  if scale_bias is None else layer.w13_weight_scale],
        w2_scale=[layer.w2_weight_scale],
        w1_scale_bias=_scale_bias(run, scale_bias),
        w2_scale_bias=_scale_bias(run, getattr(layer, "w2_scale_bias", None)), **extra,
    )


def _scale_bias(run, bias):
    if bias is None or not run.release.scale_bias_lists:
        return bias
    return [bias]


def spy_ops(spy, mods) -> None:
    """Record the rows each dynamic quant and each MLP call is handed."""
    import torch_npu

    def quant(original):
        def npu_dynamic_quant(x, *args, **kwargs):
            if spy.records:
                spy.records["quant_rows"].append(int(x.shape[0]))
            return original(x, *args, **kwargs)
        return npu_dynamic_quant

    spy._wrap(torch_npu, "npu_dynamic_quant", quant)
    spy.wrap_quant_mlp(mods)


def record_mlp(spy, hidden_states, dynamic_scale) -> None:
    if spy.records:
        spy.records["mlp_rows"].append(int(hidden_states.shape[0]))
        spy.records["mlp_scales"].append(None if dynamic_scale is None
                                         else int(dynamic_scale.shape[0]))
