"""The torch compute backend against a naive per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_patch.impls.moe.experts import select_backend, torch_backend
from ascend_patch.impls.moe.experts.torch_backend import moe_forward

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 33, 64, 48, 8, 3


def make_layer(dtype=torch.float32, seed=0, tokens=TOKENS):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    w13 = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=gen) / INTERMEDIATE**0.5
    weights = torch.rand(tokens, TOP_K, generator=gen).softmax(dim=1)
    ids = torch.argsort(torch.rand(tokens, EXPERTS, generator=gen), dim=1)[:, :TOP_K]
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


def reference_moe(x, w13, w2, weights, ids, expert_map=None, act=F.silu):
    """sum_j weights[t, j] * down(act(gate) * up) for every token and slot, in float32."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            expert = int(ids[t, j]) if expert_map is None else int(expert_map[ids[t, j]])
            if expert < 0:
                continue
            gate_up = w13[expert].float() @ x[t].float()
            hidden = act(gate_up[:INTERMEDIATE]) * gate_up[INTERMEDIATE:]
            out[t] += float(weights[t, j]) * (w2[expert].float() @ hidden)
    return out


@pytest.mark.parametrize("batched", [False, True, None])
def test_all_rows_float32_matches_reference(batched):
    x, w13, w2, weights, ids = make_layer()
    out = moe_forward(x, w13, w2, weights, ids, batched=batched)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_moe(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True, None])
def test_bf16_matches_reference_within_bf16_tolerance(batched):
    x, w13, w2, weights, ids = make_layer(torch.bfloat16)
    out = moe_forward(x, w13, w2, weights, ids, batched=batched)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), reference_moe(x, w13, w2, weights, ids), rtol=3e-2, atol=3e-2
    )


@pytest.mark.parametrize("batched", [False, True, None])
def test_dropped_rows_contribute_exactly_zero(batched):
    x, w13, w2, weights, ids = make_layer(seed=1)
    keep = torch.rand(TOKENS, TOP_K, generator=torch.Generator().manual_seed(5)) < 0.6
    keep[0] = False  # a token with every row dropped gets zero
    out = moe_forward(x, w13, w2, weights, ids, keep=keep, batched=batched)
    expected = reference_moe(x, w13, w2, torch.where(keep, weights, 0.0), ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[0] == 0).all()
    # The dropped rows' weights do not matter at all: they are never computed.
    poisoned = torch.where(keep, weights, torch.tensor(float("nan")))
    assert torch.equal(moe_forward(x, w13, w2, poisoned, ids, keep=keep, batched=batched), out)


@pytest.mark.parametrize("batched", [False, True, None])
def test_complementary_expert_maps_sum_to_the_full_output(batched):
    x, w13, w2, weights, ids = make_layer(seed=2)
    full = moe_forward(x, w13, w2, weights, ids, batched=batched)
    halves = []
    for rank in range(2):
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.long)
        local = torch.arange(rank * EXPERTS // 2, (rank + 1) * EXPERTS // 2)
        expert_map[local] = torch.arange(EXPERTS // 2)
        half = moe_forward(
            x, w13[local], w2[local], weights, ids, expert_map=expert_map, batched=batched
        )
        torch.testing.assert_close(
            half, reference_moe(x, w13, w2, weights, ids, expert_map=_global(expert_map, local))
        )
        halves.append(half)
    torch.testing.assert_close(halves[0] + halves[1], full, rtol=1e-5, atol=1e-5)


def _global(expert_map, local):
    """The same placement expressed over the full weight tensors (for the reference)."""
    mapped = torch.full_like(expert_map, -1)
    mapped[local] = local
    return mapped


@pytest.mark.parametrize("batched", [False, True, None])
def test_zero_tokens(batched):
    x, w13, w2, weights, ids = make_layer(tokens=0)
    out = moe_forward(x, w13, w2, weights, ids, batched=batched)
    assert out.shape == (0, HIDDEN) and out.dtype == x.dtype


@pytest.mark.parametrize("batched", [False, True, None])
def test_router_weight_on_input_for_top1(batched):
    x, w13, w2, weights, ids = make_layer(seed=3)
    weights, ids = weights[:, :1], ids[:, :1]
    out = moe_forward(x, w13, w2, weights, ids, apply_router_weight_on_input=True, batched=batched)
    expected = reference_moe(x * weights, w13, w2, torch.ones_like(weights), ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gelu_and_unknown_activation():
    x, w13, w2, weights, ids = make_layer(seed=4)
    out = moe_forward(x, w13, w2, weights, ids, activation="gelu")
    torch.testing.assert_close(
        out, reference_moe(x, w13, w2, weights, ids, act=F.gelu), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="activation"):
        moe_forward(x, w13, w2, weights, ids, activation="relu2")


def test_select_backend():
    assert select_backend("auto", torch.device("cpu")) is torch_backend.moe_forward
    assert select_backend("torch", torch.device("cpu")) is torch_backend.moe_forward
    from ascend_patch.impls.moe.experts import npu_backend

    assert select_backend("npu", torch.device("cpu")) is npu_backend.moe_forward
    with pytest.raises(ValueError):
        select_backend("cuda", torch.device("cpu"))


def test_without_native_bf16_the_looped_path_computes_in_float32(monkeypatch):
    """On a CPU without native bf16 only the output is rounded to bf16: within one bf16 step
    of the float32 reference, where the bf16 matmuls (native bf16 CPUs) round the
    intermediate products too."""
    x, w13, w2, weights, ids = make_layer(torch.bfloat16, seed=3)
    reference = reference_moe(x, w13, w2, weights, ids)
    errors = {}
    for fast in (False, True):
        monkeypatch.setattr(torch_backend, "_fast_cpu_bf16", lambda fast=fast: fast)
        out = moe_forward(x, w13, w2, weights, ids, batched=False)
        assert out.dtype == torch.bfloat16
        errors[fast] = float(((out.float() - reference).abs()
                              / reference.abs().clamp(min=1e-2)).max())
    assert errors[False] <= 2.0 ** -8
    assert errors[True] > errors[False]
