"""The vLLM adapter on CUDA's Triton backend (contract: vLLM's real classes), checked on CPU:
what a taken-over layer hands vLLM's modular kernel. The kernel itself never ran here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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
    context = PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=ratio,
                                                                  min_tokens=0))
    # One process plays one rank of the EP group: no group to compare the config over.
    vllm_modular.state_of(context).config_checked = True
    return context


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
        (kw,), dropped = calls, ctx.read_stats()["rows_dropped"]
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


def _fields_of(cls, **candidates):
    """cls built from the candidates its dataclass fields name (the lines name a few
    fields differently: 0.23's intermediate_size_per_partition is 0.32's intermediate_size)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in candidates.items() if k in names})


def _line():
    import vllm

    return ".".join(vllm.__version__.split(".")[:2])


def _real_triton_experts(monkeypatch, ep=1, ep_rank=0):
    """vLLM's own TritonExperts with its CUDA-only pieces replaced by the torch emulations of
    triton_align.py (align op, moe_sum op, the fused kernel's per-block result) and the
    kernel-config lookup pinned: everything else of TritonExperts.apply is vLLM's code."""
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        FusedMoEQuantConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    from ascend_patch.lab import triton_align

    calls = {"align": [], "sum": []}

    def align(*args, **kwargs):
        calls["align"].append((args[1], args[6] if len(args) > 6 else kwargs.get("expert_map")))
        return triton_align.align_op(*args, **kwargs)

    def moe_sum(input, output, topk_ids=None, expert_map=None):
        calls["sum"].append((topk_ids, expert_map))
        triton_align.moe_sum_op(input, output, topk_ids, expert_map)

    def invoke(a, b, c, a_scale, b_scale, topk_weights, sorted_ids, expert_ids, post_pad,
               mul_routed_weight, top_k, config, **_):
        triton_align.fused_moe_blocks(a, b, c, topk_weights, sorted_ids, expert_ids, post_pad,
                                      mul_routed_weight, top_k, config["BLOCK_SIZE_M"])

    monkeypatch.setattr(ops, "moe_align_block_size", align)
    monkeypatch.setattr(ops, "moe_sum", moe_sum)
    monkeypatch.setattr(triton_moe, "invoke_fused_moe_triton_kernel", invoke)
    # vLLM disables Triton on a CPU (a placeholder `tl`): only compute_type reads it here.
    monkeypatch.setattr(triton_moe, "tl", SimpleNamespace(
        float32="float32", float16="float16", bfloat16="bfloat16"))
    monkeypatch.setattr(triton_moe, "try_get_optimal_moe_config", lambda *a, **k: {
        "BLOCK_SIZE_M": 4, "BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 8, "GROUP_SIZE_M": 1})
    parallel = FusedMoEParallelConfig(
        tp_size=1, pcp_size=1, dp_size=1, ep_size=ep, tp_rank=0, pcp_rank=0, dp_rank=0,
        ep_rank=ep_rank, sp_size=1, use_ep=ep > 1, all2all_backend="allgather_reducescatter",
        enable_eplb=False)
    config = _fields_of(
        FusedMoEConfig, num_experts=E, experts_per_token=2, hidden_dim=16,
        intermediate_size=8, intermediate_size_per_partition=8,
        num_local_experts=E // ep, num_logical_experts=E, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=parallel, in_dtype=torch.float32)
    return triton_moe.TritonExperts(config, FusedMoEQuantConfig.make()), calls


@pytest.mark.parametrize("ep_rank", [None, 0, 1], ids=["no_ep", "ep2_rank0", "ep2_rank1"])
def test_vllms_triton_experts_skip_what_the_route_hands_them(monkeypatch, ep_rank):
    """vLLM 0.32's TritonExperts.apply run on CPU (CUDA ops emulated) on the route's ids and
    map: the align op gets the map and E + 1 experts, no dropped row is multiplied, the
    pad-aware sum gets the map, and the output is the kept rows' (the workspaces start as
    NaN: a dropped slot summed or read would show)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from ascend_patch.impls.moe.adapters.triton_route import triton_route

    ep = 1 if ep_rank is None else 2
    experts, calls = _real_triton_experts(monkeypatch, ep, ep_rank or 0)
    gen = torch.Generator().manual_seed(1)
    local = E // ep
    layer_map = None
    owner = torch.arange(E) // local
    if ep_rank is not None:
        layer_map = torch.where(owner == ep_rank, torch.arange(E) % local, -1).to(torch.int32)
    weights, ids = _routing()
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[::2, 0] = False  # dropped rows
    x = torch.randn(40, 16, generator=gen)
    w1 = torch.randn(local, 16, 16, generator=gen) / 4  # [E_local, 2I, H]
    w2 = torch.randn(local, 16, 8, generator=gen) / 3  # [E_local, H, I]
    route = triton_route(SimpleNamespace(use_all2all_kernels=False, all2all_backend="naive"),
                         E, 0.3)
    handed = route.ids(ids.masked_fill(~keep, -1))
    emap = route.expert_map(layer_map, torch.device("cpu"))
    kept_weights = weights.masked_fill(~keep, 0)
    shapes = experts.workspace_shapes(40, 16, 16, 2, E + 1, local, None, MoEActivation.SILU)
    ws13, ws2 = (torch.full(s, float("nan")) for s in shapes[:2])
    out = torch.empty(40, 16)
    experts.apply(out, x, w1, w2, kept_weights, handed, MoEActivation.SILU,
                  route.kernel_num_experts(E), emap, None, None, ws13, ws2, None, False)
    (align_experts, align_map), = calls["align"]
    (sum_ids, sum_map), = calls["sum"]
    assert align_experts == E + 1
    if _line() == "0.23":
        # 0.23 aligns every row, then maps each block's expert (the sentinel's and off-rank
        # experts' blocks become -1: zeros, no GEMM) and sums every slot.
        assert align_map is None and (sum_ids, sum_map) == (None, None)
    else:
        # 0.32: ignore_invalid_experts (map applied while aligning), pad-aware sum.
        assert align_map is emap and sum_ids is handed and sum_map is emap
    want = torch.zeros(40, 16)
    for t in range(40):
        for k in range(2):
            e = int(ids[t, k])
            if keep[t, k] and (layer_map is None or layer_map[e] >= 0):
                le = e if layer_map is None else int(layer_map[e])
                h = w1[le] @ x[t]
                want[t] += weights[t, k] * (w2[le] @ (torch.nn.functional.silu(h[:8]) * h[8:]))
    assert torch.allclose(out, want, atol=1e-5)


def test_vllms_triton_experts_cannot_take_minus_one_without_the_route(monkeypatch):
    """The old way (id -1 with the layer's map, here none): vLLM's alignment is handed an id
    out of its range; the emulation refuses what the CUDA op would index out of bounds."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    experts, _ = _real_triton_experts(monkeypatch)
    weights, ids = _routing()
    ids = ids.masked_fill(torch.zeros_like(ids, dtype=torch.bool).index_fill_(0,
                          torch.tensor([0]), True), -1)
    shapes = experts.workspace_shapes(40, 16, 16, 2, E, E, None, MoEActivation.SILU)
    ws13, ws2 = (torch.empty(s) for s in shapes[:2])
    with pytest.raises(ValueError, match="out of moe_align_block_size's range"):
        experts.apply(torch.empty(40, 16), torch.randn(40, 16), torch.randn(E, 16, 16),
                      torch.randn(E, 16, 8), weights, ids, MoEActivation.SILU, E, None, None,
                      None, ws13, ws2, None, False)
