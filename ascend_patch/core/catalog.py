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

    `optional`: the patch counts as applied without this site, which is installed when its
    module is imported. For modules only some models import (a quantization method's): a
    process that never imports them has nothing there to patch, and would otherwise report
    the whole patch pending forever. Checked by `validate` like any other site.
    """

    target: str
    signature: str | None
    factory: str
    role: str = "main"
    optional: bool = False


@dataclass(frozen=True)
class Interface:
    """An upstream symbol an implementation relies on without patching it (called, subclassed
    or read). Declared so that `validate` and the loader see upstream drift before users do.

    The implementation's code reaches it as `ctx.upstream.<key>` (core/upstream.py), never by
    importing it, so that what runs is what was checked. `key` defaults to the target's last
    component; give one where that is ambiguous within a site set (two `apply` methods).
    A module is never a target here: `ctx.upstream.module.anything` would reach attributes
    nobody declared, so each attribute used is declared instead.
    """

    target: str
    signature: str | None
    why: str
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", derived_key(self.target))
        if not self.key.isidentifier():
            raise ValueError(f"interface key {self.key!r} of {self.target} is not an identifier")

    @property
    def keyed(self) -> bool:
        """Whether the key was given rather than derived from the target."""
        return self.key != derived_key(self.target)


@dataclass(frozen=True)
class Attribute:
    """An attribute of an upstream class that an adapter reads on the objects vLLM hands it
    (`layer.expert_map`, `moe.moe_parallel_config.ep_size`), or overrides in a subclass.

    Not reachable through `ctx.upstream` (it is read on instances) and not checked by the
    loader (an instance attribute set in `__init__` or a dataclass field without a default is
    not on the class at run time): `validate --source` finds it in the real source (class
    attribute, method, property, dataclass field, or `self.<name> = ...` in a method of the
    class or a base), and the attribute audit (checks/attribute_audit.py) requires every
    upstream attribute an adapter uses to be declared here or as a Site/Interface.
    """

    target: str  # "module:Class.attr"
    why: str = ""

    @property
    def name(self) -> str:
        return derived_key(self.target)


def derived_key(target: str) -> str:
    """The key an Interface gets by default: its target's last component."""
    return target.replace(":", ".").rsplit(".", 1)[-1].strip()


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
    reads: tuple[Attribute, ...] = ()
    provided: str = ""
    unsupported: str = ""
    # For implementations that take model layers over: the quantization schemes (the
    # platform's names, e.g. vllm-ascend's W8A8_DYNAMIC) whose layers the sites take over too;
    # () unquantized layers only; None: layers' quantization does not matter (what `plan`
    # says about a quantized model).
    quantized_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        kinds = [bool(self.sites), bool(self.provided), bool(self.unsupported)]
        if sum(kinds) != 1:
            raise ValueError("a SiteSet has sites, or `provided`, or `unsupported`: exactly one")
        # A derived key may repeat (two `apply` methods declared only to be checked): it is
        # then ambiguous and unusable. A given key exists to be used, so it must be unique.
        for key, interfaces in self._interfaces_by_key().items():
            if len(interfaces) > 1 and any(i.keyed for i in interfaces):
                targets = ", ".join(i.target for i in interfaces)
                raise ValueError(f"interface key {key!r} names several targets: {targets}")

    def _interfaces_by_key(self) -> dict[str, list[Interface]]:
        out: dict[str, list[Interface]] = {}
        for interface in self.relies_on:
            out.setdefault(interface.key, []).append(interface)
        return out

    def upstream_keys(self) -> dict[str, Interface]:
        """The interfaces `ctx.upstream` resolves, by key (ambiguous derived keys left out)."""
        return {key: found[0] for key, found in self._interfaces_by_key().items()
                if len(found) == 1}

    def ambiguous_keys(self) -> dict[str, tuple[str, ...]]:
        """Derived keys several interfaces share, with their targets."""
        return {key: tuple(i.target for i in found)
                for key, found in self._interfaces_by_key().items() if len(found) > 1}


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


def ascend_only_lines() -> SiteSet:
    """The vLLM-platform site set of the lines declared for a vllm-ascend release only (no CPU
    or CUDA stack: vLLM 0.13, 0.18): their internals were read for vllm-ascend, not for
    vLLM's own platforms."""
    lines = tuple(name for name in LINE_NAMES if name not in lines_on("vllm"))
    return SiteSet(
        lines=lines,
        platform="vllm",
        unsupported=f"vLLM {', '.join(lines)} is supported under its vllm-ascend release only "
        "(its vLLM-platform internals were not read)",
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
