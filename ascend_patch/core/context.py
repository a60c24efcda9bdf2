"""What a replacement factory receives: its validated options and a place for counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


def _no_flush() -> None:
    pass


@dataclass
class PatchContext:
    patch_name: str
    impl_name: str
    options: BaseModel
    # Free-form counters of this patch in this process, copied into the process report.
    stats: dict[str, Any] = field(default_factory=dict)
    # Rewrites the process report; the patcher injects it (implementations call it at their
    # log interval). It never raises.
    flush: Callable[[], object] = _no_flush
