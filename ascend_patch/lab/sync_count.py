"""Counting the ops that would stall an accelerator, on the CPU.

On an NPU or GPU a host read (`.item()`, `int(t)`, a copy to the host) or an op whose output
size depends on the data (`nonzero`, `unique`, boolean-mask indexing, `bincount`) waits for
the device's queue to drain. The CPU has no queue, so `SyncCounter` (a TorchDispatchMode)
records the aten ops that *would* synchronise a device: tests/moe/test_sync_free.py asserts
the drop step runs none, scripts/bench_planner.py prints the counts per call beside its
timings.

A dispatch mode sees aten ops only, and on the CPU a copy of a tensor's values to the host
(`t.tolist()`, `t.cpu()`, `t.numpy()`) runs none: the tensor already is there. `HostReads`
(a TorchFunctionMode) records those calls at the Python API instead, and `torch.tensor` /
`torch.as_tensor` (uploads of host values: on a device a blocking copy that waits for the
queue too). tests/moe/test_all_to_all_dispatch.py counts the all-to-all dispatcher with both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a value back to the host, or whose output shape depends on the data.
SYNCING = {
    aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.unique_dim,
    aten._unique, aten._unique2, aten.unique_consecutive, aten.unique_dim_consecutive,
    aten.masked_select, aten.bincount, aten.histc, aten.masked_scatter,
}
_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


class SyncCounter(TorchDispatchMode):
    """Records (by aten name) every op that would synchronise a device, and counts all ops.
    A mode sees the ops a kernel calls inside itself only when that kernel is itself
    dispatched from Python: `_assert_async` is one op here, as it is on a device.

    Collectives (the c10d ops torch.distributed dispatches) are recorded apart, in
    `collectives`, not as syncs: a device queues them on its stream like any kernel (on gloo
    they are CPU work the calling thread waits for)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.collectives: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        self.ops += 1
        if syncing(func, args, kwargs):
            self.syncs.append(str(func))
        elif func.namespace == "c10d":
            self.collectives.append(str(func))
        return func(*args, **kwargs)


def syncing(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    packet = func.overloadpacket
    if packet in SYNCING:
        return True
    if packet in _INDEXING:  # x[mask] / x[mask] = v: the size is the mask's count
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if packet is aten.repeat_interleave:  # sized by the data unless told its size
        return kwargs.get("output_size") is None
    if packet in (aten._to_copy, aten.copy_):  # a copy between devices
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device")
        return target is not None and torch.device(target) != source.device
    return False


# Python calls that bring a tensor's values to the host (on a device: one device-to-host read
# each, after everything queued before it). Scalar conversions are here too: they also show
# as `_local_scalar_dense` to a SyncCounter.
_READS = {
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.cpu,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__,
}
_UPLOADS = {torch.tensor, torch.as_tensor}


class HostReads(TorchFunctionMode):
    """Records (by name) the calls that read a tensor's values back to the host (`reads`:
    `tolist`, `cpu`, `numpy`, `item`, scalar conversions) and those that upload host values
    (`uploads`: `torch.tensor`, `torch.as_tensor`), whatever device the tensors are on: what
    a device would wait for, also where the CPU makes it a no-op. Not seen: `t.to(d)`, since
    on the CPU every d is the host, so a read cannot be told from a move between a device's
    tensors (a copy between devices that does happen is a SyncCounter sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func in _READS:
            self.reads.append(func.__name__)
        elif func in _UPLOADS:
            self.uploads.append(func.__name__)
        return func(*args, **kwargs)

