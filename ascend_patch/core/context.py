"""What a replacement factory receives: its options, its counters, and its patch's state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from ascend_patch.core.errors import PatchError

T = TypeVar("T")


def _no_flush() -> None:
    pass


@dataclass
class PatchContext:
    """One per applied patch, shared by all its sites; dropped (closed) on revert."""

    patch_name: str
    impl_name: str
    options: BaseModel
    # Free-form counters of this patch in this process, copied into the process report.
    stats: dict[str, Any] = field(default_factory=dict)
    # `file:line` of the patch in its config: every error an implementation raises names it.
    where: str = ""
    # The vLLM line and platform the patch was planned for (a versions.Stack).
    stack: Any = None
    # Rewrites the process report; the patcher injects it (implementations call it at their
    # log interval). It never raises.
    flush: Callable[[], object] = _no_flush
    _state: Any = field(default=None, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def state(self, make: Callable[[PatchContext], T]) -> T:
        """The patch's state object, made by `make(self)` on first use: the sites of one patch
        share it, and revert drops it (no module-level dicts outlive a patch)."""
        if self._state is None:
            self._state = make(self)
        return self._state

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the patch is reverted (unregister what the state registered)."""
        self._closers.append(callback)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        self._state = None

    def error(self, message: str) -> PatchError:
        """A PatchError naming this patch and where the config declares it."""
        where = f"{self.where}: " if self.where else ""
        return PatchError(f"{where}patch {self.patch_name!r} ({self.impl_name}): {message}")
