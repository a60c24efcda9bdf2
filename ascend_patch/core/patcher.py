"""Applying and reverting a validated config: atomic, idempotent, reversible, lazy.

Each site is installed with the original reachable as `__wrapped__`. Sites whose module is
loaded are applied at once; the others wait for the module's first import (see imports.py).
Eager application is all-or-nothing: a failing `on_error: fail` patch rolls back every site
this call applied. A lazy site that fails later makes the import that triggered it fail.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ascend_patch.core import catalog, report
from ascend_patch.core.config import LoadedConfig, PlannedPatch, PlannedSite
from ascend_patch.core.context import PatchContext
from ascend_patch.core.errors import PatchError
from ascend_patch.core.imports import WATCHER
from ascend_patch.core.live import interface_problem, signature_problem, version_problems
from ascend_patch.core.targets import Resolved, render_signature, resolve
from ascend_patch.core.versions import InstalledVllm, installed_vllm

log = logging.getLogger("ascend_patch")

MARKER = "__ascend_patch__"


@dataclass
class InstalledSite:
    patch: str
    site: PlannedSite
    resolved: Resolved
    new_raw: Any
    # (module, global name) pairs that held the original through `from x import f`.
    copies: list[tuple[ModuleType, str]] = field(default_factory=list)

    def uninstall(self) -> None:
        owner, attr = self.resolved.owner, self.resolved.attr
        if self.resolved.own:
            setattr(owner, attr, self.resolved.raw)
        elif attr in vars(owner):
            delattr(owner, attr)
        for module, name in self.copies:
            if vars(module).get(name) is self.new_raw:
                setattr(module, name, self.resolved.raw)


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
            "stats": self.context.stats if self.context else {},
        }


class Patcher:
    def __init__(self) -> None:
        self.config: LoadedConfig | None = None
        self.records: dict[str, PatchRecord] = {}
        self.installed: list[InstalledSite] = []
        self._lock = threading.RLock()

    # -- public ---------------------------------------------------------------------------
    def apply(
        self, config: LoadedConfig, *, disabled: frozenset[str] = frozenset()
    ) -> list[PatchRecord]:
        with self._lock:
            if self.config is not None:
                if (self.config.digest, self.config.profile) == (config.digest, config.profile):
                    return list(self.records.values())
                raise PatchError(
                    f"{config.path}: another config ({self.config.path}, sha256 "
                    f"{self.config.digest[:12]}, profile {self.config.profile}) is already "
                    "applied in this process; revert() first"
                )
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
            self.records = records
            return list(records.values())

    def revert(self) -> None:
        with self._lock:
            self._rollback(0)
            WATCHER.clear()
            self._close_contexts(self.records.values())
            self.config = None
            self.records = {}

    @staticmethod
    def _close_contexts(records) -> None:
        for record in records:
            if record.context is not None:
                record.context.close()

    # -- internals ------------------------------------------------------------------------
    def _rollback(self, keep: int) -> None:
        while len(self.installed) > keep:
            self.installed.pop().uninstall()

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
            if len(record.applied_roles) == len(patch.sites):
                record.status = "applied"
            for site in patch.sites:
                if site.role not in record.applied_roles:
                    WATCHER.watch(site.target.module, self._on_import(patch, site, record))
        except PatchError as exc:
            return self._handle_failure(patch, record, exc)
        return record

    def _handle_failure(self, patch: PlannedPatch, record: PatchRecord, exc: PatchError) -> PatchRecord:
        message = f"{patch.file}:{patch.line}: patch {patch.name!r}: {exc}"
        if patch.on_error == "fail":
            raise PatchError(message) from None
        # Remove this patch's own sites; the others stay.
        mine = [s for s in self.installed if s.patch == patch.name]
        for site in reversed(mine):
            site.uninstall()
        self.installed = [s for s in self.installed if s.patch != patch.name]
        if record.context is not None:
            record.context.close()
        record.status, record.reason = "skipped", f"on_error: skip: {exc}"
        record.applied_roles.clear()
        return record


    def _on_import(self, patch: PlannedPatch, site: PlannedSite, record: PatchRecord):
        def callback(module: ModuleType) -> None:
            with self._lock:
                if self.records.get(patch.name) is not record or record.status == "skipped":
                    return  # reverted, or skipped meanwhile
                try:
                    self._install(patch, site, record)
                except PatchError as exc:
                    self._handle_failure(patch, record, exc)
                    log.warning("ascend-patch [%s pid %d]: %s (%s) skipped: %s", report.process_role(),
                                os.getpid(), patch.name, patch.impl.name, record.reason)
                    return
                if len(record.applied_roles) == len(patch.sites):
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
        if getattr(current, MARKER, None) == patch.name:
            record.applied_roles.append(site.role)  # already ours: applying twice is a no-op
            return
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
        original = installed.resolved.raw
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


PATCHER = Patcher()
