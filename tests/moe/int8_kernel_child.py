"""Child process of test_int8_cpu_experts.py: vLLM's real CPU int8 MoE experts against ours.

vLLM picks its kernel library by CPU flags (platforms/cpu.py `import_kernels`): without the
avx512_bf16 flag it loads `_C_AVX512`, which has no `fused_experts_cpu`; the library that
has it, `_C`, registers the same `torch.ops._C` namespace, so the two cannot both load. This
child loads `_C` first and tells Python that `_C_AVX512` is loaded, which is why it is a
process of its own. It then runs the REAL `CPUExpertsInt8` (its process_weights_after_loading
prepacks, its apply calls fused_experts_cpu INT8_W8A8) and our CapacityInt8Experts on the same
layer and prints one JSON line with what the test checks.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

E, H, INTER, TOKENS, TOP_K = 8, 256, 128, 48, 2


def load_kernels() -> None:
    origin = importlib.util.find_spec("vllm").submodule_search_locations[0]
    torch.ops.load_library(str(Path(origin) / "_C.abi3.so"))
    sys.modules["vllm._C_AVX512"] = types.ModuleType("vllm._C_AVX512")
    sys.modules["vllm._C_AVX2"] = types.ModuleType("vllm._C_AVX2")


def moe_config():
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=E, experts_per_token=TOP_K, hidden_dim=H, intermediate_size=INTER,
        num_local_experts=E, num_logical_experts=E, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.bfloat16)


def main() -> None:
    load_kernels()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import int8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8

    from ascend_patch.core.context import PatchContext
    from ascend_patch.impls.moe.adapters import vllm_int8_cpu
    from ascend_patch.impls.moe.experts import int8_backend
    from ascend_patch.impls.moe.options import CapacityOptions

    gen = torch.Generator().manual_seed(0)
    w13 = torch.randint(-127, 128, (E, 2 * INTER, H), dtype=torch.int8, generator=gen)
    w2 = torch.randint(-127, 128, (E, H, INTER), dtype=torch.int8, generator=gen)
    w13_scale = torch.rand(E, 2 * INTER, generator=gen) * 1e-3
    w2_scale = torch.rand(E, H, generator=gen) * 1e-3
    x = torch.randn(TOKENS, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    ids = ids.to(torch.int32)
    weights = torch.rand(TOKENS, TOP_K, generator=gen).softmax(dim=1)
    dropped = torch.rand(TOKENS, TOP_K, generator=gen) < 0.25

    quant = int8_w8a8_moe_quant_config(w13_scale, w2_scale, None, None, per_act_token_quant=True)
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(w13.clone(), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2.clone(), requires_grad=False)
    real = CPUExpertsInt8(moe_config(), quant)
    real.process_weights_after_loading(layer)

    def run_real(topk_weights, topk_ids):
        out = torch.empty_like(x)
        real.apply(out, x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                   MoEActivation.SILU, E, None, None, None, None, None, None, False)
        return out

    ctx = PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=0.0))
    ours_cls = vllm_int8_cpu.int8_experts_class(vllm_int8_cpu.state_of(ctx))
    ours = ours_cls(moe_config(), quant)
    rows_quantised = []
    quantize_rows = int8_backend.quantize_rows
    int8_backend.quantize_rows = lambda t: rows_quantised.append(t.shape[0]) or quantize_rows(t)

    def run_ours(topk_ids):
        out = torch.empty_like(x)
        ours.apply(out, x, w13, w2, weights, topk_ids, MoEActivation.SILU, E, None, None, None,
                   None, None, None, False)
        return out

    stock = run_real(weights, ids)
    dropless = run_ours(ids)
    rows_dropless = sum(rows_quantised)
    rows_quantised.clear()
    # The kernel cannot be handed id -1 (the reason ours replaces it): a dropped row there
    # can only be a row of weight 0, which it still computes.
    kernel_dropped = run_real(weights.masked_fill(dropped, 0.0), ids)
    ours_dropped = run_ours(ids.masked_fill(dropped, -1))
    try:
        run_real(weights, ids.masked_fill(dropped, -1))
        refused = ""
    except RuntimeError as exc:
        refused = str(exc).splitlines()[0]
    print("RESULT " + json.dumps({
        "stock_max": stock.float().abs().max().item(),
        "dropless_max_diff": (dropless.float() - stock.float()).abs().max().item(),
        "dropless_differing": ((dropless != stock).float().mean().item()),
        "dropped_max_diff": (ours_dropped.float() - kernel_dropped.float()).abs().max().item(),
        "rows_quantised_dropless": rows_dropless,
        # Two quantisations per computed row (the input, then the silu-and-mul output).
        "rows_quantised_dropped": sum(rows_quantised),
        "rows": TOKENS * TOP_K,
        "rows_dropped": int(dropped.sum()),
        "kernel_refuses_minus_one": refused,
    }))


if __name__ == "__main__":
    main()
