"""The catalog: every implementation a config may name, described without importing it.

An entry is pure data (target, expected signature, supported vLLM versions, options model
and a `module:function` factory path) so that `validate`, `plan` and the loader can check a
config with neither torch nor vLLM imported. The factory module is imported only when the
patch is really applied.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ascend_patch.core.stacks import LINE_NAMES, STACKS, lines_on


class NoOptions(BaseModel):
    """Options model of implementations that take none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Site:
    """One symbol an implementation replaces.

    `signature` is the expected parameter list of the original, rendered by
    `ascend_patch.core.targets.render_signature` (names, kinds and which have defaults;
    annotations ignored). The loader refuses the patch when the live one differs.
    `factory` is `module:function`; it is called as `factory(original, ctx)` with a
    `ascend_patch.core.context.PatchContext` (options, counters) and returns the
    replacement.
    """

    target: str
    signature: str | None
    factory: str
    role: str = "main"


@dataclass(frozen=True)
class Interface:
    """An upstream symbol an implementation relies on without patching it (called, subclassed
    or read). Declared so that `validate` and the loader see upstream drift before users do."""

    target: str
    signature: str | None
    why: str


@dataclass(frozen=True)
class SiteSet:
    """What an implementation does on some vLLM lines of one platform.

    Exactly one of three: patch `sites` (relying on `relies_on`), or `provided` (the platform
    already does this: nothing to patch, one log line), or `unsupported` (it cannot work
    there; the patch fails or is skipped per its on_error, with this reason).
    """

    lines: tuple[str, ...]
    platform: str = "vllm"
    sites: tuple[Site, ...] = ()
    relies_on: tuple[Interface, ...] = ()
    provided: str = ""
    unsupported: str = ""

    def __post_init__(self) -> None:
        kinds = [bool(self.sites), bool(self.provided), bool(self.unsupported)]
        if sum(kinds) != 1:
            raise ValueError("a SiteSet has sites, or `provided`, or `unsupported`: exactly one")


def no_ascend_release(*lines: str) -> SiteSet:
    """The ascend site set of lines no vllm-ascend release runs on (by default every declared
    line without an ascend stack): there is no vllm-ascend code to patch or rely on."""
    lines = lines or tuple(name for name in LINE_NAMES if name not in lines_on("ascend"))
    releases = ", ".join(f"{s.ascend_release} pairs with vLLM {s.line}" for s in STACKS
                         if s.ascend_release)
    return SiteSet(
        lines=lines,
        platform="ascend",
        unsupported=f"no vllm-ascend release runs on vLLM {', '.join(lines)} yet "
        f"(vllm-ascend {releases})",
    )


@dataclass(frozen=True)
class Implementation:
    name: str
    summary: str
    why: str
    site_sets: tuple[SiteSet, ...]
    options: type[BaseModel] = NoOptions

    def site_set(self, line: str | None, platform: str) -> SiteSet | None:
        """The set for this line and platform; None when the catalog declares none."""
        return next(
            (s for s in self.site_sets
             if s.platform == platform and line is not None and line in s.lines),
            None,
        )

    @property
    def roles(self) -> tuple[str, ...]:
        """Every site role on any line or platform (what a config's `target:` may name)."""
        return tuple(dict.fromkeys(site.role for s in self.site_sets for site in s.sites))

    def lines(self, platform: str) -> tuple[str, ...]:
        """Lines where this implementation patches something on `platform`."""
        return tuple(line for s in self.site_sets if s.platform == platform and s.sites
                     for line in s.lines)


# Module that defines each built-in implementation as `IMPLEMENTATION` (imported lazily).
_BUILTIN_MODULES: dict[str, str] = {
    "ops.rms_norm": "ascend_patch.impls.ops.spec",
    "ops.silu_and_mul": "ascend_patch.impls.ops.spec",
    "moe.capacity": "ascend_patch.impls.moe.spec",
    "distributed.cpu_collectives": "ascend_patch.impls.distributed.spec",
}


def builtin_names() -> list[str]:
    return sorted(_BUILTIN_MODULES)


def lookup(name: str) -> Implementation | None:
    module_name = _BUILTIN_MODULES.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    implementations: Mapping[str, Implementation] = module.IMPLEMENTATIONS
    return implementations[name]


def import_object(path: str) -> Any:
    """Import `module:attr.attr` and return the object."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"{path!r} is not of the form 'module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load_callable(path: str) -> Callable[..., Any]:
    obj = import_object(path)
    if not callable(obj):
        raise TypeError(f"{path!r} is not callable")
    return obj
