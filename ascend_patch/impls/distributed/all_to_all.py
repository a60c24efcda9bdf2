"""Uneven all-to-all for the expert-parallel group.

`GroupCoordinator` (vllm/distributed/parallel_state.py) has all_gather(v) and
reduce_scatter(v) but no all-to-all. `all_to_all_uneven` sends `send[offset_j : offset_j +
send_splits[j]]` to rank j and returns what every rank sent here, in rank order, with the
per-source row counts. The split sizes are exchanged first (one small all-to-all), then the
rows.

Backends: gloo (CPU, verified on torch 2.13: uneven and zero splits, bf16), NCCL and HCCL
support `torch.distributed.all_to_all_single` with split sizes (`method="all_to_all_single"`,
what "auto" picks for them). Fallbacks: `method="p2p"` (pairwise isend/irecv) and
`method="all_to_all"` (the list form with every chunk padded to the largest chunk of the
group, found by one max all-reduce: gloo's list all_to_all refuses chunks of different sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_A2A_SINGLE_BACKENDS = ("gloo", "nccl", "hccl", "mpi", "xccl")


def resolve_group(group: Any) -> Any:
    """A torch ProcessGroup from a ProcessGroup, a vLLM GroupCoordinator (its device
    group) or None (the default group)."""
    if group is None:
        return dist.group.WORLD
    device_group = getattr(group, "device_group", None)
    if device_group is not None:
        return device_group
    return group


def _auto_method(pg: Any) -> str:
    try:
        backend = str(dist.get_backend(pg)).lower()
    except Exception:  # noqa: BLE001 - unknown group type: be conservative
        return "p2p"
    return "all_to_all_single" if any(b in backend for b in _A2A_SINGLE_BACKENDS) else "p2p"


def _offsets(splits: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in splits:
        out.append(acc)
        acc += s
    return out


def _p2p_exchange(
    send_chunks: list[torch.Tensor], recv_chunks: list[torch.Tensor], pg: Any, rank: int
) -> None:
    reqs = []
    for peer, (s, r) in enumerate(zip(send_chunks, recv_chunks)):
        if peer == rank:
            r.copy_(s)
            continue
        peer_global = dist.get_global_rank(pg, peer)
        if s.numel() > 0:
            reqs.append(dist.isend(s.contiguous(), peer_global, group=pg))
        if r.numel() > 0:
            reqs.append(dist.irecv(r, peer_global, group=pg))
    for req in reqs:
        req.wait()


def _padded_all_to_all(
    send: torch.Tensor,
    send_splits: list[int],
    recv: torch.Tensor,
    recv_splits: list[int],
    pg: Any,
) -> None:
    longest = torch.tensor([max(send_splits + recv_splits)], dtype=torch.int64, device=send.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=pg)
    m = int(longest.item())
    if m == 0:
        return
    tail = tuple(send.shape[1:])
    ws = len(send_splits)
    send_pad = send.new_zeros((ws, m) + tail)
    for j, (chunk, n) in enumerate(zip(send.split(send_splits), send_splits)):
        send_pad[j, :n].copy_(chunk)
    recv_pad = send.new_empty((ws, m) + tail)
    dist.all_to_all(list(recv_pad.unbind(0)), list(send_pad.unbind(0)), group=pg)
    for i, (chunk, n) in enumerate(zip(recv.split(recv_splits), recv_splits)):
        chunk.copy_(recv_pad[i, :n])


def exchange_splits(
    send_splits: Sequence[int], group: Any = None, *, device: Any = None, method: str = "auto"
) -> list[int]:
    """Every rank tells every other how many rows it will send it: returns recv_splits."""
    pg = resolve_group(group)
    ws = dist.get_world_size(pg)
    if len(send_splits) != ws:
        raise ValueError(f"len(send_splits)={len(send_splits)} != group size {ws}")
    counts = torch.tensor([int(s) for s in send_splits], dtype=torch.int64, device=device)
    recv = torch.empty_like(counts)
    method = _auto_method(pg) if method == "auto" else method
    if method == "all_to_all_single":
        dist.all_to_all_single(recv, counts, group=pg)
    elif method == "all_to_all":
        dist.all_to_all(list(recv.split(1)), list(counts.split(1)), group=pg)  # equal sizes
    elif method == "p2p":
        _p2p_exchange(list(counts.split(1)), list(recv.split(1)), pg, dist.get_rank(pg))
    else:
        raise ValueError(f"unknown all-to-all method {method!r}")
    return [int(v) for v in recv.tolist()]


def all_to_all_uneven(
    send: torch.Tensor,
    send_splits: Sequence[int],
    group: Any = None,
    *,
    recv_splits: Sequence[int] | None = None,
    method: str = "auto",
) -> tuple[torch.Tensor, list[int]]:
    """Uneven all-to-all along dim 0.

    `send` holds `sum(send_splits)` rows; rows `[off_j, off_j + send_splits[j])` go to
    rank j of `group`. Returns `(recv, recv_splits)`: `recv` holds the rows every rank sent
    here, concatenated in source-rank order, `recv_splits[i]` of them from rank i. Pass
    `recv_splits` when already known to skip the size exchange. Every rank of the group
    must call it (also with zero rows to send).
    """
    pg = resolve_group(group)
    ws = dist.get_world_size(pg)
    send_splits = [int(s) for s in send_splits]
    if len(send_splits) != ws:
        raise ValueError(f"len(send_splits)={len(send_splits)} != group size {ws}")
    if sum(send_splits) != send.shape[0]:
        raise ValueError(f"send has {send.shape[0]} rows, send_splits sum to {sum(send_splits)}")
    method = _auto_method(pg) if method == "auto" else method
    if recv_splits is None:
        recv_splits = exchange_splits(send_splits, pg, device=send.device, method=method)
    else:
        recv_splits = [int(s) for s in recv_splits]
        if len(recv_splits) != ws:
            raise ValueError(f"len(recv_splits)={len(recv_splits)} != group size {ws}")
    send = send.contiguous()
    tail = tuple(send.shape[1:])
    recv = send.new_empty((sum(recv_splits),) + tail)
    if ws == 1:
        recv.copy_(send)
        return recv, recv_splits
    if method == "all_to_all_single":
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=pg,
        )
    elif method == "all_to_all":
        _padded_all_to_all(send, send_splits, recv, recv_splits, pg)
    elif method == "p2p":
        _p2p_exchange(
            list(send.split(send_splits)), list(recv.split(recv_splits)), pg, dist.get_rank(pg)
        )
    else:
        raise ValueError(f"unknown all-to-all method {method!r}")
    return recv, recv_splits
