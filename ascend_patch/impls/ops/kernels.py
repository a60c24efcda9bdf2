"""The op math: one function per op with an NPU path (torch_npu) and a portable path.

The NPU path is chosen by the tensor's device. `ops` lets tests run the NPU path on CPU
against an emulation of the torch_npu functions it calls.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch


def torch_npu_module() -> ModuleType:
    import torch_npu

    return torch_npu


def _is_npu(x: torch.Tensor) -> bool:
    return x.device.type == "npu"


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    ops: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, returns (norm(x + residual), x + residual) like vLLM."""
    if ops is not None or _is_npu(x):
        return _rms_norm_npu(x, weight, eps, residual, ops or torch_npu_module())
    orig_dtype = x.dtype
    xf = x.float()
    if residual is not None:
        xf = xf + residual.float()
        residual = xf.to(orig_dtype)
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out.to(weight.dtype) * weight
    out = out.to(orig_dtype)
    return out if residual is None else (out, residual)


def _rms_norm_npu(x, weight, eps, residual, ops):
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    if residual is not None:
        # npu_add_rms_norm returns (y, rstd, x + residual).
        out, _, summed = ops.npu_add_rms_norm(x, residual, weight, eps)
        return out, summed
    return ops.npu_rms_norm(x, weight, eps)[0]


def silu_and_mul(x: torch.Tensor, *, ops: Any = None) -> torch.Tensor:
    if ops is not None or _is_npu(x):
        return (ops or torch_npu_module()).npu_swiglu(x, dim=-1)
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]
