"""Naming, finding and describing the symbols a patch replaces."""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from ascend_patch.core.imports import ImportWatcher

# Where a config may point its targets without `allow_external_targets: true`: vLLM itself and
# the platform plugin that runs it on Ascend (plus any other installed vLLM platform plugin).
CORE_ROOTS = ("vllm", "vllm_ascend")
PLATFORM_PLUGIN_GROUP = "vllm.platform_plugins"


@dataclass(frozen=True)
class TargetRef:
    """`module:Owner.attr`, split so that the module can be watched before it is imported."""

    module: str
    qualname: str

    @property
    def owner_path(self) -> tuple[str, ...]:
        return tuple(self.qualname.split(".")[:-1])

    @property
    def attr(self) -> str:
        return self.qualname.split(".")[-1]

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def parse_target(text: str) -> TargetRef:
    """Parse `module:Qual.name` or a dotted path.

    In a dotted path the module is everything before the first segment that starts with an
    upper-case letter (a class), or all but the last segment when there is none (a module
    function). Other shapes need the explicit `module:qualname` form. No module is imported.
    """
    text = text.strip()
    if ":" in text:
        module, _, qualname = text.partition(":")
    else:
        parts = text.split(".")
        split = next((i for i, part in enumerate(parts) if part[:1].isupper()), len(parts) - 1)
        module, qualname = ".".join(parts[:split]), ".".join(parts[split:])
    segments = module.split(".") + qualname.split(".")
    if not module or not qualname or not all(s.isidentifier() for s in segments):
        raise ValueError(
            f"{text!r} is not a target: use 'package.module:Class.attr' or "
            "'package.module.Class.attr'"
        )
    return TargetRef(module, qualname)


@dataclass
class Resolved:
    owner: Any  # module or class whose attribute is replaced
    attr: str
    # The attribute as stored (staticmethod/classmethod wrappers kept), found along the MRO.
    raw: Any
    # Whether `owner` itself defines the attribute (else it is inherited and we shadow it).
    own: bool

    @property
    def function(self) -> Any:
        return self.raw.__func__ if isinstance(self.raw, (staticmethod, classmethod)) else self.raw


def module_loaded(ref: TargetRef) -> bool:
    return ref.module in sys.modules


def allowed_roots(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Top-level packages targets may lie in: `vllm`, `vllm_ascend`, and the packages of the
    installed vLLM platform plugins (entry points, read from package metadata: nothing is
    imported); VLLM_PLUGINS, when set, limits the plugins as vLLM does."""
    env = os.environ if environ is None else environ
    wanted = env.get("VLLM_PLUGINS")
    names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    roots = list(CORE_ROOTS)
    try:
        plugins = metadata.entry_points(group=PLATFORM_PLUGIN_GROUP)
    except Exception:  # noqa: BLE001 - broken metadata of some other package: use the core roots
        plugins = ()
    for plugin in plugins:
        if names is None or plugin.name in names:
            root = plugin.value.split(":")[0].split(".")[0].strip()
            if root.isidentifier() and root not in roots:
                roots.append(root)
    return tuple(roots)


def within_roots(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def find_module(name: str) -> tuple[bool, str]:
    """Whether module `name` exists, found without executing it or any parent package that is
    not imported yet (each level is looked up on its parent's search path); and, when it
    does not, where it was looked for."""
    parts = name.split(".")
    path: list[str] | None = None
    for index in range(len(parts)):
        prefix = ".".join(parts[: index + 1])
        loaded = sys.modules.get(prefix)
        if loaded is not None:
            locations = getattr(loaded, "__path__", None)
        else:
            spec = None
            for finder in sys.meta_path:
                if isinstance(finder, ImportWatcher) or not hasattr(finder, "find_spec"):
                    continue
                try:
                    spec = finder.find_spec(prefix, path)
                except (ImportError, ValueError, OSError):
                    spec = None
                if spec is not None:
                    break
            if spec is None:
                where = f"in {', '.join(path)}" if path else "on sys.path"
                return False, f"no module {prefix!r} {where}"
            locations = spec.submodule_search_locations
        if index + 1 < len(parts):
            if locations is None:
                return False, f"{prefix!r} is a module, not a package"
            path = list(locations)
    return True, ""


def resolve(ref: TargetRef, *, import_module: bool = True) -> Resolved:
    """Find the owner and current value of `ref`; raises LookupError with a readable reason."""
    if import_module:
        try:
            obj: Any = importlib.import_module(ref.module)
        except ImportError as exc:
            raise LookupError(f"cannot import module {ref.module!r}: {exc}") from None
    else:
        obj = sys.modules[ref.module]
    path = ref.module
    for part in ref.owner_path:
        if not hasattr(obj, part):
            raise LookupError(f"{path!r} has no attribute {part!r}")
        obj = getattr(obj, part)
        path = f"{path}.{part}"
    attr = ref.attr
    if isinstance(obj, type):
        for klass in obj.__mro__:
            if attr in vars(klass):
                return Resolved(obj, attr, vars(klass)[attr], own=klass is obj)
        raise LookupError(f"class {path} has no attribute {attr!r}")
    if not hasattr(obj, attr):
        raise LookupError(f"{path!r} has no attribute {attr!r}")
    return Resolved(obj, attr, getattr(obj, attr), own=True)


def render_signature(func: Any) -> str:
    """Parameter names and kinds, without annotations or default values.

    Names and order are what a replacement depends on; annotations change with typing
    fashions upstream and would make the check fail for no reason.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return "(?)"
    parts: list[str] = []
    saw_kw_only_marker = False
    params = list(sig.parameters.values())
    for index, param in enumerate(params):
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
            saw_kw_only_marker = True
        elif kind is param.VAR_KEYWORD:
            parts.append(f"**{param.name}")
        else:
            if kind is param.KEYWORD_ONLY and not saw_kw_only_marker:
                parts.append("*")
                saw_kw_only_marker = True
            parts.append(param.name + ("=…" if param.default is not param.empty else ""))
            is_last_positional_only = kind is param.POSITIONAL_ONLY and (
                index + 1 == len(params) or params[index + 1].kind is not param.POSITIONAL_ONLY
            )
            if is_last_positional_only:
                parts.append("/")
    return "(" + ", ".join(parts) + ")"
