"""What a replacement factory receives: its validated options and a place for counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass
class PatchContext:
    patch_name: str
    impl_name: str
    options: BaseModel
    # Free-form counters of this patch in this process, copied into the process report.
    stats: dict[str, Any] = field(default_factory=dict)

    def flush(self) -> None:
        """Write the process report now (implementations call this at their log interval)."""
        from ascend_patch.core import report

        report.flush()
