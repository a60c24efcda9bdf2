"""The emulated quantized NPU ops (emulation/quant_ops.py) against the formulas they follow,
written here independently (CANN's and vllm-ascend's goldens), and their refusals.

The contract run trusts these emulations; a wrong one would make it pass or fail for the
wrong reason, so each is checked on its own, with no vLLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ascend.emulation import quant_ops


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dynamic_quant_is_per_row_symmetric_int8():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.125, -0.0625]], dtype=torch.bfloat16)
    y, scale = quant_ops.dynamic_quant(x)
    assert y.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, torch.tensor([2.0 / 127, 0.25 / 127]))
    assert y.tolist() == [[64, -127, 32], [127, 64, -32]]  # round(x / scale), half to even


def test_dynamic_quant_takes_empty_input_and_refuses_what_cann_does_not_document():
    y, scale = quant_ops.dynamic_quant(torch.empty(0, 16, dtype=torch.bfloat16))
    assert y.shape == (0, 16) and scale.shape == (0,)
    with pytest.raises(AssertionError, match="fp16/bf16"):
        quant_ops.dynamic_quant(torch.ones(2, 4))
    with pytest.raises(AssertionError, match="2-8 dims"):
        quant_ops.dynamic_quant(torch.ones(4, dtype=torch.bfloat16))


def test_int4_packing_round_trips_in_vllm_ascend_layout():
    values = torch.randint(-8, 8, (3, 4, 16), generator=_gen(), dtype=torch.int8)
    packed = quant_ops.pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (3, 4, 2)
    assert torch.equal(quant_ops.unpack_int4(packed), values)
    # Low nibble first: 1, -1 -> 0xF1 (pack_int4_to_int8 in w4a8.py).
    first = quant_ops.pack_int4(torch.tensor([[1, -1, 0, 0, 0, 0, 0, 0]], dtype=torch.int8))
    assert int(first.view(torch.uint8)[0, 0]) == 0xF1


def test_a8w4_grouped_matmul_with_offset_correction_is_x_times_the_dequantized_weight():
    """vllm-ascend's A8W4 golden splits x into nibbles and adds a bias of 8 * sum(w * s);
    with that bias (what process_scale computes at load) the op is x @ (w * s) * x_scale."""
    gen = _gen(1)
    rows, k, n, groups = 5, 16, 16, 2
    x = torch.randint(-128, 128, (rows, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (1, k, n), generator=gen, dtype=torch.int8)
    s = torch.rand(1, groups, n, generator=gen) / 10 + 0.01
    per_row = s.repeat_interleave(k // groups, dim=1)
    bias = 8 * (w.float() * per_row).sum(dim=1)
    pts = torch.rand(rows, generator=gen) + 0.5
    out = quant_ops.grouped_matmul_quant(
        x, quant_ops.pack_int4(w), scale=quant_ops.float_scale_to_int64(s), bias=bias,
        per_token_scale=pts, group_list=torch.tensor([rows]), group_list_type=1,
        output_dtype=torch.bfloat16)
    expected = (x.double() @ (w[0].double() * per_row[0].double())) * pts.double().unsqueeze(-1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_a8w8_grouped_matmul_applies_channel_and_token_scales_per_group():
    gen = _gen(2)
    x = torch.randint(-128, 128, (6, 8), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (2, 8, 4), generator=gen, dtype=torch.int8)
    scale = torch.rand(2, 4, generator=gen)
    pts = torch.rand(6, generator=gen)
    out = quant_ops.grouped_matmul_quant(
        x, w, scale=scale, bias=None, per_token_scale=pts, group_list=torch.tensor([2, 3]),
        group_list_type=1, output_dtype=torch.float16)
    groups = [0, 0, 1, 1, 1]
    for row, group in enumerate(groups):
        want = (x[row].double() @ w[group].double()) * scale[group].double() * float(pts[row])
        torch.testing.assert_close(out[row].double(), want, rtol=2e-3, atol=2e-3)
    assert out[5].isnan().all()  # past the last group: unspecified


def test_gmm_swiglu_quant_matches_vllm_ascends_golden():
    gen = _gen(3)
    x = torch.randint(-128, 128, (5, 8), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (2, 8, 6), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(2, 6, generator=gen) / 100
    x_scale = torch.rand(5, generator=gen)
    out, out_scale, _ = quant_ops.gmm_swiglu_quant(x, w, w_scale, x_scale, torch.tensor([2, 5]))
    for rows, group in ((slice(0, 2), 0), (slice(2, 5), 1)):
        deq = (x[rows].to(torch.int32) @ w[group].to(torch.int32)).float() * w_scale[group]
        deq = deq * x_scale[rows].reshape(-1, 1)
        left, right = deq.chunk(2, dim=-1)
        act = left * torch.sigmoid(left) * right
        inv = 127 / act.abs().amax(dim=-1)
        assert torch.equal(out[rows], torch.round(act * inv.reshape(-1, 1)).to(torch.int8))
        torch.testing.assert_close(out_scale[rows], 1 / inv)


def test_dequant_swiglu_quant_per_group_and_empty():
    gen = _gen(4)
    x = torch.randint(-2000, 2000, (4, 6), generator=gen, dtype=torch.int32)
    w_scale = torch.rand(2, 6, generator=gen) / 100
    a_scale = torch.rand(4, generator=gen)
    out, scale = quant_ops.dequant_swiglu_quant(
        x, weight_scale=w_scale, activation_scale=a_scale, group_index=torch.tensor([1, 3]),
        quant_mode=1)
    deq = x[1:].float() * w_scale[1] * a_scale[1:].unsqueeze(-1)
    left, right = deq.chunk(2, dim=-1)
    want, want_scale = quant_ops.dynamic_quant((F.silu(left) * right).to(torch.bfloat16))
    assert torch.equal(out[1:], want) and torch.equal(scale[1:], want_scale)
    empty, empty_scale = quant_ops.dequant_swiglu_quant(
        x[:0], weight_scale=w_scale, activation_scale=a_scale[:0],
        group_index=torch.tensor([0, 0]), quant_mode=1)
    assert empty.shape == (0, 3) and empty_scale.shape == (0,)


def test_grouped_quant_ops_refuse_an_empty_input_cann_does_not_document():
    x = torch.empty(0, 8, dtype=torch.int8)
    w = torch.zeros(2, 8, 6, dtype=torch.int8)
    with pytest.raises(AssertionError, match="empty x"):
        quant_ops.gmm_swiglu_quant(x, w, torch.ones(2, 6), torch.ones(0), torch.zeros(2).long())
    with pytest.raises(AssertionError, match="empty x"):
        quant_ops.grouped_matmul_quant(
            x, w, scale=torch.ones(2, 6), bias=None, per_token_scale=torch.ones(0),
            group_list=torch.zeros(2).long(), group_list_type=1, output_dtype=torch.bfloat16)


def test_group_lists_past_the_rows_or_in_the_wrong_dtype_are_refused():
    x = torch.ones(3, 8, dtype=torch.int8)
    w = torch.zeros(2, 8, 6, dtype=torch.int8)
    with pytest.raises(AssertionError, match="more rows"):
        quant_ops.gmm_swiglu_quant(x, w, torch.ones(2, 6), torch.ones(3), torch.tensor([2, 4]))
    with pytest.raises(AssertionError, match="group_list dtype"):
        quant_ops.gmm_swiglu_quant(x, w, torch.ones(2, 6), torch.ones(3),
                                   torch.tensor([1, 3], dtype=torch.int32))
