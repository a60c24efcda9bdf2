"""all_gatherv / reduce_scatterv for vLLM's CPU communicator (gloo).

vLLM 0.32's `CpuCommunicator` inherits `DeviceCommunicatorBase.all_gatherv` and
`reduce_scatterv`, which raise NotImplementedError, so data parallel + expert parallel MoE
(`AgRsAll2AllManager` dispatch / combine) cannot run on CPU. gloo's all_gather needs equal
sizes on every rank, so both collectives pad every rank's slice to the largest one, run one
equal-size collective and slice the result.

Semantics follow the CUDA communicator (vllm/distributed/device_communicators/
cuda_communicator.py `all_gatherv` / `_reduce_scatterv`):

- `all_gatherv(input_, dim=0, sizes=None)`: `input_` is a tensor or a list of tensors;
  `sizes[r]` is rank r's extent along `dim` (`None`: every rank has this rank's shape).
  Returns the concatenation along `dim` in rank order (a list for a list input).
- `reduce_scatterv(input_, dim=-1, sizes=None)`: `input_` has `sum(sizes)` along `dim` on
  every rank; rank r receives the elementwise sum over ranks of the slice
  `[sum(sizes[:r]), sum(sizes[:r+1]))` (`None`: equal chunks).

The `*_impl` functions take a plain torch ProcessGroup so they can be tested without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

_all_gather_tensor: Callable[..., Any] = (
    getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
)
_reduce_scatter_tensor: Callable[..., Any] = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim {dim} out of range for a {ndim}-d tensor")
    return dim + ndim if dim < 0 else dim


def _check_sizes(sizes: Sequence[int] | None, world_size: int) -> list[int] | None:
    if sizes is None:
        return None
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size:
        raise ValueError(f"len(sizes)={len(sizes)} != world size {world_size}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"negative size in {sizes}")
    return sizes


def _gather_rows(
    x: torch.Tensor, sizes: list[int] | None, group: Any, rank: int, world_size: int
) -> torch.Tensor:
    """All-gather a contiguous tensor along dim 0 (rank r holds sizes[r] rows)."""
    n = x.shape[0]
    if sizes is None:
        sizes = [n] * world_size
    elif sizes[rank] != n:
        raise ValueError(f"rank {rank} holds {n} rows but sizes[{rank}]={sizes[rank]}")
    m = max(sizes)
    tail = tuple(x.shape[1:])
    if m == 0:
        return x.new_empty((0,) + tail)
    uniform = all(s == m for s in sizes)
    if uniform:
        send = x
    else:
        send = x.new_zeros((m,) + tail)
        send[:n].copy_(x)
    out = x.new_empty((world_size * m,) + tail)
    _all_gather_tensor(out, send, group=group)
    if uniform:
        return out
    out = out.view((world_size, m) + tail)
    return torch.cat([out[r, : sizes[r]] for r in range(world_size)], dim=0)


def _gather_one(
    t: torch.Tensor, dim: int, sizes: list[int] | None, group: Any, rank: int, ws: int
) -> torch.Tensor:
    d = _norm_dim(dim, t.dim())
    x = t.movedim(d, 0).contiguous()
    out = _gather_rows(x, sizes, group, rank, ws)
    return out if d == 0 else out.movedim(0, d).contiguous()


def _gather_fused(
    tensors: Sequence[torch.Tensor], sizes: list[int] | None, group: Any, rank: int, ws: int
) -> list[torch.Tensor]:
    """Gather several dim-0 tensors with the same row count in ONE collective: every row
    of every tensor is packed as bytes into one [rows, total_bytes] uint8 tensor."""
    n = tensors[0].shape[0]
    parts, layout = [], []
    for t in tensors:
        row_elems = math.prod(t.shape[1:])
        b = t.contiguous().reshape(n, row_elems).view(torch.uint8)
        layout.append((t.dtype, tuple(t.shape[1:]), b.shape[1]))
        parts.append(b)
    packed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    gathered = _gather_rows(packed, sizes, group, rank, ws)
    total = gathered.shape[0]
    outs, off = [], 0
    for dtype, tail, nbytes in layout:
        chunk = gathered[:, off : off + nbytes].contiguous()
        outs.append(chunk.view(dtype).reshape((total,) + tail))
        off += nbytes
    return outs


def all_gatherv_impl(
    input_: torch.Tensor | Sequence[torch.Tensor],
    dim: int = 0,
    sizes: Sequence[int] | None = None,
    *,
    group: Any,
    rank: int,
    world_size: int,
    fuse_lists: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    sizes_ = _check_sizes(sizes, world_size)
    if isinstance(input_, torch.Tensor):
        if world_size == 1:
            return input_
        return _gather_one(input_, dim, sizes_, group, rank, world_size)
    tensors = list(input_)
    if world_size == 1 or not tensors:
        return tensors
    can_fuse = (
        fuse_lists
        and len(tensors) > 1
        and dim == 0
        and all(t.dim() >= 1 and t.device == tensors[0].device for t in tensors)
        and len({t.shape[0] for t in tensors}) == 1
    )
    if can_fuse:
        return _gather_fused(tensors, sizes_, group, rank, world_size)
    return [_gather_one(t, dim, sizes_, group, rank, world_size) for t in tensors]


def reduce_scatterv_impl(
    input_: torch.Tensor,
    dim: int = -1,
    sizes: Sequence[int] | None = None,
    *,
    group: Any,
    rank: int,
    world_size: int,
    mode: str = "reduce_scatter",
) -> torch.Tensor:
    if world_size == 1:
        return input_
    d = _norm_dim(dim, input_.dim())
    x = input_.movedim(d, 0).contiguous()
    total = x.shape[0]
    sizes_ = _check_sizes(sizes, world_size)
    if sizes_ is None:
        if total % world_size:
            raise ValueError(f"{total} rows do not split evenly over {world_size} ranks")
        sizes_ = [total // world_size] * world_size
    if sum(sizes_) != total:
        raise ValueError(f"input has {total} rows along dim {d}, sizes sum to {sum(sizes_)}")
    tail = tuple(x.shape[1:])
    m = max(sizes_)
    start = sum(sizes_[:rank])
    if m == 0:
        out = x.new_empty((0,) + tail)
    elif mode == "all_reduce":
        y = x.clone()
        dist.all_reduce(y, group=group)
        out = y[start : start + sizes_[rank]]
    elif mode == "reduce_scatter":
        if all(s == m for s in sizes_):
            send = x
        else:
            send = x.new_zeros((world_size * m,) + tail)
            view = send.view((world_size, m) + tail)
            off = 0
            for r, s in enumerate(sizes_):
                view[r, :s].copy_(x[off : off + s])
                off += s
        recv = x.new_empty((m,) + tail)
        _reduce_scatter_tensor(recv, send, group=group)
        out = recv[: sizes_[rank]]
    else:
        raise ValueError(f"unknown reduce_scatterv mode {mode!r}")
    return out.movedim(0, d).contiguous()


# --------------------------------------------------------------------------- factories


def _group_of(comm: Any) -> Any:
    group = getattr(comm, "device_group", None)
    return group if group is not None else comm.cpu_group


def _bump(stats: dict[str, Any], key: str, nbytes: int) -> None:
    stats[f"{key}.calls"] = stats.get(f"{key}.calls", 0) + 1
    stats[f"{key}.bytes"] = stats.get(f"{key}.bytes", 0) + nbytes


def _nbytes(x: torch.Tensor | Sequence[torch.Tensor]) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(t.numel() * t.element_size() for t in x)


def _communicator_method(impl: Callable[..., Any], name: str, default_dim: int,
                         original: Callable[..., Any] | None, ctx: Any, doc: str | None,
                         **options: Any) -> Callable[..., Any]:
    """A CpuCommunicator method `name(self, input_, dim=default_dim, sizes=None)` that counts
    its calls and bytes and runs `impl` on the communicator's group."""
    stats = ctx.stats

    def method(self: Any, input_: Any, dim: int = default_dim,
               sizes: list[int] | None = None) -> Any:
        _bump(stats, name, _nbytes(input_))
        return impl(input_, dim, sizes, group=_group_of(self), rank=self.rank_in_group,
                    world_size=self.world_size, **options)

    method.__name__ = method.__qualname__ = name
    method.__wrapped__ = original  # type: ignore[attr-defined]
    method.__doc__ = doc
    return method


def make_all_gatherv(original: Callable[..., Any] | None, ctx: Any) -> Callable[..., Any]:
    """Replacement of `CpuCommunicator.all_gatherv(self, input_, dim=0, sizes=None)`."""
    return _communicator_method(all_gatherv_impl, "all_gatherv", 0, original, ctx,
                                make_all_gatherv.__doc__,
                                fuse_lists=bool(getattr(ctx.options, "fuse_lists", True)))


def make_reduce_scatterv(original: Callable[..., Any] | None, ctx: Any) -> Callable[..., Any]:
    """Replacement of `CpuCommunicator.reduce_scatterv(self, input_, dim=-1, sizes=None)`."""
    return _communicator_method(
        reduce_scatterv_impl, "reduce_scatterv", -1, original, ctx, make_reduce_scatterv.__doc__,
        mode=str(getattr(ctx.options, "reduce_scatter_mode", "reduce_scatter")))
