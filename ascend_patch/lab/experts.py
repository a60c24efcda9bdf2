"""The expert compute the layer benchmarks time: what `moe.capacity`'s `backend: auto` runs.

On a stack with vLLM's CPU fused-MoE kernel (`torch.ops._C.cpu_fused_moe`, vLLM's CPU
builds) and a layer it takes (bf16, hidden and intermediate sizes multiples of 32), that is
the kernel on prepacked copies of the weights, handed only the kept rows of local experts
(impls/moe/experts/vllm_cpu_kernel.py); elsewhere the torch backend. The prepack and the isa
are vLLM's (CPUUnquantizedExperts / X86CPUUnquantizedExperts: "amx" where the CPU has AMX
tiles, else "vec").
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch

# moe(x, topk_weights, topk_ids, keep=None, expert_map=None) -> out [T, H]
Moe = Callable[..., torch.Tensor]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_isa() -> str:
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def cpu_ops_module():
    """Where the line keeps the CPU MoE wrappers: vllm._cpu_ops from 0.34 on (cpu_fused_moe
    and cpu_prepack_moe_weight left vllm._custom_ops there), vllm._custom_ops before."""
    name = "vllm._cpu_ops" if importlib.util.find_spec("vllm._cpu_ops") else "vllm._custom_ops"
    return importlib.import_module(name)


def native_kernel(w13: torch.Tensor, w2: torch.Tensor, isa: str | None = None) -> Kernel:
    """kernel(x, topk_weights, topk_ids) -> out: vLLM's CPU kernel on prepacked copies of
    w13 [E, 2I, H] / w2 [E, H, I], every row of the routing computed."""
    isa = isa or native_isa()
    ops = cpu_ops_module()
    p13 = ops.cpu_prepack_moe_weight(w13, isa)
    p2 = ops.cpu_prepack_moe_weight(w2, isa)

    def run(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        # The registered op, not its Python wrapper: the op's arguments are the same on the
        # 0.23 and 0.32 lines, the wrapper's are not (0.23 allocates and returns the output).
        torch.ops._C.cpu_fused_moe(out, x, p13, p2, None, None, weights.float().contiguous(),
                                   ids.to(torch.int32).contiguous(), False, "silu", isa)
        return out

    return run


def has_native_kernel(w13: torch.Tensor) -> bool:
    """Whether vLLM's CPU kernel is here and takes these weights (vLLM is imported only for
    weights it could take)."""
    _, two_i, hidden = w13.shape
    if not (w13.dtype == torch.bfloat16 and w13.device.type == "cpu" and hidden % 32 == 0
            and (two_i // 2) % 32 == 0) or importlib.util.find_spec("vllm") is None:
        return False
    try:
        cpu_ops_module()
    except ImportError:
        return False
    return hasattr(torch.ops._C, "cpu_fused_moe")


def experts(w13: torch.Tensor, w2: torch.Tensor, native: bool = True) -> tuple[Moe, str]:
    """(moe, what it runs) for these weights: see the module docstring (native=False: the
    torch backend whatever is installed)."""
    if native and has_native_kernel(w13):
        from ascend_patch.impls.moe.experts.vllm_cpu_kernel import moe_forward as compacted

        kernel = native_kernel(w13, w2)
        num_local = w13.shape[0]

        def moe(x, weights, ids, keep=None, expert_map=None):
            return compacted(kernel, x, weights, ids, keep, expert_map,
                             num_local_experts=num_local)

        return moe, f"vLLM cpu_fused_moe (isa {native_isa()}) on the kept rows"
    from ascend_patch.impls.moe.experts.torch_backend import moe_forward

    def moe(x, weights, ids, keep=None, expert_map=None):
        return moe_forward(x, w13, w2, weights, ids, keep=keep, expert_map=expert_map)

    return moe, "torch backend"
