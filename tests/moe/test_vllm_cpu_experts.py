"""vLLM's own CPU experts under `moe.capacity` (adapters/vllm_cpu_experts.py): the installed
line's real `CPUUnquantizedExperts`, its prepack and its kernel, against the same class
computing every row.

Exact equality throughout: the kernel computes each row on its own and sums a token's rows
in slot order in float32, so handing it only the kept rows gives, bit for bit, what it gives
on the whole routing with the dropped rows at weight 0 (experts/vllm_cpu_kernel.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import vllm_cpu_experts, vllm_modular
from ascend_patch.impls.moe.experts import vllm_cpu_kernel
from ascend_patch.impls.moe.options import CapacityOptions
from tests.moe.test_vllm_modular import real_moe_config, real_parallel_config

cpu_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
# vLLM 0.32 has CPU experts classes; 0.23 prepacks in CPUFusedMOE (tests at the end).
line_0_32 = pytest.mark.skipif(not hasattr(cpu_moe, "CPUUnquantizedExperts"),
                               reason="this line has no CPUUnquantizedExperts (0.23)")

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 3, 64, 32


@pytest.fixture
def ctx():
    context = PatchContext("moe", "moe.capacity", CapacityOptions(min_tokens=0))
    yield context
    context.close()


def _moe_config(num_local_experts=EXPERTS):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    names = set(FusedMoEConfig.__dataclass_fields__)
    size = ("intermediate_size" if "intermediate_size" in names
            else "intermediate_size_per_partition")
    return real_moe_config(real_parallel_config(), experts_per_token=TOP_K, hidden_dim=HIDDEN,
                           num_local_experts=num_local_experts, in_dtype=torch.bfloat16,
                           **{size: INTERMEDIATE})


def _layer(w13, w2, name="model.layers.1.mlp.experts"):
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(w13.clone(), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2.clone(), requires_grad=False)
    layer.layer_name = name
    return layer


def _experts(cls, w13, w2, ctx=None, name="model.layers.1.mlp.experts"):
    """(experts, layer): `cls` built as vLLM's kernel builder builds it, weights prepacked."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    experts = cls(_moe_config(w13.shape[0]), FUSED_MOE_UNQUANTIZED_CONFIG)
    layer = _layer(w13, w2, name)
    experts.process_weights_after_loading(layer)
    return experts, layer


def _vllm_apply(experts, layer, x, weights, ids):
    """vLLM's own apply on every row of the routing (ids local)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    out = torch.empty_like(x)
    empty = x.new_empty(0)
    cpu_moe.CPUUnquantizedExperts.apply(
        experts, out, x, layer.w13_weight, layer.w2_weight, weights.float().contiguous(),
        ids.to(torch.int32).contiguous(), MoEActivation.SILU, layer.w13_weight.shape[0], None,
        None, None, empty, empty, None, False)
    return out


def _problem(tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=g) / 8).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=g) / 8).bfloat16()
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    ids = torch.rand(tokens, EXPERTS, generator=g).argsort(dim=1)[:, :TOP_K]  # distinct
    weights = torch.rand(tokens, TOP_K, generator=g)
    drop = torch.rand(tokens, TOP_K, generator=g) < 0.4
    return w13, w2, x, weights, ids.to(torch.int32), drop


def _ours(ctx, w13, w2):
    state = vllm_modular.state_of(ctx)
    cls = vllm_cpu_experts.native_experts_class(state, cpu_moe.CPUUnquantizedExperts)
    return _experts(cls, w13, w2)


@line_0_32
def test_at_r0_the_output_is_vllm_s_own_bit_for_bit(ctx):
    w13, w2, x, weights, ids, _ = _problem(40)
    ours, layer = _ours(ctx, w13, w2)
    native, native_layer = _experts(cpu_moe.CPUUnquantizedExperts, w13, w2)
    assert torch.equal(layer.w13_weight, native_layer.w13_weight)  # vLLM's prepack, once
    got = ours.compute(x, layer.w13_weight, layer.w2_weight, weights, ids, None, False)
    assert torch.equal(got, _vllm_apply(native, native_layer, x, weights, ids))


@line_0_32
@pytest.mark.parametrize("rows_per_expert_read", [0, 1000],
                         ids=["a call per rows-per-token group", "one padded call"])
def test_dropped_rows_are_left_out_exactly_through_the_custom_op(ctx, monkeypatch,
                                                                  rows_per_expert_read):
    """Rows dropped by the plan reach the experts as id -1; the output is vLLM's on the full
    routing with those rows at weight 0, and tokens whose rows are all dropped get 0."""
    monkeypatch.setattr(vllm_cpu_kernel, "ROWS_PER_EXPERT_READ", rows_per_expert_read)
    w13, w2, x, weights, ids, drop = _problem(50, seed=1)
    drop[:3] = True  # three tokens lose every row
    ours, layer = _ours(ctx, w13, w2)
    native, native_layer = _experts(cpu_moe.CPUUnquantizedExperts, w13, w2)
    out = torch.empty_like(x)
    ours.apply(out, x, layer.w13_weight, layer.w2_weight, weights, ids.masked_fill(drop, -1),
               None, EXPERTS, None, None, None, x.new_empty(0), x.new_empty(0), None, False)
    expected = _vllm_apply(native, native_layer, x, weights.masked_fill(drop, 0.0), ids)
    assert torch.equal(out, expected)
    assert not out[:3].any()


@line_0_32
def test_expert_map_computes_the_local_experts_only(ctx):
    """EP: the rank holds experts 2..5 as local 0..3; the sum over both halves' ranks is the
    whole layer's."""
    w13, w2, x, weights, ids, drop = _problem(30, seed=2)
    local = torch.arange(2, 6)
    expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(4, dtype=torch.int32)
    ours, layer = _ours(ctx, w13[local].contiguous(), w2[local].contiguous())
    native, native_layer = _experts(cpu_moe.CPUUnquantizedExperts, w13, w2)
    kept_ids = ids.masked_fill(drop, -1)
    got = ours.compute(x, layer.w13_weight, layer.w2_weight, weights, kept_ids, expert_map,
                       False)
    is_local = (ids >= 2) & (ids < 6) & ~drop
    expected = _vllm_apply(native, native_layer, x, weights * is_local, ids)
    assert torch.equal(got, expected)


@line_0_32
def test_zero_tokens(ctx):
    w13, w2, x, weights, ids, _ = _problem(0)
    ours, layer = _ours(ctx, w13, w2)
    got = ours.compute(x, layer.w13_weight, layer.w2_weight, weights, ids, None, False)
    assert got.shape == (0, HIDDEN) and got.dtype == torch.bfloat16


def _method(experts_cls):
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    return SimpleNamespace(unquantized_backend=UnquantizedMoeBackend.CPU,
                           experts_cls=experts_cls)


@line_0_32
@pytest.mark.parametrize("backend", ["auto", "vllm_cpu"])
def test_auto_and_vllm_cpu_subclass_the_class_vllm_chose(backend):
    context = PatchContext("moe", "moe.capacity", CapacityOptions(backend=backend))
    try:
        state = vllm_modular.state_of(context)
        chosen = vllm_cpu_experts.experts_class_for(_method(cpu_moe.X86CPUUnquantizedExperts),
                                                    state)
        assert chosen.__mro__[1] is cpu_moe.X86CPUUnquantizedExperts
        assert chosen.isa == "amx" and chosen.ascend_patch_backend == "vllm_cpu"
    finally:
        context.close()


@line_0_32
def test_torch_keeps_the_standard_layout_experts():
    context = PatchContext("moe", "moe.capacity", CapacityOptions(backend="torch"))
    try:
        state = vllm_modular.state_of(context)
        chosen = vllm_cpu_experts.experts_class_for(_method(cpu_moe.CPUUnquantizedExperts),
                                                    state)
        assert chosen is state.experts_cls and chosen.ascend_patch_backend == "torch"
    finally:
        context.close()


@line_0_32
def test_vllm_cpu_without_vllm_s_cpu_experts_is_refused():
    context = PatchContext("moe", "moe.capacity", CapacityOptions(backend="vllm_cpu"))
    try:
        state = vllm_modular.state_of(context)
        with pytest.raises(Exception, match="backend: vllm_cpu needs"):
            vllm_cpu_experts.experts_class_for(_method(None), state)
    finally:
        context.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=3, max_size=9),
       st.floats(0, 300, allow_nan=False))
def test_the_calls_cover_every_token_at_the_least_cost(group_sizes, call_cost):
    """_widths against every way to cut the counts 1..k into calls (brute force)."""
    top_k = len(group_sizes) - 1
    calls = vllm_cpu_kernel._widths(group_sizes, call_cost)

    def cost(cuts):  # cuts: the widths of the calls, increasing, ending at k
        total, low = 0.0, 0
        for width in cuts:
            tokens = sum(group_sizes[low + 1:width + 1])
            if tokens:
                total += call_cost + sum(group_sizes[c] * (width - c)
                                         for c in range(low + 1, width + 1))
            low = width
        return total

    best = min(cost(list(cuts) + [top_k]) for n in range(top_k)
               for cuts in itertools.combinations(range(1, top_k), n))
    assert sum(tokens for _, tokens in calls) == sum(group_sizes[1:])
    assert [w for w, _ in calls] == sorted({w for w, _ in calls})
    assert cost([w for w, _ in calls] + [top_k]) == pytest.approx(best)


# ---- vLLM 0.23: CPUFusedMOE prepacks, 0.23's cpu_fused_moe computes the kept rows ----

def _has_0_23_kernel() -> bool:
    import vllm._custom_ops  # noqa: F401  (loads the extension that registers the ops)

    return not hasattr(cpu_moe, "CPUUnquantizedExperts") and hasattr(torch.ops._C,
                                                                      "cpu_fused_moe")


# vLLM 0.23's AVX2 extension (_C_AVX2, what an AVX2-only CPU loads) has no cpu_fused_moe:
# there 0.23 keeps the torch backend, and these run on AVX-512/AMX hosts only.
cpu_fused_moe_0_23 = pytest.mark.skipif(
    not _has_0_23_kernel(), reason="vLLM 0.23 with its grouped-gemm CPU kernel only")


@pytest.mark.skipif(hasattr(cpu_moe, "CPUUnquantizedExperts"), reason="vLLM 0.23 only")
def test_0_23_without_the_kernel_auto_keeps_the_torch_backend(ctx):
    from ascend_patch.impls.moe.adapters import vllm_0_23_cpu_monolithic as cpu_0_23

    state = vllm_modular.state_of(ctx)
    w13, w2, *_ = _problem(1)
    isa = cpu_0_23.grouped_gemm_isa_0_23(_layer(w13, w2), state.upstream)
    assert (isa is None) == (not hasattr(torch.ops._C, "cpu_fused_moe"))


def _ours_0_23(ctx, w13, w2, activation="silu"):
    """(experts, layer): what vllm_0_23_cpu_monolithic builds for a CPU layer."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.cpu_fused_moe import CPUFusedMOE

    from ascend_patch.impls.moe.adapters import vllm_0_23_cpu_monolithic as cpu_0_23

    state = vllm_modular.state_of(ctx)
    layer = _layer(w13, w2)
    layer.activation = activation
    assert cpu_0_23.grouped_gemm_isa_0_23(layer, state.upstream) == "vec"
    cpu_fused = CPUFusedMOE(layer)  # vLLM's prepack, in place
    experts = cpu_0_23.experts_class_0_23(state)(_moe_config(w13.shape[0]),
                                                 FUSED_MOE_UNQUANTIZED_CONFIG)
    cpu_0_23.attach_0_23(experts, layer, cpu_fused, state)
    return experts, layer


def _vllm_0_23(layer, x, weights, ids):
    from vllm import _custom_ops

    return _custom_ops.cpu_fused_moe(x, layer.w13_weight, layer.w2_weight, None, None,
                                     weights.float().contiguous(),
                                     ids.to(torch.int32).contiguous(), "silu", "vec")


@cpu_fused_moe_0_23
def test_0_23_at_r0_and_with_drops_the_output_is_vllm_s_kernel_s(ctx):
    w13, w2, x, weights, ids, drop = _problem(40, seed=4)
    ours, layer = _ours_0_23(ctx, w13, w2)
    r0 = ours.compute(x, layer.w13_weight, layer.w2_weight, weights, ids, None, False)
    assert torch.equal(r0, _vllm_0_23(layer, x, weights, ids))
    out = torch.empty_like(x)
    ours.apply(out, x, layer.w13_weight, layer.w2_weight, weights, ids.masked_fill(drop, -1),
               None, EXPERTS, None, None, None, x.new_empty(0), x.new_empty(0), None, False)
    assert torch.equal(out, _vllm_0_23(layer, x, weights.masked_fill(drop, 0.0), ids))


@cpu_fused_moe_0_23
def test_0_23_expert_map_and_zero_tokens(ctx):
    w13, w2, x, weights, ids, drop = _problem(30, seed=5)
    local = torch.arange(4, 8)
    expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(4, dtype=torch.int32)
    ours, layer = _ours_0_23(ctx, w13[local].contiguous(), w2[local].contiguous())
    _, full = _ours_0_23(ctx, w13, w2)
    got = ours.compute(x, layer.w13_weight, layer.w2_weight, weights, ids.masked_fill(drop, -1),
                       expert_map, False)
    is_local = (ids >= 4) & ~drop
    assert torch.equal(got, _vllm_0_23(full, x, weights * is_local, ids))
    empty = ours.compute(x[:0], layer.w13_weight, layer.w2_weight, weights[:0], ids[:0],
                         expert_map, False)
    assert empty.shape == (0, HIDDEN)
