"""CPU emulation of vllm-ascend's fused MC2 kernel `_C_ascend.dispatch_ffn_combine` (test only).

Written from the op's schema (csrc/torch_binding.cpp:2446-2451), its torch adapter
(csrc/mc2/dispatch_ffn_combine/dispatch_ffn_combine_torch_adpt.h), the kernel
(op_kernel/dispatch_ffn_combine_kernel.hpp) and vllm-ascend's own description of
`mega_moe_max_tokens` (ascend_config.py:300-305, docs additional_config.md:92: "the excess
tokens are dropped and skipped from computation"). What it reproduces exactly:

* routing: rows are (token, slot) pairs; a token whose x_active_mask entry is false sends none
  of its k rows (ApplyXActiveMask, kernel :360-398); the E = EP x L experts are owned
  contiguously, L = len of the local weights' expert dimension;
* the receive buffer of each rank: its local experts in order, within an expert the source
  ranks in order, within a source its rows in (token, slot) order (moe_init_routing's stable
  sort by expert); rows at positions >= max_output_size are truncated: neither computed nor
  combined (kernel :456-460, :563-567, :847-851, :873-886, :998-1002, :1038-1042);
* expert_token_nums[g] = rows routed to local expert g before truncation (the copy of
  cumsumMM's last row, kernel :818-821);
* out[t] = sum over t's kept rows of probs[t, j] * FFN_e(x[t]).

What it does not: the per-token int8 quantisation of activations (the FFN runs in float32 on
the dequantised weights, weight * per-channel float32 scale; packed int64 scales are refused),
HCCL windows and their sizing, and what the combine reads for a truncated row on hardware (a
buffer slot this call did not write; zero here). The group string names a process group
registered with `register_group` (the EP group: vllm-ascend passes the MC2 group's HCCL name).

`LAST[rank]` keeps, per call, what the emulated kernel received and truncated, so a test can
compare a hook's counts with what the kernel did.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

SCHEMA = (
    "dispatch_ffn_combine(Tensor x, Tensor[] weight1, Tensor[] weight2, Tensor expert_idx, "
    "Tensor[] scale1, Tensor[] scale2, Tensor[] bias1, Tensor[] bias2, Tensor probs, str group, "
    "int max_output_size, Tensor(a!) out, Tensor(b!) expert_token_nums, "
    "Tensor? x_active_mask=None, float swiglu_limit=1000000.0) -> (Tensor, Tensor)"
)
_GROUPS: dict[str, object] = {}
CALLS: list[dict] = []
_LIBRARIES: list = []


def register_group(name: str, group) -> None:
    _GROUPS[name] = group


def install() -> None:
    """Register the op for CPU tensors next to boot.py's routing op."""
    library = torch.library.Library("_C_ascend", "FRAGMENT")
    library.define(SCHEMA)
    library.impl("dispatch_ffn_combine", dispatch_ffn_combine, "CPU")
    _LIBRARIES.append(library)


def _stacked(tensors, name: str, dims: int) -> torch.Tensor:
    """One [L, ...] tensor from the op's tensor list (one stacked tensor, or one per expert)."""
    assert len(tensors) >= 1, f"{name}: empty list"
    if len(tensors) == 1 and tensors[0].dim() == dims:
        return tensors[0]
    assert all(t.dim() == dims - 1 for t in tensors), f"{name}: per-expert tensors of rank {dims - 1}"
    return torch.stack(list(tensors))


def dispatch_ffn_combine(x, weight1, weight2, expert_idx, scale1, scale2, bias1, bias2, probs,
                         group, max_output_size, out, expert_token_nums, x_active_mask=None,
                         swiglu_limit=1000000.0):
    assert x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0]
    assert expert_idx.dtype == torch.int32, f"expert_idx must be int32, got {expert_idx.dtype}"
    assert probs.dtype == torch.float32 and probs.shape == expert_idx.shape
    assert out.shape == x.shape and out.dtype == x.dtype
    assert max_output_size > 0, "max_output_size must be positive"
    w1 = _stacked(weight1, "weight1", 3)
    w2 = _stacked(weight2, "weight2", 3)
    s1 = _stacked(scale1, "scale1", 2)
    s2 = _stacked(scale2, "scale2", 2)
    assert w1.dtype == torch.int8 and w2.dtype == torch.int8, "W8A8: int8 weights"
    assert s1.dtype == torch.float32 and s2.dtype == torch.float32, (
        "float32 per-channel scales only (packed int64 scales are not emulated)")
    local = w1.shape[0]
    assert w1.shape[1] == x.shape[1] and w2.shape == (local, w1.shape[2] // 2, x.shape[1])
    assert s1.shape == (local, w1.shape[2]) and s2.shape == (local, x.shape[1])
    assert expert_token_nums.shape == (local,) and expert_token_nums.dtype == torch.int32
    assert swiglu_limit in (0.0, 1000000.0), "a clamped SwiGLU is not emulated"
    if x_active_mask is not None:
        assert x_active_mask.dtype == torch.bool and x_active_mask.shape == (x.shape[0],)

    pg = _GROUPS[group]
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    experts = local * world
    ids = expert_idx.long()
    assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < experts), (
        "expert ids must lie in [0, EP x local experts)")
    if x_active_mask is not None:
        ids = ids.masked_fill(~x_active_mask.reshape(-1, 1), experts)

    xs, all_ids, all_probs = _gather_sources(pg, world, x, ids, probs)
    contrib = [torch.zeros(t.shape[0], t.shape[1], x.shape[1]) for t in all_ids]
    position, truncated = 0, 0
    received = torch.zeros(local, dtype=torch.int32)
    for g in range(local):
        expert = rank * local + g
        for src in range(world):
            token, slot = (all_ids[src] == expert).nonzero(as_tuple=True)  # (token, slot) order
            received[g] += token.numel()
            for t, j in zip(token.tolist(), slot.tolist()):
                if position >= max_output_size:
                    truncated += 1
                else:
                    row = _ffn(xs[src][t], w1[g], s1[g], w2[g], s2[g])
                    contrib[src][t, j] = all_probs[src][t, j] * row
                position += 1
    expert_token_nums.copy_(received)
    CALLS.append({"rank": rank, "received": int(received.sum()), "truncated": truncated,
                  "max_output_size": int(max_output_size)})
    out.copy_(_combine(pg, world, rank, contrib).to(out.dtype))
    return out, expert_token_nums


def _ffn(row, w1, s1, w2, s2):
    gate_up = row.float() @ (w1.float() * s1)
    half = gate_up.shape[-1] // 2
    return (F.silu(gate_up[:half]) * gate_up[half:]) @ (w2.float() * s2)


def _gather_sources(pg, world, x, ids, probs):
    """Every source rank's tokens, ids and weights (the kernel reads peers' windows)."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=pg)
    most = max(int(s) for s in sizes)
    k = ids.shape[1]

    def gather(t, fill):
        padded = torch.full((most, *t.shape[1:]), fill, dtype=t.dtype)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=pg)
        return [p[: int(n)] for p, n in zip(parts, sizes)]

    experts_sentinel = -1  # padding rows: never any expert's
    xs = gather(x.float(), 0.0)
    all_ids = gather(ids.reshape(-1, k), experts_sentinel)
    all_probs = gather(probs, 0.0)
    return xs, all_ids, all_probs


def _combine(pg, world, rank, contrib):
    """Each source rank's rows back to it (sum over ranks of their contributions)."""
    mine = None
    for src in range(world):
        summed = contrib[src].clone()
        dist.all_reduce(summed, group=pg)
        if src == rank:
            mine = summed.sum(dim=1)
    return mine
