"""Stand-in `torch_npu` for running vllm-ascend's MoE dispatchers on CPU (test only).

Only reachable from the subprocesses of tests/ascend (their boot puts this folder on
sys.path); the rest of the suite never sees it. Importing it installs a `torch.npu` namespace,
as the real package does. Strict: any attribute not emulated here raises AttributeError, so
a vllm-ascend code path that calls an op we did not emulate fails loudly instead of
running something else.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from npu_ops import (  # the emulation folder is on sys.path next to this package
    npu_dequant_swiglu_quant,
    npu_dynamic_quant,
    npu_grouped_matmul,
    npu_grouped_matmul_swiglu_quant,
    npu_moe_token_permute,
    npu_moe_token_unpermute,
    npu_swiglu,
)

__version__ = "0.0.0+cpu-emulation"

__all__ = [
    "npu_dequant_swiglu_quant",
    "npu_dynamic_quant",
    "npu_grouped_matmul",
    "npu_grouped_matmul_swiglu_quant",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_swiglu",
]


class _Event:
    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        return event or _Event()

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass


class _Capture:
    """Whether the emulated current stream is being captured (tests set `active`)."""

    active = False


def _strict(module: types.ModuleType) -> None:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{module.__name__}.{name} is not emulated on CPU")

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _make_torch_npu() -> types.ModuleType:
    npu = types.ModuleType("torch.npu")
    npu.Event = _Event
    npu.Stream = _Stream
    npu.is_available = lambda: False
    npu.device_count = lambda: 0
    npu.current_device = lambda: "cpu"
    npu.current_stream = lambda device=None: _Stream()
    npu.synchronize = lambda device=None: None
    npu.empty_cache = lambda: None
    npu.is_current_stream_capturing = lambda: _Capture.active
    npu.capture = _Capture
    _strict(npu)
    return npu


if not isinstance(getattr(torch, "npu", None), types.ModuleType):
    torch.npu = _make_torch_npu()
npu = torch.npu


def _streams_module() -> types.ModuleType:
    """torch_npu.npu.streams: vllm-ascend 0.13.0's utils.py imports Event from it."""
    import sys

    streams = types.ModuleType("torch_npu.npu.streams")
    streams.Event = _Event
    streams.Stream = _Stream
    _strict(streams)
    sys.modules["torch_npu.npu"] = npu
    sys.modules["torch_npu.npu.streams"] = streams
    return streams


npu.streams = _streams_module()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"torch_npu.{name} is not emulated on CPU")
