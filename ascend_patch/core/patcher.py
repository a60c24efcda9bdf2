"""Applying and reverting a validated config: atomic, idempotent, reversible, lazy.

Each site is installed with the original reachable as `__wrapped__`. Sites whose module is
loaded are applied at once; the others wait for the module's first import (see imports.py).
Eager application is all-or-nothing: a failing `on_error: fail` patch rolls back every site
this call applied. A lazy site that fails later makes the import that triggered it fail, and
every later import of that module too (the patch is reported failed).

One patch per function: a target whose function another patch of ours already replaced, or
that resolves to the same function as another installed site (an alias, a re-export, a
subclass attribute inherited from the base), is refused whatever `on_error` says: that is a
contradiction in the config, not a property of the machine.

What is ours is decided by the identity of the installed object, not by its marker
attribute: a replacement an earlier revert left in place (another tool had wrapped it) and
that tool put back since is replaced (its original restored at revert, by the next revert
even without a new apply); another tool's wrapper that copied our marker is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ascend_patch.core import catalog, report
from ascend_patch.core.config import LoadedConfig, PlannedPatch, PlannedSite
from ascend_patch.core.context import PatchContext
from ascend_patch.core.errors import PatchError, TargetConflict
from ascend_patch.core.imports import WATCHER
from ascend_patch.core.live import interface_problem, signature_problem, version_problems
from ascend_patch.core.session import SESSION
from ascend_patch.core.targets import Resolved, find_module, render_signature, resolve
from ascend_patch.core.versions import InstalledVllm, installed_vllm

log = logging.getLogger("ascend_patch")

MARKER = "__ascend_patch__"
_MISSING = object()

# What is ours is known by identity, never by the marker alone: functools.wraps copies the
# marker onto another tool's wrapper, and proxies (wrapt) forward it. Every replacement this
# process made (weakly, by id), and the installed site of each one in place now.
_MADE: dict[int, weakref.ref] = {}
_LIVE: dict[int, InstalledSite] = {}


def _remember(replacement: Any) -> None:
    key = id(replacement)
    try:
        _MADE[key] = weakref.ref(replacement, lambda _ref: _MADE.pop(key, None))
    except TypeError:
        pass  # not weakly referenceable: never taken for ours when found again


def _made_here(value: Any) -> bool:
    ref = _MADE.get(id(value))
    return ref is not None and ref() is value


def _live_site(value: Any) -> InstalledSite | None:
    site = _LIVE.get(id(value))
    return site if site is not None and site.replacement is value else None


@dataclass
class InstalledSite:
    patch: str
    site: PlannedSite
    resolved: Resolved
    new_raw: Any
    # (module, global name) pairs that held the original through `from x import f`.
    copies: list[tuple[ModuleType, str]] = field(default_factory=list)

    @property
    def replacement(self) -> Any:
        return _function(self.new_raw)

    def uninstall(self) -> str | None:
        """Put the original back, unless something else replaced ours since: then leave that
        in place (it may wrap ours) and return why."""
        _LIVE.pop(id(self.replacement), None)
        owner, attr = self.resolved.owner, self.resolved.attr
        current = vars(owner).get(attr, _MISSING)
        left = None
        if current is not self.new_raw:
            what = "removed" if current is _MISSING else f"replaced by {_describe(current)}"
            left = (f"{self.site.target} ({self.patch}): left as it is, {what} after "
                    "ascend-patch installed its replacement")
        elif self.resolved.own:
            setattr(owner, attr, self.resolved.raw)
        else:
            delattr(owner, attr)
        for module, name in self.copies:
            if vars(module).get(name) is self.new_raw:
                setattr(module, name, self.resolved.raw)
        return left


def _all_required_applied(patch: PlannedPatch, record: PatchRecord) -> bool:
    return all(s.role in record.applied_roles for s in patch.sites if not s.optional)


def _describe(value: Any) -> str:
    func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    name = getattr(func, "__qualname__", None) or type(func).__name__
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


@dataclass
class PatchRecord:
    name: str
    impl: str
    status: str  # applied | pending | provided | skipped | disabled | failed
    reason: str = ""
    targets: dict[str, str] = field(default_factory=dict)  # role -> target
    applied_roles: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    context: PatchContext | None = None
    # Relied-on interfaces checked against the running vLLM, and those whose module was not
    # loaded when the patch was installed (`validate` checks every one).
    interfaces_checked: list[str] = field(default_factory=list)
    interfaces_unchecked: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "impl": self.impl,
            "status": self.status,
            "reason": self.reason,
            "targets": self.targets,
            "applied_roles": self.applied_roles,
            "copies_patched": self.copies,
            "options": self.options,
            "interfaces_checked": self.interfaces_checked,
            "interfaces_unchecked": self.interfaces_unchecked,
            "stats": self.context.read_stats() if self.context else {},
        }


class Patcher:
    def __init__(self, name: str | None = None) -> None:
        # The session reverts each patcher under its own name (a test may make several).
        self.name = name or f"patcher@{id(self):x}"
        self.config: LoadedConfig | None = None
        self.records: dict[str, PatchRecord] = {}
        self.installed: list[InstalledSite] = []
        self.disabled: frozenset[str] = frozenset()
        # What the last revert() left in place because another tool replaced it after us.
        self.left_in_place: list[str] = []
        # Those sites: a later revert removes a replacement another tool has put back since.
        self._left: list[InstalledSite] = []
        # The session's: a lazy install must not interleave with a revert or another apply.
        self._lock = SESSION.lock

    # -- public ---------------------------------------------------------------------------
    def apply(
        self, config: LoadedConfig, *, disabled: frozenset[str] = frozenset()
    ) -> list[PatchRecord]:
        with self._lock:
            if self.config is not None:
                differs = _differences(self.config, self.disabled, config, disabled)
                if not differs:
                    return list(self.records.values())
                raise PatchError(
                    f"{config.path}: another config ({self.config.path}, sha256 "
                    f"{self.config.digest[:12]}, profile {self.config.profile}) is already "
                    f"applied in this process ({differs}); revert() first"
                )
            SESSION.on_revert(self.name, self.revert)
            vllm = installed_vllm()
            installed_before = len(self.installed)
            records: dict[str, PatchRecord] = {}
            try:
                for patch in config.patches:
                    records[patch.name] = self._apply_patch(config, patch, disabled, vllm)
            except BaseException:
                self._rollback(installed_before)
                WATCHER.clear()
                self._close_contexts(records.values())
                raise
            self.config = config
            self.disabled = disabled
            self.records = records
            return list(records.values())

    def revert(self) -> None:
        with self._lock:
            self.left_in_place = []
            self._rollback(0)
            self._remove_put_back()
            WATCHER.clear()
            self._close_contexts(self.records.values())
            self.config = None
            self.disabled = frozenset()
            self.records = {}

    @staticmethod
    def _close_contexts(records) -> None:
        for record in records:
            if record.context is not None:
                record.context.close()

    # -- internals ------------------------------------------------------------------------
    def _remove_put_back(self) -> None:
        """Sites an earlier revert left in place whose replacement another tool has put back
        (unittest.mock's stop(), a save and restore): that is ours again, the original goes
        back. What still holds the other tool's object stays left."""
        left, self._left = self._left, []
        for site in left:
            current = vars(site.resolved.owner).get(site.resolved.attr, _MISSING)
            if current is site.new_raw:
                site.uninstall()
            elif current is not site.resolved.raw and _live_site(_function(current)) is None:
                self._left.append(site)  # still the other tool's: looked at again next time

    def _rollback(self, keep: int) -> None:
        while len(self.installed) > keep:
            self._uninstall(self.installed.pop())

    def _uninstall(self, site: InstalledSite) -> None:
        left = site.uninstall()
        if left is not None:
            self._left.append(site)
            self.left_in_place.append(left)
            log.warning("ascend-patch [%s pid %d]: revert: %s", report.process_role(),
                        os.getpid(), left)

    def _apply_patch(
        self,
        config: LoadedConfig,
        patch: PlannedPatch,
        disabled: frozenset[str],
        vllm: InstalledVllm | None,
    ) -> PatchRecord:
        record = PatchRecord(
            name=patch.name,
            impl=patch.impl.name,
            status="pending",
            targets={s.role: str(s.target) for s in patch.sites},
            options=patch.options.model_dump(mode="json"),
        )
        if not patch.enabled:
            record.status, record.reason = "disabled", "enabled: false in the config"
            return record
        if patch.name in disabled or "*" in disabled:
            record.status, record.reason = "disabled", "ASCEND_PATCH_DISABLE"
            return record
        problems = version_problems(config, vllm)
        if patch.unsupported:
            problems.append(patch.unsupported)
        if problems:
            return self._handle_failure(patch, record, PatchError("; ".join(problems)))
        if patch.provided:
            record.status, record.reason = "provided", patch.provided
            return record
        record.context = PatchContext(
            patch.name, patch.impl.name, patch.options, where=patch.where, stack=config.stack,
            flush=report.flush,
        )
        try:
            for site in patch.sites:
                if site.target.module in sys.modules:
                    self._install(patch, site, record)
            if _all_required_applied(patch, record):
                record.status = "applied"
            waiting = [s for s in patch.sites if s.role not in record.applied_roles]
            for site in waiting:
                # Waiting for a module that is not there would wait forever, unpatched.
                exists, where = find_module(site.target.module)
                if not exists:
                    raise PatchError(f"target {site.target}: module {site.target.module!r} does "
                                     f"not exist here ({where})")
            for site in waiting:
                WATCHER.watch(site.target.module, self._on_import(patch, site, record))
        except PatchError as exc:
            return self._handle_failure(patch, record, exc)
        return record

    def _handle_failure(self, patch: PlannedPatch, record: PatchRecord, exc: PatchError) -> PatchRecord:
        message = f"{patch.file}:{patch.line}: patch {patch.name!r}: {exc}"
        if patch.on_error == "fail" or isinstance(exc, TargetConflict):
            raise PatchError(message) from None
        self._remove_sites_of(patch.name)
        if record.context is not None:
            record.context.close()
        record.status, record.reason = "skipped", f"on_error: skip: {exc}"
        record.applied_roles.clear()
        return record


    def _remove_sites_of(self, name: str) -> None:
        """Uninstall one patch's own sites; the others stay."""
        mine = [s for s in self.installed if s.patch == name]
        for site in reversed(mine):
            self._uninstall(site)
        self.installed = [s for s in self.installed if s.patch != name]

    def _on_import(self, patch: PlannedPatch, site: PlannedSite, record: PatchRecord):
        def callback(module: ModuleType) -> None:
            with self._lock:
                if self.records.get(patch.name) is not record or record.status == "skipped":
                    return  # reverted, or skipped meanwhile
                if record.status == "failed":
                    # The watcher runs this again at every import of the module after a failed
                    # one (see imports.py): the module stays unimportable.
                    raise PatchError(record.reason)
                if site.role in record.applied_roles:
                    # An earlier import of this module failed after we patched it; that module
                    # object is gone, patch its new one.
                    record.applied_roles.remove(site.role)
                    for gone in [s for s in self.installed
                                 if (s.patch, s.site.role) == (patch.name, site.role)]:
                        _LIVE.pop(id(gone.replacement), None)
                        self.installed.remove(gone)
                try:
                    self._install(patch, site, record)
                except PatchError as exc:
                    try:
                        self._handle_failure(patch, record, exc)
                    except PatchError as fatal:
                        self._remove_sites_of(patch.name)
                        record.applied_roles.clear()
                        record.status, record.reason = "failed", str(fatal)
                        log.error("ascend-patch [%s pid %d]: %s (%s) failed on import of %s: %s",
                                  report.process_role(), os.getpid(), patch.name,
                                  patch.impl.name, module.__name__, fatal)
                        report.flush()
                        raise
                    log.warning("ascend-patch [%s pid %d]: %s (%s) skipped: %s", report.process_role(),
                                os.getpid(), patch.name, patch.impl.name, record.reason)
                    report.flush()
                    return
                if _all_required_applied(patch, record):
                    record.status = "applied"
                log.info(
                    "ascend-patch [%s pid %d]: %s (%s) applied on import of %s -> %s",
                    report.process_role(), os.getpid(), patch.name, patch.impl.name,
                    module.__name__, site.target,
                )
            report.flush()

        return callback

    def _install(self, patch: PlannedPatch, site: PlannedSite, record: PatchRecord) -> None:
        try:
            resolved = resolve(site.target, import_module=False)
        except LookupError as exc:
            raise PatchError(f"target {site.target}: {exc}") from None
        current = resolved.function
        live = _live_site(current)
        if live is not None:
            if live.patch == patch.name:
                record.applied_roles.append(site.role)  # already ours: applying twice is a no-op
                return
            raise TargetConflict(f"target {site.target} is already patched by {live.patch!r}; "
                                 "one patch per function")
        if _made_here(current):
            # Ours from an earlier session, put back by another tool after a revert left it:
            # replace it, and a revert restores what it had replaced.
            resolved = _unwrapped(resolved, site)
            current = resolved.function
        elif _marker(current) is not None:
            raise TargetConflict(
                f"target {site.target} is already patched by {_marker(current)!r}; one patch "
                f"per function ({_describe(current)} carries that mark but this process did "
                "not install it: another tool's wrapper around a replacement a revert left in "
                "place, or another copy of ascend-patch)")
        for other in self.installed:
            if other.resolved.function is current and other.patch != patch.name:
                raise TargetConflict(
                    f"target {site.target} is the same function as {other.site.target}, "
                    f"already patched by {other.patch!r}; one patch per function")
        problem = signature_problem(patch, site, render_signature(current))
        if problem:
            raise PatchError(problem)
        self._check_interfaces(patch, record)
        try:
            factory = catalog.load_callable(site.factory)
            assert record.context is not None
            replacement = factory(current, record.context)
        except PatchError:
            raise
        except Exception as exc:
            raise PatchError(f"{site.factory} failed: {type(exc).__name__}: {exc}") from exc
        try:
            replacement.__wrapped__ = current
            setattr(replacement, MARKER, patch.name)
        except (AttributeError, TypeError):
            pass
        new_raw: Any = replacement
        if isinstance(resolved.raw, staticmethod):
            new_raw = staticmethod(replacement)
        elif isinstance(resolved.raw, classmethod):
            new_raw = classmethod(replacement)
        setattr(resolved.owner, resolved.attr, new_raw)
        installed = InstalledSite(patch.name, site, resolved, new_raw)
        _remember(replacement)
        _LIVE[id(replacement)] = installed
        self.installed.append(installed)
        if isinstance(resolved.owner, ModuleType):
            self._patch_copies(installed, record)
        record.applied_roles.append(site.role)

    @staticmethod
    def _check_interfaces(patch: PlannedPatch, record: PatchRecord) -> None:
        """Check the relied-on interfaces whose module is loaded (once per patch).

        Importing the others here could run a module that is half-initialised higher up the
        import that triggered this install; `validate` imports and checks every one.
        """
        if record.interfaces_checked or record.interfaces_unchecked:
            return
        for interface in patch.relies_on:
            if interface.target.module not in sys.modules:
                record.interfaces_unchecked.append(str(interface.target))
                continue
            problem = interface_problem(patch, interface, import_module=False)
            if problem:
                record.interfaces_checked.clear()
                record.interfaces_unchecked.clear()
                raise PatchError(problem)
            record.interfaces_checked.append(str(interface.target))

    @staticmethod
    def _patch_copies(installed: InstalledSite, record: PatchRecord) -> None:
        """Rebind module-level names that hold the original function (`from m import f`,
        `from m import f as g`) in every loaded module.

        Only a plain Python function defined in the target module is followed: an object
        re-exported from elsewhere (a torch function, a builtin, a constant such as True)
        is bound under that name in modules that never meant ours. Nothing else is
        rewritten: class attributes, containers, closures, default arguments keep the
        original.
        """
        original = installed.resolved.raw
        if not inspect.isfunction(original) or getattr(original, "__module__", None) != (
            installed.site.target.module
        ):
            return
        for module in list(sys.modules.values()):
            if module is installed.resolved.owner or not isinstance(module, ModuleType):
                continue
            namespace = getattr(module, "__dict__", None)
            if not namespace:
                continue
            for name, value in list(namespace.items()):
                if value is original:
                    setattr(module, name, installed.new_raw)
                    installed.copies.append((module, name))
                    record.copies.append(f"{module.__name__}.{name}")


def _function(raw: Any) -> Any:
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def _marker(value: Any) -> Any:
    try:
        return getattr(value, MARKER, None)
    except Exception:  # noqa: BLE001 - a proxy whose lookup raises carries no marker
        return None


def _unwrapped(resolved: Resolved, site: PlannedSite) -> Resolved:
    """`resolved` as it was before the replacement of ours it holds was installed."""
    inner = getattr(resolved.function, "__wrapped__", _MISSING)
    if inner is _MISSING:
        raise TargetConflict(f"target {site.target} holds an earlier replacement of "
                             "ascend-patch without the function it replaced")
    raw = resolved.raw
    if isinstance(raw, (staticmethod, classmethod)):
        inner = type(raw)(inner)
    return dataclasses.replace(resolved, raw=inner)


def _differences(old: LoadedConfig, old_disabled: frozenset[str], new: LoadedConfig,
                 new_disabled: frozenset[str]) -> str:
    """What differs between what is applied and what is asked for ('' when nothing does)."""
    if (old.digest, old.profile) != (new.digest, new.profile):
        return f"asked for {new.path}, sha256 {new.digest[:12]}, profile {new.profile}"
    if old_disabled != new_disabled:
        return (f"disabled patches {sorted(old_disabled)} applied, {sorted(new_disabled)} "
                "asked for")
    old_options = {p.name: p.options for p in old.patches}
    changed = sorted(p.name for p in new.patches if old_options.get(p.name) != p.options)
    if changed:
        return f"other options for {', '.join(changed)}"
    return ""


PATCHER = Patcher("patcher")
