"""CUDA: how dropped rows reach vLLM's Triton experts so that they are skipped, not computed.

Read from vLLM's source (0.32 and 0.23 Python, csrc/moe/moe_align_sum_kernels.cu); never run
on a GPU here:

* `TritonExperts.apply` (fused_moe/experts/triton_moe.py) aligns rows with
  `moe_align_block_size(topk_ids, block, num_experts=global_num_experts, expert_map, ...)`
  whenever an expert_map is given (the small-batch shortcut needs expert_map None).
  0.32 passes `ignore_invalid_experts=True` for unquantized weights without LoRA: the CUDA
  op leaves every row whose expert_map entry is -1 out of `sorted_token_ids` (no GEMM block
  for it), and the pad-aware `moe_sum(input, output, topk_ids, expert_map)` skips the same
  slots. 0.23 aligns every row and then maps each block's expert through expert_map: a block
  of an expert mapped to -1 writes zeros and multiplies nothing (fused_moe_kernel's
  `off_experts == -1` branch), so its rows add 0 in the plain `moe_sum`.
* Without an expert_map neither holds: 0.32's `moe_sum` then sums every top-k slot,
  including the never written workspace of rows the alignment left out, and the alignment
  kernels index their counters by the raw id (an id -1 is out of range). vLLM's own DeepEP HT
  prepare (prepare_finalize/deepep_ht.py: "The existing MOE kernels assume that all entries
  of topk_ids are valid") turns id -1 into an expert the expert_map maps to -1 for that
  reason.

So on the expert-map route a dropped row goes to the experts as id E (= global_num_experts),
the kernel is told there are E + 1 experts, and the expert_map has E + 1 entries whose last
is -1 (the layer's own map under EP, the identity without): a valid id whose expert is not
here, which both lines skip. Through an all-to-all backend the row is handed as -1 where the
backend's dispatch leaves -1 out (DeepEP: id -1 means "no expert"), and the layer is refused
where no path skips it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# How a taken-over Triton layer hands its dropped rows to vLLM's kernel.
EXPERT_MAP = "expert_map"  # id E + the expert_map extended with -1: the experts skip it
MINUS_ONE = "minus_one"  # id -1: the all-to-all dispatch leaves it out
UNCHANGED = "unchanged"  # nothing is ever dropped (drop_token_ratio 0): vLLM's ids as given

# all2all backends of vLLM 0.32 (config/parallel.py All2AllBackend) whose dispatch leaves rows
# with id -1 out, with where that is written.
_SKIPS_MINUS_ONE = {
    "deepep_high_throughput": "DeepEP's dispatch sends no row with id -1; the received -1 "
    "slots become off-rank experts that the expert_map maps to -1 (deepep_ht.py)",
    "deepep_v2": "vLLM's own padding contract: the grouped router marks padding rows -1 for "
    "DeepEP v2 only (layer.py skip_padding) and the receiver keeps -1 (deepep_v2.py)",
}
# moe_align_block_size's CUDA op: one thread per expert, padded to 32, fewer than 1024
# (TORCH_CHECK "padded_num_experts must be less than 1024").
_ALIGN_LIMIT = 1024


def _padded(num_experts: int) -> int:
    return (num_experts + 31) // 32 * 32


# Backends that all-gather every row (ids travel unchanged, the experts see the expert_map).
_GATHERS = ("allgather_reducescatter", "naive")
# Backends that are known to compute id -1 rows, with why.
_COMPUTES_MINUS_ONE = {
    "moonep": "MoonEP maps negative ids to expert 0 with weight 0 (moonep.py): computed anyway",
}


@dataclass(frozen=True)
class TritonRoute:
    kind: str
    why: str
    num_experts: int = 0  # E: the sentinel id of EXPERT_MAP

    def kernel_num_experts(self, num_experts: int) -> int:
        """The global_num_experts to hand the kernel: E + 1 with the sentinel expert."""
        return num_experts + 1 if self.kind == EXPERT_MAP else num_experts

    def ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The ids to hand the kernel: dropped rows (and vLLM's own -1 padding rows) as the
        sentinel E on the expert-map route, -1 otherwise. Elementwise, no host sync."""
        if self.kind != EXPERT_MAP:
            return topk_ids
        return topk_ids.masked_fill(topk_ids < 0, self.num_experts)

    def expert_map(self, layer_map: torch.Tensor | None, device: torch.device) -> Any:
        """The expert_map to hand the kernel (int32, as vLLM's moe_sum requires)."""
        if self.kind != EXPERT_MAP:
            return layer_map
        return skip_map(layer_map, self.num_experts, device)


def skip_map(layer_map: torch.Tensor | None, num_experts: int,
             device: torch.device | str) -> torch.Tensor:
    """int32 [E + 1]: the layer's global -> local map (identity without EP), then -1 for
    the sentinel id E."""
    if layer_map is None:
        layer_map = torch.arange(num_experts, dtype=torch.int32, device=device)
    tail = torch.full((1,), -1, dtype=torch.int32, device=layer_map.device)
    return torch.cat([layer_map.to(torch.int32), tail])


def triton_route(parallel: Any, num_experts: int, drop_ratio: float) -> TritonRoute | str:
    """The route for one Triton layer, or why none skips its dropped rows (a refusal reason,
    only when drop_ratio > 0: with 0 nothing is dropped and vLLM's ids go through as given)."""
    backend = str(parallel.all2all_backend)
    if not parallel.use_all2all_kernels or backend in _GATHERS:
        why = ("no all-to-all kernels" if not parallel.use_all2all_kernels else
               f"all2all backend {backend} all-gathers every row (compute saved, not traffic)")
        if _padded(num_experts + 1) >= _ALIGN_LIMIT and drop_ratio > 0:
            return (f"drop_token_ratio > 0 with {num_experts} experts: the sentinel expert "
                    f"would take vLLM's align op to {_padded(num_experts + 1)} padded experts "
                    f"(it takes fewer than {_ALIGN_LIMIT}); dropped rows would still be "
                    "computed (use drop_token_ratio: 0)")
        if _padded(num_experts + 1) >= _ALIGN_LIMIT:
            return TritonRoute(UNCHANGED, f"{why}, drop_token_ratio 0")
        return TritonRoute(EXPERT_MAP, f"{why}: dropped rows go to the Triton experts as id "
                           "E, which the extended expert_map maps to -1", num_experts)
    if backend in _SKIPS_MINUS_ONE:
        return TritonRoute(MINUS_ONE, f"all2all backend {backend}: {_SKIPS_MINUS_ONE[backend]}")
    why = _COMPUTES_MINUS_ONE.get(
        backend, "its dispatch is not known to leave id -1 rows out")
    if drop_ratio <= 0:
        return TritonRoute(UNCHANGED, f"all2all backend {backend}, drop_token_ratio 0")
    return (f"drop_token_ratio > 0 with all2all backend {backend}: {why}; dropped rows "
            "would still be computed (use drop_token_ratio: 0, or all2all_backend "
            "allgather_reducescatter, deepep_high_throughput or deepep_v2)")
