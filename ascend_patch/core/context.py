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
    # The catalog.Implementation whose declarations `upstream` resolves (None: the built-in
    # entry named `impl_name`).
    impl: Any = None
    _state: Any = field(default=None, repr=False)
    _upstream: Any = field(default=None, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _readers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def on_read(self, fold: Callable[[], None]) -> None:
        """Run `fold` before `stats` is read for a report (`read_stats`): where counters are
        kept on a device between reads, it brings them into `stats`."""
        self._readers.append(fold)

    def read_stats(self) -> dict[str, Any]:
        """`stats`, up to date: what a report (or a test) reads."""
        for fold in self._readers:
            fold()
        return self.stats

    def state(self, make: Callable[[PatchContext], T]) -> T:
        """The patch's state object, made by `make(self)` on first use: the sites of one patch
        share it, and revert drops it (no module-level dicts outlive a patch)."""
        if self._state is None:
            self._state = make(self)
        return self._state

    @property
    def upstream(self) -> Any:
        """The upstream symbols this implementation declares for the patch's stack, by key:
        `ctx.upstream.get_ep_group` (core/upstream.py). Without a stack (a context made by
        hand), this machine's."""
        if self._upstream is None:
            from ascend_patch.core.upstream import for_implementation

            impl, stack = self._declared()
            self._upstream = for_implementation(impl, stack.line, stack.platform,
                                                error=self.error)
        return self._upstream

    @property
    def site_set(self) -> Any:
        """The catalog SiteSet of the patch's stack (without a stack, this machine's)."""
        impl, stack = self._declared()
        return impl.site_set(stack.line, stack.platform)

    def _declared(self) -> tuple[Any, Any]:
        """(the catalog Implementation, the stack) whose declarations this patch runs under."""
        from ascend_patch.core import catalog
        from ascend_patch.core.versions import detect_stack

        impl = self.impl if self.impl is not None else catalog.lookup(self.impl_name)
        if impl is None:
            raise self.error("not a catalog entry: give the context its Implementation")
        return impl, (self.stack if self.stack is not None else detect_stack())

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the patch is reverted (unregister what the state registered)."""
        self._closers.append(callback)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        self._state = None
        self._upstream = None

    def error(self, message: str) -> PatchError:
        """A PatchError naming this patch and where the config declares it."""
        where = f"{self.where}: " if self.where else ""
        return PatchError(f"{where}patch {self.patch_name!r} ({self.impl_name}): {message}")
