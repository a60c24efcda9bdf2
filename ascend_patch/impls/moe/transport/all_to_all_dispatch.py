"""All-to-all dispatch/combine of `moe.capacity` (option `dispatch: all_to_all`).

vLLM 0.32's DP + EP path (`MoEPrepareAndFinalizeNaiveDPEPModular`, prepare_finalize/
naive_dp_ep.py:136-243, through `AgRsAll2AllManager`) all-gathers every token of every DP
rank to every EP rank and reduce-scatters the full [all tokens, hidden] output back: the
traffic does not depend on routing, so a dropped row saves compute but not one byte.

Here each token's hidden state travels ONCE to every EP rank that owns at least one of its
kept (token, expert) rows (token-once dispatch, as DeepEP does), with one small metadata
record per kept row:

    dispatch  rows with id >= 0 (plan_drops already wrote id -1 into dropped rows), sorted
              by destination rank (stable: within a rank grouped by token, slot order).
              Message to rank d, bytes:
                  [ P_d hidden rows, H * itemsize each      (one per token with a row on d)
                  | R_d records of 12 bytes: weight f32, global expert id i32,
                                             index i32 of the token's hidden row (0..P_d-1) ]
              The (P_d, R_d) counts are exchanged first (one small all-to-all, so every rank
              agrees on the splits), then the messages (one all_to_all_uneven of bytes).
              A dropped row is never sent; a token with no kept row on d sends nothing to d.
    experts   the receiver sees [P, H] hidden rows (P = its (source token, rank) pairs) with
              [P, top_k] ids/weights: the pair's rows in its first slots, id -1 / weight 0
              in the rest. CapacityExperts (or moe_forward) computes the local experts on
              the rows and sums each pair's weighted outputs in float32: ONE row per pair.
    combine   the [P, H] rows go back with the mirrored pair splits (no size exchange)
              -> summed per source token in float32.

Bytes to other ranks per call: dispatch sum_{d != r} (P_d * H * itemsize + 12 * R_d),
combine (pairs received from other ranks) * H * itemsize. Every rank calls the three
all-to-alls on every MoE call, with zero tokens or zero rows too, so a rank never waits for a
peer that skipped a collective.

Host reads per call: one. all_to_all_single takes its split sizes as host ints, so after the
count all-to-all (on the device) the rank reads its own (P_d, R_d) and the received ones in
one `tolist`. The rest has static shapes: a stable sort with the dropped rows under a
sentinel destination past the last rank puts them last, pairs start where a compare of
neighbours says so, counts are scatter-adds, and the kept prefix is cut by the sizes read.
combine reuses dispatch's sizes: no read. The owner map is checked once per layer
(`check_owners`). tests/moe/test_all_to_all_dispatch.py counts this per call.

Tokens shared by several ranks of the EP group (the TP ranks of one DP rank hold the same
batch) are split between those ranks: rank t of the `token_sharers` sends only the rows of
its contiguous slice of the tokens and writes zeros for the other tokens. vLLM's runner
all-reduces the MoE output over TP afterwards (runner/moe_runner.py:483-517, because the
prepare/finalize reports `output_is_reduced() == False`), which adds the slices back
together; with TP = 1 that all-reduce is a no-op, so no token is counted twice.

This module is pure torch + torch.distributed (testable with gloo processes, no vLLM);
`make_prepare_finalize_class` builds the vLLM `FusedMoEPrepareAndFinalizeModular` around it,
on the classes the patch's `ctx.upstream` resolves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ascend_patch.core.session import SESSION
from ascend_patch.impls.distributed.all_to_all import all_to_all_uneven, resolve_group
from ascend_patch.impls.moe.planner.capacity import assert_async, linear_owners
# The counters live with the other stats (telemetry/stats.py); importable from here too.
from ascend_patch.impls.moe.telemetry.stats import DispatchCounters

# Bytes of the per-row metadata record: float32 weight + int32 global expert id + int32
# index of the row's token among the hidden rows of the same message.
ROW_META_BYTES = 12


def expert_owners(
    num_experts: int, ep_size: int, placement: str = "linear", device: Any = None
) -> torch.Tensor:
    """int64 [E]: the EP rank holding each global expert, for any E, as vLLM's
    determine_expert_map places them (fused_moe/expert_map_manager.py:66-85 in vLLM 0.32):
    'linear' gives each rank a contiguous block, one more expert to each of the first E % R
    ranks; 'round_robin' puts expert e on rank e % R (so those same ranks hold one more)."""
    if placement == "linear":
        return linear_owners(num_experts, ep_size, device)
    if placement == "round_robin":
        if ep_size < 1:
            raise ValueError(f"cannot place {num_experts} experts on {ep_size} EP ranks")
        return torch.arange(num_experts, device=device) % ep_size
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
    token_of_pair: torch.Tensor  # int64 [hidden rows sent]: source token, in send order
    send_splits: list[int]  # hidden rows (token, rank pairs) sent to each rank
    recv_splits: list[int]  # hidden rows received from each rank (= rows combine returns)
    rank: int
    row_send_splits: list[int] = field(default_factory=list)  # metadata rows per rank
    row_recv_splits: list[int] = field(default_factory=list)


def _as_bytes(t: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """[n, ...] -> uint8 [n, width]. Explicit widths: reshape(n, -1) is ambiguous for n = 0."""
    return t.contiguous().view(torch.uint8).reshape(n, width)


def _pack(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    index: torch.Tensor,
    pair_splits: list[int],
    row_splits: list[int],
) -> tuple[torch.Tensor, list[int]]:
    """uint8 [total bytes] holding, per destination rank in rank order, its hidden rows
    then its metadata records; and the byte splits. ONE payload collective."""
    p, r = hidden.shape[0], ids.shape[0]
    hidden_bytes = hidden.shape[1] * hidden.element_size()
    h = _as_bytes(hidden, p, hidden_bytes)
    meta = torch.cat(
        [
            _as_bytes(weights.to(torch.float32), r, 4),
            _as_bytes(ids.to(torch.int32), r, 4),
            _as_bytes(index.to(torch.int32), r, 4),
        ],
        dim=1,
    )
    parts = []
    for hd, md in zip(h.split(pair_splits), meta.split(row_splits)):
        parts += [hd.reshape(-1), md.reshape(-1)]
    byte_splits = [
        p_d * hidden_bytes + r_d * ROW_META_BYTES for p_d, r_d in zip(pair_splits, row_splits)
    ]
    return torch.cat(parts), byte_splits


def _unpack(
    recv: torch.Tensor,
    recv_counts: torch.Tensor,
    pair_splits: list[int],
    row_splits: list[int],
    hidden: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> hidden [P, H], weights f32 [R], global ids int32 [R], pair index int64 [R] (into
    the P received hidden rows, sources in rank order). recv_counts: int64 [world, 2] on the
    device, (pairs, rows) per source, the host lists' values."""
    hidden_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
    h_parts, m_parts = [], []
    offset = 0
    for p_d, r_d in zip(pair_splits, row_splits):
        h_parts.append(recv[offset : offset + p_d * hidden_bytes])
        offset += p_d * hidden_bytes
        m_parts.append(recv[offset : offset + r_d * ROW_META_BYTES])
        offset += r_d * ROW_META_BYTES
    p, r = sum(pair_splits), sum(row_splits)
    x = torch.cat(h_parts).view(dtype).reshape(p, hidden)
    meta = torch.cat(m_parts).reshape(r, ROW_META_BYTES)
    weights = meta[:, 0:4].contiguous().view(torch.float32).reshape(r)
    ids = meta[:, 4:8].contiguous().view(torch.int32).reshape(r)
    index = meta[:, 8:12].contiguous().view(torch.int32).reshape(r).long()
    # Indices are per message: shift each source's by the hidden rows of earlier sources
    # (from the device copy of the counts: an upload of the host lists would wait too).
    pairs_in = recv_counts[:, 0]
    starts = torch.cumsum(pairs_in, 0) - pairs_in
    index += torch.repeat_interleave(starts, recv_counts[:, 1], output_size=r)
    return x, weights, ids, index


def _remote(splits: list[int], rank: int) -> int:
    return sum(s for j, s in enumerate(splits) if j != rank)


def check_owners(owners: torch.Tensor, world: int) -> None:
    """Raise unless every expert is owned by a rank of a `world`-rank group. Owners are
    static per layer: checked once where the layer is set up (two host reads there), not by
    `dispatch`."""
    if not owners.numel():
        return
    low, high = int(owners.min()), int(owners.max())
    if low < 0 or high >= world:
        raise ValueError(f"experts are owned by ranks {low}..{high}, the group has ranks "
                         f"0..{world - 1}")


def _add_counters(
    counters: DispatchCounters,
    rank: int,
    rows: int,
    pair_splits: list[int],
    row_splits: list[int],
    recv_pair_splits: list[int],
    recv_row_splits: list[int],
    byte_splits: list[int],
) -> None:
    """Fold one dispatch into `counters`, from host ints the call already has."""
    sent_rows = sum(row_splits)
    nbytes = _remote(byte_splits, rank)
    counters.calls += 1
    counters.rows_sent += sent_rows
    counters.rows_sent_remote += _remote(row_splits, rank)
    counters.rows_received += sum(recv_row_splits)
    counters.rows_not_sent_dropped += rows - sent_rows
    counters.hidden_rows_sent += sum(pair_splits)
    counters.hidden_rows_sent_remote += _remote(pair_splits, rank)
    counters.hidden_rows_received += sum(recv_pair_splits)
    counters.dispatch_bytes_remote += nbytes
    counters.bytes_sent_remote += nbytes


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
    """Send each token of this rank's slice once to every rank owning one of its kept rows.

    x [T, H]; topk_weights/topk_ids [T, k] with id -1 for dropped rows; owners int64 [E]
    with ranks of `group` (`check_owners`, once per layer), best on the tokens' device (a
    host copy is moved on every call). Returns what this rank received: hidden [P, H] (one
    row per (source token, this rank) pair, source ranks in order), weights f32 [P, k] and
    global expert ids int32 [P, k] (a pair's rows in its first slots, weight 0 / id -1 after
    them), and the state combine needs. Collective over `group`.

    One host read per call: this rank's (pairs, rows) per destination and the peers' per
    source, read together after the small count all-to-all; all_to_all_single takes its split
    sizes as host ints, and the received sizes are the output's shape. Everything else has
    static shapes (no nonzero, bincount or boolean-mask indexing): the rows are sorted with
    the dropped ones last, and the kept prefix is cut by the sizes read.
    """
    import torch.distributed as dist

    pg = resolve_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    lo, hi = token_slice(num_tokens, sharer, num_sharers)
    ids = topk_ids[lo:hi].reshape(-1).long()
    # Dropped rows (id -1) go to a sentinel destination `world`, after every rank: sorted
    # (stable), the kept rows are a prefix in (rank, token, slot) order, so a token's rows
    # for one rank are contiguous and the result does not depend on the sort implementation.
    dest = torch.where(ids >= 0, owners.to(device)[ids.clamp(min=0)], world)
    dest_sorted, order = torch.sort(dest, stable=True)
    token_of_row = torch.div(order, top_k, rounding_mode="floor") + lo
    # A (token, rank) pair starts where the destination or the token changes.
    first = torch.ones_like(dest_sorted, dtype=torch.bool)
    first[1:] = (dest_sorted[1:] != dest_sorted[:-1]) | (token_of_row[1:] != token_of_row[:-1])
    pair_of_row = torch.cumsum(first, 0) - 1
    # Each pair's token, from its first row only (its other rows add 0).
    token_of_pair = torch.zeros_like(token_of_row).index_add_(
        0, pair_of_row, torch.where(first, token_of_row, 0)
    )
    # (pairs, rows) per destination, the sentinel's last: scatter-adds of static shape.
    per_dest = torch.zeros(world + 1, 2, dtype=torch.int64, device=device).index_add_(
        0, dest_sorted, torch.stack([first.long(), torch.ones_like(dest_sorted)], dim=1)
    )
    # Index of each row's hidden row within its destination's message.
    pair_starts = torch.cumsum(per_dest[:, 0], 0) - per_dest[:, 0]
    index = pair_of_row - pair_starts[dest_sorted]
    counts = per_dest[:world]  # [world, 2]: pairs, rows per destination
    # Both counts per peer in one small all-to-all: every rank agrees on every split.
    recv_counts, _ = all_to_all_uneven(counts, [1] * world, pg, recv_splits=[1] * world)
    # The call's one host read: what to send and what will arrive, per rank.
    sent, received = torch.stack([counts, recv_counts]).tolist()
    pair_splits, row_splits = [c[0] for c in sent], [c[1] for c in sent]
    recv_pair_splits, recv_row_splits = [c[0] for c in received], [c[1] for c in received]
    kept = order[: sum(row_splits)]  # the kept rows, in send order
    token_of_pair = token_of_pair[: sum(pair_splits)]
    payload, byte_splits = _pack(
        x.index_select(0, token_of_pair),
        topk_weights[lo:hi].reshape(-1)[kept],
        ids[kept],
        index[: kept.shape[0]],
        pair_splits,
        row_splits,
    )
    hidden_bytes = x.shape[1] * x.element_size()
    recv_byte_splits = [
        p * hidden_bytes + r * ROW_META_BYTES for p, r in zip(recv_pair_splits, recv_row_splits)
    ]
    recv, _ = all_to_all_uneven(payload, byte_splits, pg, recv_splits=recv_byte_splits)
    recv_x, recv_w, recv_ids, recv_pair = _unpack(
        recv, recv_counts, recv_pair_splits, recv_row_splits, x.shape[1], x.dtype
    )
    # Rows of one pair arrive contiguous, in slot order: slot = position within the pair.
    num_pairs, num_rows = recv_x.shape[0], recv_ids.shape[0]
    per_pair = torch.zeros(num_pairs, dtype=torch.int64, device=recv.device).index_add_(
        0, recv_pair, torch.ones_like(recv_pair)
    )
    first_row_of_pair = torch.cumsum(per_pair, 0) - per_pair
    slot = torch.arange(num_rows, device=recv.device) - first_row_of_pair[recv_pair]
    # Only a peer that broke the format could fail this (a pair is one token's rows).
    assert_async(((slot >= 0) & (slot < top_k)).all(),
                 f"moe.capacity all_to_all: a received token has more than top_k = {top_k} rows",
                 lambda: ValueError(
                     f"received a token with more than top_k = {top_k} rows for this rank"))
    out_ids = torch.full((num_pairs, top_k), -1, dtype=torch.int32, device=recv.device)
    out_w = torch.zeros(num_pairs, top_k, dtype=torch.float32, device=recv.device)
    out_ids[recv_pair, slot] = recv_ids
    out_w[recv_pair, slot] = recv_w
    if counters is not None:
        _add_counters(counters, rank, ids.numel(), pair_splits, row_splits, recv_pair_splits,
                      recv_row_splits, byte_splits)
    state = DispatchState(
        num_tokens, token_of_pair, pair_splits, recv_pair_splits, rank, row_splits, recv_row_splits
    )
    return recv_x, out_w, out_ids, state


def combine(
    expert_out: torch.Tensor,
    state: DispatchState,
    *,
    group: Any,
    output: torch.Tensor,
    counters: DispatchCounters | None = None,
) -> torch.Tensor:
    """Return each received pair's summed, weighted result to its source rank and sum the
    returned rows per token.

    expert_out [P, H] in the order dispatch delivered the hidden rows. `output` [T, H] is
    written (zeros for tokens outside this rank's slice or with every row dropped).
    Collective.
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
    acc.index_add_(0, state.token_of_pair.to(output.device), back.float())
    output.copy_(acc.to(output.dtype))
    if counters is not None:
        returned = _remote(state.recv_splits, state.rank)
        nbytes = returned * hidden * expert_out.element_size()
        counters.hidden_rows_returned_remote += returned
        counters.combine_bytes_remote += nbytes
        counters.bytes_sent_remote += nbytes
    return output


# --------------------------------------------------------------------------------------
# vLLM glue: the prepare/finalize of the modular kernel
# --------------------------------------------------------------------------------------

# FusedMoEPrepareAndFinalizeModular.prepare / finalize are declared in the catalog
# (moe/spec.py, relied-on interfaces): the loader and `validate` check their signatures.
# Built once per vLLM base class (one per process, as every patch's upstream resolves the
# same class): our layers' isinstance checks and compiled graphs see one class.
_CLASSES: dict[type, type] = {}


def make_prepare_finalize_class(upstream: Any) -> type:
    """The vLLM prepare/finalize class, on `upstream`'s (a PatchContext.upstream) vLLM
    classes (built on first use)."""
    base = upstream.FusedMoEPrepareAndFinalizeModular
    built = _CLASSES.get(base)
    if built is not None:
        return built
    standard = upstream.FusedMoEActivationFormat.Standard
    no_op_reduce = upstream.TopKWeightAndReduceNoOP

    class CapacityAllToAllPrepareAndFinalize(base):
        """prepare = token-once dispatch, finalize = combine (see module docstring).

        Pairs only with CapacityExperts (vllm_modular.py): Standard activation format, the
        received [P, H] hidden rows with [P, top_k] global ids (-1 in unused slots, which
        they skip; global ids map through expert_map) and a weighted output already
        reduced per hidden row (TopKWeightAndReduceNoOP), which is what combine returns.
        """

        def __init__(
            self,
            group_fn: Callable[[], Any],
            owners: torch.Tensor,
            ep_size: int,
            sharer: int,
            num_sharers: int,
            counters: DispatchCounters,
            on_call: Callable[[int], None] | None = None,
        ) -> None:
            super().__init__()
            check_owners(owners, ep_size)  # static per layer: not again per call
            self._group_fn = group_fn
            self._owners = owners  # moved to the tokens' device at the first call
            self._ep_size = ep_size
            self._sharer = sharer
            self._num_sharers = num_sharers
            self._counters = counters
            # Called after each combine with the bytes this call sent to other ranks.
            self._on_call = on_call
            self._state: DispatchState | None = None
            self._bytes_before = 0

        @property
        def activation_format(self) -> Any:
            return standard

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
            self._bytes_before = self._counters.bytes_sent_remote
            if self._owners.device != topk_ids.device:
                self._owners = self._owners.to(topk_ids.device)
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
            if not isinstance(weight_and_reduce_impl, no_op_reduce):
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
                self._on_call(self._counters.bytes_sent_remote - self._bytes_before)

    _CLASSES[base] = CapacityAllToAllPrepareAndFinalize
    SESSION.on_revert("moe.all_to_all.classes", forget_classes)
    return CapacityAllToAllPrepareAndFinalize


def make_kernel_class(upstream: Any) -> type:
    """vLLM's FusedMoEKernel whose `apply` is one opaque custom op (built once, on first use).

    On CPU vLLM calls the MoE layer as a plain function, so under its default compiled mode
    Dynamo traces into the modular kernel (0.32 runner/moe_runner.py, _select_forward; 0.23
    the same). prepare/finalize here sizes its messages on the host (split exchange,
    `.tolist()`), runs collectives and produces data-dependent shapes: nothing Dynamo can
    trace. So, as vLLM does for its own layer on GPUs (torch.ops.vllm.moe_forward), the whole
    dispatch -> experts -> combine runs inside `ascend_patch::moe_capacity_all_to_all`, which
    the compiled graph calls with tensors of static shape ([T, H] in, [T, H] out) and which
    runs this kernel's eager `apply` by layer name.
    """
    base = upstream.FusedMoEKernel
    built = _CLASSES.get(base)
    if built is not None:
        return built
    from ascend_patch.impls.moe import custom_ops

    class CapacityAllToAllKernel(base):
        def __init__(self, prepare_finalize: Any, fused_experts: Any, layer: Any) -> None:
            super().__init__(prepare_finalize, fused_experts)
            # Constant per layer, so not op arguments (an op takes tensors, str, int, bool;
            # vLLM passes these from the layer on every call, 0.32 and 0.23 alike).
            self.layer_name = layer.layer_name
            self.activation = layer.activation
            self.global_num_experts = layer.global_num_experts
            self.apply_router_weight_on_input = layer.apply_router_weight_on_input

        def apply(
            self,
            hidden_states: torch.Tensor,
            w1: torch.Tensor,
            w2: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            activation: Any,
            global_num_experts: int,
            expert_map: torch.Tensor | None,
            apply_router_weight_on_input: bool,
            shared_experts: Any = None,
            shared_experts_input: torch.Tensor | None = None,
        ) -> torch.Tensor:
            # shared_experts are the runner's: this prepare/finalize is not async, so vLLM's
            # kernel would not run them either (modular_kernel.py, _finalize).
            return custom_ops.all_to_all(
                hidden_states, w1, w2, topk_weights, topk_ids, expert_map, self.layer_name
            )

        def apply_eager(
            self,
            hidden_states: torch.Tensor,
            w1: torch.Tensor,
            w2: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            expert_map: torch.Tensor | None,
        ) -> torch.Tensor:
            """vLLM's modular kernel: prepare (dispatch), experts, finalize (combine)."""
            return base.apply(
                self,
                hidden_states=hidden_states,
                w1=w1,
                w2=w2,
                topk_weights=topk_weights,
                topk_ids=topk_ids,
                activation=self.activation,
                global_num_experts=self.global_num_experts,
                expert_map=expert_map,
                apply_router_weight_on_input=self.apply_router_weight_on_input,
            )

    _CLASSES[base] = CapacityAllToAllKernel
    SESSION.on_revert("moe.all_to_all.classes", forget_classes)
    return CapacityAllToAllKernel


def forget_classes() -> None:
    """Build the classes again on next use, from the vLLM modules loaded then."""
    _CLASSES.clear()
