"""Expert compute of `moe.capacity`: one fused-MoE forward per device family.

Every backend has the signature of `torch_backend.moe_forward`; `select_backend` picks one
from the `backend` option and the device of the activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MoeForward = Callable[..., torch.Tensor]


def select_backend(name: str, device: torch.device) -> MoeForward:
    """Resolve the `backend` option ("auto", "torch" or "npu") to a forward function.

    "auto" takes the NPU backend only for tensors that live on an NPU: the torch_npu ops do
    not run anywhere else, while the torch backend runs on every device.
    """
    if name == "auto":
        name = "npu" if device.type == "npu" else "torch"
    if name == "torch":
        from ascend_patch.impls.moe.experts.torch_backend import moe_forward

        return moe_forward
    if name == "npu":
        from ascend_patch.impls.moe.experts.npu_backend import moe_forward

        return moe_forward
    raise ValueError(f"unknown moe backend {name!r} (expected 'auto', 'torch' or 'npu')")
