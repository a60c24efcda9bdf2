"""The vLLM adapter on CUDA's Triton backend (contract: vLLM's real classes), checked on CPU:
what a taken-over layer hands vLLM's modular kernel. The kernel itself never ran here."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import vllm_modular
from ascend_patch.impls.moe.options import CapacityOptions

E = 8


def _triton_layer(backend="allgather_reducescatter", dp=1, ep=1, ep_rank=0):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    parallel = FusedMoEParallelConfig(
        tp_size=1, pcp_size=1, dp_size=dp, ep_size=ep, tp_rank=0, pcp_rank=0,
        dp_rank=ep_rank if dp > 1 else 0, ep_rank=ep_rank, sp_size=1, use_ep=ep > 1,
        all2all_backend=backend, enable_eplb=False)
    moe = SimpleNamespace(moe_parallel_config=parallel, has_bias=False, is_lora_enabled=False,
                          is_act_and_mul=True)
    calls = []
    kernel = SimpleNamespace(apply=lambda **kw: calls.append(kw) or "out")
    method = SimpleNamespace(moe=moe, unquantized_backend=UnquantizedMoeBackend.TRITON,
                             experts_cls=None, moe_kernel=kernel)
    expert_map = None
    if ep > 1:
        per = E // ep
        owner = torch.arange(E) // per
        expert_map = torch.where(owner == ep_rank, torch.arange(E) % per, -1).to(torch.int32)
    layer = SimpleNamespace(layer_name="model.layers.1.mlp.experts", activation="silu",
                            global_num_experts=E, expert_map=expert_map, moe_config=moe,
                            w13_weight="w13", w2_weight="w2", apply_router_weight_on_input=False)
    return method, layer, calls


def _routing():
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(40, 2, generator=gen).softmax(dim=1)
    ids = torch.randint(0, E, (40, 2), generator=gen, dtype=torch.int32)
    ids[:, 0] = 7  # one hot expert: something to drop
    return weights, ids


def _ctx(ratio=0.3):
    return PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=ratio,
                                                               min_tokens=0))


def test_triton_layer_hands_dropped_rows_as_the_sentinel_expert_with_an_extended_map():
    ctx = _ctx()
    try:
        method, layer, calls = _triton_layer()
        built = []
        process = vllm_modular.make_process_weights_after_loading(
            lambda self, layer: built.append(self.experts_cls), ctx)
        process(method, layer)
        assert built == [None]  # vLLM's own experts class stays (TritonExperts)
        assert getattr(method, vllm_modular.TAKEN_OVER) == vllm_modular.TRITON
        apply = vllm_modular.make_apply(lambda *a: "original must not run", ctx)
        weights, ids = _routing()
        x = torch.zeros(40, 16)
        assert apply(method, layer, x, weights, ids, None, None) == "out"
        (kw,), dropped = calls, ctx.stats["rows_dropped"]
        assert dropped > 0
        handed = kw["topk_ids"]
        assert int((handed == E).sum()) == dropped and not bool((handed < 0).any())
        assert torch.equal(handed[handed < E], ids[handed < E])
        assert bool((kw["topk_weights"][handed == E] == 0).all())
        assert kw["global_num_experts"] == E + 1
        assert kw["expert_map"].tolist() == list(range(E)) + [-1]
        assert kw["hidden_states"] is x and kw["w1"] == "w13" and kw["w2"] == "w2"
        assert kw["activation"] == "silu" and kw["apply_router_weight_on_input"] is False
        assert ctx.stats["dispatch_paths"][layer.layer_name]["path"] == "vllm"
    finally:
        ctx.close()


def test_deepep_ht_layer_hands_minus_one_and_its_own_map():
    ctx = _ctx()
    try:
        method, layer, _ = _triton_layer("deepep_high_throughput", dp=2, ep=2, ep_rank=1)
        vllm_modular.make_process_weights_after_loading(lambda self, layer: None, ctx)(
            method, layer)
        assert getattr(method, vllm_modular.TAKEN_OVER) == vllm_modular.TRITON
        route = getattr(method, vllm_modular.ROUTE)
        _, ids = _routing()
        handed = route.ids(ids.masked_fill(torch.tensor([[True, False]] * 40), -1))
        assert int((handed == -1).sum()) == 40
        assert route.expert_map(layer.expert_map, torch.device("cpu")) is layer.expert_map
        assert route.kernel_num_experts(E) == E
    finally:
        ctx.close()


def test_a_backend_that_computes_dropped_rows_refuses_the_layer():
    ctx = _ctx()
    try:
        method, layer, _ = _triton_layer("moonep", dp=2, ep=2, ep_rank=0)
        original = []
        vllm_modular.make_process_weights_after_loading(
            lambda self, layer: original.append(layer), ctx)(method, layer)
        assert original == [layer]
        assert getattr(method, vllm_modular.TAKEN_OVER) is False
        reason = ctx.stats["layers_not_taken_over"][layer.layer_name]
        assert reason.startswith("drop_token_ratio > 0 with all2all backend moonep: MoonEP "
                                 "maps negative ids to expert 0")
    finally:
        ctx.close()


def test_with_ratio_zero_the_same_backend_is_taken_over_and_ids_pass_unchanged():
    ctx = _ctx(0.0)
    try:
        method, layer, _ = _triton_layer("moonep", dp=2, ep=2, ep_rank=0)
        vllm_modular.make_process_weights_after_loading(lambda self, layer: None, ctx)(
            method, layer)
        assert getattr(method, vllm_modular.TAKEN_OVER) == vllm_modular.TRITON
        route = getattr(method, vllm_modular.ROUTE)
        _, ids = _routing()
        assert route.ids(ids) is ids and route.kernel_num_experts(E) == E
        assert route.expert_map(layer.expert_map, torch.device("cpu")) is layer.expert_map
    finally:
        ctx.close()
