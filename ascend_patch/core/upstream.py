"""`ctx.upstream`: the upstream symbols an implementation declared it relies on, by key.

An implementation imports neither vLLM nor vllm-ascend itself (tests/core/test_upstream.py
audits it): it reads `ctx.upstream.<key>`, which resolves the
catalog Interface of that key for the patch's vLLM line and platform with the same
`targets.resolve` that `validate` and the loader check it with. So a symbol used is a symbol
declared, and a declared one that moved or changed signature fails here by name, instead of
as an ImportError or a wrong call somewhere inside a forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ascend_patch.core.catalog import Interface
from ascend_patch.core.targets import parse_target, render_signature, resolve

# Internal attributes carry this prefix so that no declared key can shadow them.
_P = "_upstream__"


class Upstream:
    """Attribute access by interface key; nothing is imported before the first access.

    The first read of a key imports its module, finds it, checks its signature and keeps the
    object as a plain instance attribute (per context: a reverted patch drops it with its
    context). Later reads never reach `__getattr__`, which is what lets code that
    torch.compile traces read `upstream.<key>`; a first read there cannot be traced (it
    imports), so such code reads each key once beforehand, eagerly.
    """

    def __init__(
        self,
        declared: Mapping[str, Interface],
        *,
        what: str,
        ambiguous: Mapping[str, tuple[str, ...]] | None = None,
        error: Callable[[str], Exception] = LookupError,
        import_modules: bool = True,
    ) -> None:
        """`what` names the declarer in errors ("moe.capacity for vLLM 0.32 on vllm");
        `error` makes the exception raised when a declared key does not resolve here;
        without `import_modules` a module not imported yet does not resolve (for code that
        must not be the one importing vLLM)."""
        self.__dict__.update({
            f"{_P}what": what,
            f"{_P}declared": dict(declared),
            f"{_P}ambiguous": dict(ambiguous or {}),
            f"{_P}error": error,
            f"{_P}import_modules": import_modules,
        })

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key.startswith(_P):
            raise AttributeError(key)  # copy/pickle probes
        value = _resolve(self, key)
        self.__dict__[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        """Whether the catalog declares `key` for this patch's line and platform: how an
        adapter writes a line-specific read (`if "activation_format" in ctx.upstream:`),
        which the attribute audit (checks/attribute_audit.py) attributes to those lines.
        Nothing is imported or resolved."""
        return key in self.__dict__[f"{_P}declared"]

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"upstream.{key} is read-only: declare the interface instead")

    def __dir__(self) -> list[str]:
        return sorted(self.__dict__[f"{_P}declared"])

    def __repr__(self) -> str:
        return f"<upstream of {self.__dict__[f'{_P}what']}: {', '.join(dir(self))}>"


def _resolve(upstream: Upstream, key: str) -> Any:
    state = upstream.__dict__
    what = state[f"{_P}what"]
    interface = state[f"{_P}declared"].get(key)
    if interface is None:
        ambiguous = state[f"{_P}ambiguous"].get(key)
        if ambiguous:
            raise AttributeError(
                f"{what}: upstream key {key!r} is ambiguous ({', '.join(ambiguous)}); "
                "give the Interface used a key=")
        raise AttributeError(
            f"{what} declares no upstream interface {key!r} (declared: "
            f"{', '.join(dir(upstream)) or 'none'}); add it to the site set's relies_on")
    error = state[f"{_P}error"]
    try:
        resolved = resolve(parse_target(interface.target),
                           import_module=state[f"{_P}import_modules"])
    except (LookupError, KeyError) as exc:  # KeyError: not imported, import_modules off
        raise error(f"upstream {key!r} ({interface.target}, {interface.why}): {exc}") from None
    value = getattr(resolved.owner, resolved.attr)
    if isinstance(value, ModuleType):
        raise error(f"upstream {key!r} ({interface.target}) is a module: declare the "
                    "attributes used from it instead")
    if interface.signature is not None:
        live = render_signature(resolved.function)
        if live != interface.signature:
            raise error(f"upstream {key!r} ({interface.target}, {interface.why}) has "
                        f"signature {live}, not the declared {interface.signature}")
    return value


def for_implementation(impl: Any, line: str | None, platform: str, *,
                       error: Callable[[str], Exception] = LookupError) -> Upstream:
    """The namespace of `impl`'s (a catalog.Implementation) site set for this line and
    platform: empty where it declares none."""
    site_set = impl.site_set(line, platform)
    what = f"{impl.name} for vLLM {line} on {platform}"
    if site_set is None:
        return Upstream({}, what=what, error=error)
    return Upstream(site_set.upstream_keys(), what=what, ambiguous=site_set.ambiguous_keys(),
                    error=error)
