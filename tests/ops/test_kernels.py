"""Device ops: the portable path against vLLM's own ops, the NPU glue against the emulation."""

import pytest
import torch

from ascend_patch.impls.ops import kernels

from . import npu_ops_emulation as npu

vllm_layernorm = pytest.importorskip("vllm.ir.ops.layernorm")


def bf16_close(actual, expected):
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("shape", [(1, 64), (7, 256), (3, 5, 128)])
def test_rms_norm_matches_vllm(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16)
    weight = torch.randn(shape[-1], dtype=torch.bfloat16)
    expected = vllm_layernorm.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), expected, atol=0, rtol=0)


def test_fused_add_rms_norm_matches_vllm():
    torch.manual_seed(1)
    x, residual = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    weight = torch.randn(256, dtype=torch.bfloat16)
    expected_out, expected_residual = vllm_layernorm.fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    out, new_residual = kernels.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)


def test_rms_norm_without_weight():
    x = torch.randn(4, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, None, 1e-6), expected)


def test_silu_and_mul_matches_vllm():
    from vllm.model_executor.layers.activation import SiluAndMul

    x = torch.randn(5, 2 * 96, dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.silu_and_mul(x), SiluAndMul.forward_native(x), atol=0, rtol=0)


def test_npu_path_calls_the_npu_ops_and_agrees():
    torch.manual_seed(2)
    x, residual = torch.randn(2, 6, 128, dtype=torch.bfloat16)
    weight = torch.randn(128, dtype=torch.bfloat16)
    npu.calls.clear()
    out = kernels.rms_norm(x, weight, 1e-6, ops=npu)
    out_res, summed = kernels.rms_norm(x, weight, 1e-6, residual, ops=npu)
    act = kernels.silu_and_mul(torch.cat([x, residual], dim=-1), ops=npu)
    assert npu.calls == ["npu_rms_norm", "npu_add_rms_norm", "npu_swiglu"]
    bf16_close(out, kernels.rms_norm(x, weight, 1e-6))
    expected_out, expected_sum = kernels.rms_norm(x, weight, 1e-6, residual)
    bf16_close(out_res, expected_out)
    torch.testing.assert_close(summed, expected_sum, atol=0, rtol=0)
    bf16_close(act, kernels.silu_and_mul(torch.cat([x, residual], dim=-1)))


def test_npu_rms_norm_without_weight_uses_ones():
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernels.rms_norm(x, None, 1e-6, ops=npu), kernels.rms_norm(x, None, 1e-6))
