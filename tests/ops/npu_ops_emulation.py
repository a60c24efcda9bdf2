"""CPU reference emulation of the torch_npu norm/activation ops, from their documentation.

- npu_rms_norm(x, gamma, epsilon) -> (y, rstd): y = x * rstd * gamma, rstd = 1/sqrt(mean(x^2)+eps),
  computed in float32, y in x's dtype, rstd float32 with the reduced dim kept.
- npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x): x = x1 + x2, then as above.
- npu_swiglu(x, dim=-1) -> silu(first half) * second half along `dim`.
"""

import torch

calls: list[str] = []


def npu_rms_norm(x, gamma, epsilon=1e-6):
    calls.append("npu_rms_norm")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    calls.append("npu_add_rms_norm")
    summed = (x1.float() + x2.float()).to(x1.dtype)
    y, rstd = npu_rms_norm(summed, gamma, epsilon)
    calls.pop()
    return y, rstd, summed


def npu_swiglu(x, dim=-1):
    calls.append("npu_swiglu")
    first, second = x.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(first) * second).to(x.dtype)
