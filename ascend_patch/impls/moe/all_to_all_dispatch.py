"""All-to-all dispatch/combine of `moe.capacity` (option `dispatch: all_to_all`).

vLLM 0.32's DP + EP path (`MoEPrepareAndFinalizeNaiveDPEPModular`, prepare_finalize/
naive_dp_ep.py:136-243, through `AgRsAll2AllManager`) all-gathers every token of every DP
rank to every EP rank and reduce-scatters the full [all tokens, hidden] output back: the
traffic does not depend on routing, so a dropped row saves compute but not one byte.

Here each kept (token, expert) row travels once, to the EP rank owning its expert:

    dispatch  rows with id >= 0 (plan_drops already wrote id -1 into dropped rows), sorted
              by destination rank, packed as bytes [hidden | weight f32 | expert id i32]
              -> all_to_all_uneven on the EP group (split sizes exchanged first, so every
              rank agrees on them) -> the receiver sees [rows, hidden] with top-k = 1
    experts   the receiver computes its local experts on the received rows (weighted)
    combine   the weighted [rows, hidden] go back with the mirrored splits (no second
              size exchange) -> summed per source token in float32

Every rank calls both all-to-alls on every MoE call, with zero tokens or zero rows too, so
a rank never waits for a peer that skipped a collective.

Tokens shared by several ranks of the EP group (the TP ranks of one DP rank hold the same
batch) are split between those ranks: rank t of the `token_sharers` sends only the rows of
its contiguous slice of the tokens and writes zeros for the other tokens. vLLM's runner
all-reduces the MoE output over TP afterwards (runner/moe_runner.py:483-517, because the
prepare/finalize reports `output_is_reduced() == False`), which adds the slices back
together; with TP = 1 that all-reduce is a no-op, so no token is counted twice.

This module is pure torch + torch.distributed (testable with gloo processes, no vLLM);
`make_prepare_finalize_class` builds the vLLM `FusedMoEPrepareAndFinalizeModular` around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ascend_patch.impls.distributed.all_to_all import all_to_all_uneven, resolve_group

# Bytes of the per-row metadata sent with the hidden state: float32 weight + int32 expert id.
_META_BYTES = 8


def expert_owners(
    num_experts: int, ep_size: int, placement: str = "linear", device: Any = None
) -> torch.Tensor:
    """int64 [E]: the EP rank holding each global expert (vLLM's expert_map_manager.py:22-110:
    'linear' gives rank r the experts [r*E/R, (r+1)*E/R), 'round_robin' expert e to e % R)."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not split over {ep_size} EP ranks")
    experts = torch.arange(num_experts, device=device)
    if placement == "linear":
        return torch.div(experts, num_experts // ep_size, rounding_mode="floor")
    if placement == "round_robin":
        return experts % ep_size
    raise ValueError(f"unknown expert placement {placement!r} (linear or round_robin)")


def token_slice(num_tokens: int, sharer: int, num_sharers: int) -> tuple[int, int]:
    """[lo, hi) of the tokens a rank dispatches when num_sharers ranks hold the same tokens."""
    per = math.ceil(num_tokens / num_sharers) if num_sharers > 1 else num_tokens
    lo = min(sharer * per, num_tokens)
    return lo, min(lo + per, num_tokens)


@dataclass
class DispatchState:
    """What combine needs from dispatch (one MoE call; prepare and finalize run in order)."""

    num_tokens: int
    token_of_row: torch.Tensor  # int64 [rows sent], source token of each sent row, send order
    send_splits: list[int]
    recv_splits: list[int]
    rank: int


@dataclass
class DispatchCounters:
    """Per-process traffic counters (JSON-friendly), kept in the patch's stats."""

    calls: int = 0
    rows_sent: int = 0  # kept rows handed to the dispatch all-to-all (self included)
    rows_sent_remote: int = 0  # ... of them to other ranks
    rows_received: int = 0
    rows_not_sent_dropped: int = 0  # rows of this rank's slice dropped before sending
    bytes_sent_remote: int = 0  # dispatch + combine payload to other ranks
    dispatch_bytes_remote: int = 0
    combine_bytes_remote: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data.update(self.extra)
        return data


def _pack(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, H] hidden + [n] weights + [n] ids -> uint8 [n, H*itemsize + 8], ONE collective."""
    n = x.shape[0]
    # Explicit widths: reshape(n, -1) is ambiguous for n = 0 (a rank with no rows).
    parts = [
        x.contiguous().view(torch.uint8).reshape(n, x.shape[1] * x.element_size()),
        weights.to(torch.float32).contiguous().view(torch.uint8).reshape(n, 4),
        ids.to(torch.int32).contiguous().view(torch.uint8).reshape(n, 4),
    ]
    return torch.cat(parts, dim=1)


def _unpack(
    packed: torch.Tensor, hidden: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = packed.shape[0]
    hidden_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
    x = packed[:, :hidden_bytes].contiguous().view(dtype).reshape(n, hidden)
    weights = packed[:, hidden_bytes : hidden_bytes + 4].contiguous().view(torch.float32)
    ids = packed[:, hidden_bytes + 4 : hidden_bytes + 8].contiguous().view(torch.int32)
    return x, weights.reshape(n, 1), ids.reshape(n, 1)


def _remote(splits: list[int], rank: int) -> int:
    return sum(s for j, s in enumerate(splits) if j != rank)


def dispatch(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    group: Any,
    owners: torch.Tensor,
    sharer: int = 0,
    num_sharers: int = 1,
    counters: DispatchCounters | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
    """Send each kept row of this rank's token slice to its expert's owner.

    x [T, H]; topk_weights/topk_ids [T, k] with id -1 for dropped rows. Returns the rows
    this rank received (hidden [R, H], weights f32 [R, 1], global expert ids int32 [R, 1]),
    in source-rank order, and the state combine needs. Collective over `group`.
    """
    import torch.distributed as dist

    pg = resolve_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if owners.numel() and int(owners.max()) >= world:
        raise ValueError(f"experts are owned by {int(owners.max()) + 1} ranks, group has {world}")
    num_tokens, top_k = topk_ids.shape
    lo, hi = token_slice(num_tokens, sharer, num_sharers)
    ids = topk_ids[lo:hi].reshape(-1).long()
    kept = torch.nonzero(ids >= 0).squeeze(1)
    kept_ids = ids[kept]
    dest = owners.to(kept_ids.device)[kept_ids]
    # Stable: rows for one rank keep their (token, slot) order, which makes the result
    # independent of the sort implementation.
    dest_sorted, order = torch.sort(dest, stable=True)
    rows = kept[order]
    token_of_row = torch.div(rows, top_k, rounding_mode="floor") + lo
    send_splits = torch.bincount(dest_sorted, minlength=world).tolist()
    payload = _pack(
        x.index_select(0, token_of_row),
        topk_weights[lo:hi].reshape(-1)[rows],
        kept_ids[order],
    )
    recv, recv_splits = all_to_all_uneven(payload, send_splits, pg)
    recv_x, recv_w, recv_ids = _unpack(recv, x.shape[1], x.dtype)
    if counters is not None:
        remote = _remote(send_splits, rank)
        counters.calls += 1
        counters.rows_sent += len(rows)
        counters.rows_sent_remote += remote
        counters.rows_received += recv.shape[0]
        counters.rows_not_sent_dropped += int((ids < 0).sum())
        counters.dispatch_bytes_remote += remote * payload.shape[1]
        counters.bytes_sent_remote += remote * payload.shape[1]
    state = DispatchState(num_tokens, token_of_row, send_splits, recv_splits, rank)
    return recv_x, recv_w, recv_ids, state


def combine(
    expert_out: torch.Tensor,
    state: DispatchState,
    *,
    group: Any,
    output: torch.Tensor,
    counters: DispatchCounters | None = None,
) -> torch.Tensor:
    """Return each received row's weighted result to its source rank and sum per token.

    expert_out [R, H] in the order dispatch delivered the rows. `output` [T, H] is written
    (zeros for tokens outside this rank's slice or with every row dropped). Collective.
    """
    hidden = output.shape[1]
    if expert_out.shape[0] != sum(state.recv_splits):
        raise ValueError(
            f"combine got {expert_out.shape[0]} rows, dispatch delivered {sum(state.recv_splits)}"
        )
    expert_out = expert_out.reshape(-1, hidden).to(output.dtype)
    # The mirrored splits are known on both sides: no size exchange this time.
    back, _ = all_to_all_uneven(
        expert_out, state.recv_splits, group, recv_splits=state.send_splits
    )
    # Read everything from `back` before writing `output`: vLLM may hand us an output
    # buffer that aliases the experts' output when their shapes match.
    acc = torch.zeros(state.num_tokens, hidden, dtype=torch.float32, device=output.device)
    acc.index_add_(0, state.token_of_row.to(output.device), back.float())
    output.copy_(acc.to(output.dtype))
    if counters is not None:
        nbytes = _remote(state.recv_splits, state.rank) * hidden * expert_out.element_size()
        counters.combine_bytes_remote += nbytes
        counters.bytes_sent_remote += nbytes
    return output


# --------------------------------------------------------------------------------------
# vLLM glue: the prepare/finalize of the modular kernel
# --------------------------------------------------------------------------------------

# FusedMoEPrepareAndFinalizeModular.prepare / finalize as written for vLLM 0.32
# (modular_kernel.py:275, :363); checked by the factory, not patch sites.
PREPARE_SIGNATURE = (
    "(self, a1, topk_weights, topk_ids, num_experts, expert_map, "
    "apply_router_weight_on_input, quant_config, defer_input_quant)"
)
FINALIZE_SIGNATURE = (
    "(self, output, fused_expert_output, topk_weights, topk_ids, "
    "apply_router_weight_on_input, weight_and_reduce_impl)"
)


def check_prepare_finalize_interface() -> None:
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    from ascend_patch.core.targets import render_signature

    base = mk.FusedMoEPrepareAndFinalizeModular
    for name, want in (("prepare", PREPARE_SIGNATURE), ("finalize", FINALIZE_SIGNATURE)):
        live = render_signature(getattr(base, name))
        if live != want:
            raise RuntimeError(
                f"moe.capacity: vLLM's FusedMoEPrepareAndFinalizeModular.{name} changed: "
                f"expected {want}, found {live}"
            )


_CLASS: type | None = None


def make_prepare_finalize_class() -> type:
    """The vLLM prepare/finalize class (built once, on first use: imports vLLM)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    class CapacityAllToAllPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
        """prepare = dispatch of the kept rows, finalize = combine (see module docstring).

        Pairs only with CapacityExperts (vllm_glue.py): Standard activation format, rows
        of any expert id (they map global ids through expert_map) and a weighted,
        already reduced output (TopKWeightAndReduceNoOP), which is what combine sums.
        """

        def __init__(
            self,
            group_fn: Callable[[], Any],
            owners: torch.Tensor,
            ep_size: int,
            sharer: int,
            num_sharers: int,
            counters: DispatchCounters,
            on_call: Callable[[], None] | None = None,
        ) -> None:
            super().__init__()
            self._group_fn = group_fn
            self._owners = owners
            self._ep_size = ep_size
            self._sharer = sharer
            self._num_sharers = num_sharers
            self._counters = counters
            self._on_call = on_call
            self._state: DispatchState | None = None

        @property
        def activation_format(self) -> mk.FusedMoEActivationFormat:
            return mk.FusedMoEActivationFormat.Standard

        def topk_indices_dtype(self) -> torch.dtype | None:
            return None

        def max_num_tokens_per_rank(self) -> int | None:
            return None

        def num_dispatchers(self) -> int:
            return self._ep_size

        def output_is_reduced(self) -> bool:
            # Complete per token for the tokens of this rank's slice, zero elsewhere: the
            # runner's TP all-reduce (a no-op with TP = 1) must still add the slices.
            return False

        def prepare(
            self,
            a1: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            num_experts: int,
            expert_map: torch.Tensor | None,
            apply_router_weight_on_input: bool,
            quant_config: Any,
            defer_input_quant: bool = False,
        ) -> Any:
            if apply_router_weight_on_input:
                # Same convention as vLLM's prepare (naive_dp_ep.py:147-152): the top-1
                # weight scales the input; CapacityExperts then uses unit weights.
                if topk_ids.size(1) != 1:
                    raise ValueError("apply_router_weight_on_input needs top-k = 1")
                a1 = a1 * topk_weights.to(a1.dtype)
            recv_x, recv_w, recv_ids, self._state = dispatch(
                a1,
                topk_weights,
                topk_ids,
                group=self._group_fn(),
                owners=self._owners,
                sharer=self._sharer,
                num_sharers=self._num_sharers,
                counters=self._counters,
            )
            return recv_x, None, None, recv_ids, recv_w

        def finalize(
            self,
            output: torch.Tensor,
            fused_expert_output: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            apply_router_weight_on_input: bool,
            weight_and_reduce_impl: Any,
        ) -> None:
            if not isinstance(weight_and_reduce_impl, TopKWeightAndReduceNoOP):
                raise TypeError(
                    "moe.capacity all_to_all: the experts must return weighted, reduced rows"
                )
            state, self._state = self._state, None
            if state is None:
                raise RuntimeError("moe.capacity all_to_all: finalize without prepare")
            combine(
                fused_expert_output,
                state,
                group=self._group_fn(),
                output=output,
                counters=self._counters,
            )
            if self._on_call is not None:
                self._on_call()

    _CLASS = CapacityAllToAllPrepareAndFinalize
    return _CLASS
