"""Checking patch targets against a source tree that cannot be imported here.

vllm-ascend imports torch_npu and CANN at module level, so on a machine without an NPU the
live checks of `ascend_patch.core.live` cannot even start. This module answers the same
question ("does `module:Qual.name` exist, and with which parameters?") by reading the source
with `ast` (source_tree.py reads each module's bindings): nothing from the tree is imported
or executed.

How a target is followed from the bindings, and why it is enough for the targets a patch
names:

- names imported into a module (`from .m import X`, `from pkg.m import X as Y`,
  `import pkg.m as z`), `X = Y` aliases and `from m import *`, followed into the module that
  defines them while that module is inside the given roots.
- inherited attributes, along a C3 MRO of the bases that resolve within the roots. A base
  from outside the roots is opaque: an attribute that would have to come from it is reported,
  never guessed.

A name with several candidate definitions (one per branch) resolves only when every
candidate has the same kind and signature; otherwise the caller gets every candidate and the
condition that selects it, and may pass `branch_hints` to decide those conditions.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ascend_patch.checks.source_tree import (
    DEFAULT_BRANCH_HINTS,
    Assign,
    BodyReader,
    Def,
    Import,
    Module,
    Scope,
    Site,
    dotted_name,
    function_kind,
    normalise_condition,
    read_module,
    render_ast_signature,
)
from ascend_patch.core.targets import TargetRef

MAX_IMPORT_HOPS = 32
# Product of per-base candidates (classes defined in several branches) we are willing to
# explore for one class; far above anything real, low enough to stop a pathological tree.
MAX_MRO_VARIANTS = 16

# Bases from outside the roots that define nothing a patch could target: looking past them
# instead of stopping lets "no such attribute" be reported for the common ABC/Generic classes.
_TRANSPARENT_BASES = frozenset({
    ("builtins", "object"),
    ("abc", "ABC"),
    ("typing", "Generic"),
    ("typing", "Protocol"),
    ("typing_extensions", "Generic"),
    ("typing_extensions", "Protocol"),
})


@dataclass(frozen=True)
class StaticResolved:
    """Where a target is defined in the source tree, and the parameters it takes there."""

    file: str  # path of the .py file where the attribute is defined
    line: int  # 1-based line of its def / assignment
    # Rendered like `ascend_patch.core.targets.render_signature`; None for non-functions
    # (classes, properties, class attributes, assignments).
    signature: str | None
    # "function" | "method" | "staticmethod" | "classmethod" | "property" | "class" | "attribute"
    kind: str
    owner: str  # "module" or "module:Class" that actually defines it


# Values a name can resolve to.


@dataclass(frozen=True)
class _ModuleValue:
    module: Module


@dataclass(frozen=True)
class _ClassValue:
    module: Module
    node: ast.ClassDef
    qualname: str  # within its module

    @property
    def label(self) -> str:
        return f"{self.module.name}:{self.qualname}"


@dataclass(frozen=True)
class _External:
    """Something defined outside the roots: known by name only."""

    module: str
    name: str  # dotted path inside `module`; "" for the module itself

    @property
    def label(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module

    @property
    def source_hint(self) -> str:
        return f"add --source {self.module.split('.')[0]}=DIR"


@dataclass(frozen=True)
class _Leaf:
    resolved: StaticResolved


@dataclass(frozen=True)
class _Failure:
    reason: str


_Value = _ModuleValue | _ClassValue | _External | _Leaf | _Failure


def _conjoin(outer: tuple[str, ...], inner: tuple[str, ...]) -> tuple[str, ...]:
    """Both sets of conditions, each once (an alias and its target often share an `if`)."""
    return tuple(dict.fromkeys((*outer, *inner)))


@dataclass(frozen=True)
class _Outcome:
    value: _Value
    when: tuple[str, ...] = ()

    def under(self, when: tuple[str, ...]) -> _Outcome:
        return _Outcome(self.value, _conjoin(when, self.when)) if when else self


@dataclass(frozen=True)
class _Mro:
    """One possible method resolution order, and the conditions under which it holds."""

    entries: tuple[_Value, ...]
    when: tuple[str, ...] = ()

    def under(self, when: tuple[str, ...]) -> _Mro:
        return _Mro(self.entries, _conjoin(when, self.when)) if when else self


@dataclass(frozen=True)
class _Hops:
    """How far an import chain has gone; bounds the work and breaks cycles."""

    chain: tuple[str, ...] = ()

    def step(self, module: str, name: str) -> _Hops | _Failure:
        here = f"{module}.{name}" if name else module
        if here in self.chain:
            cycle = self.chain[self.chain.index(here):]
            return _Failure(f"import cycle: {' -> '.join((*cycle, here))}")
        if len(self.chain) >= MAX_IMPORT_HOPS:
            return _Failure(f"gave up on {here}: more than {MAX_IMPORT_HOPS} import hops")
        return _Hops((*self.chain, here))


# ---------------------------------------------------------------------------------------------


_VERSION_IS = re.compile(r"vllm_version_is\((['\"])(?P<version>[^'\"]+)\1\)")


class VersionHints(Mapping[str, bool]):
    """Branch hints (keys normalised) and, for a planned vLLM line, the value of any
    `vllm_version_is("X.Y.Z")`: the versions vllm-ascend probes change with its releases, the
    line they are compared with does not."""

    def __init__(self, explicit: Mapping[str, bool], vllm_line: str | None) -> None:
        self._explicit = dict(explicit)
        self._line = vllm_line

    def __getitem__(self, condition: str) -> bool:
        if condition in self._explicit:
            return self._explicit[condition]
        match = _VERSION_IS.fullmatch(condition) if self._line is not None else None
        if match is None:
            raise KeyError(condition)
        return match["version"] == self._line or match["version"].startswith(f"{self._line}.")

    def __iter__(self):
        return iter(self._explicit)

    def __len__(self) -> int:
        return len(self._explicit)


class SourceRoots:
    """Resolves targets against source directories, one per top-level package.

    `roots` maps a top-level package name to the directory that contains it (a directory that
    is the package itself is accepted too). `branch_hints` maps the source text of an `if`
    condition (e.g. 'vllm_version_is("0.23.0")') to the value it has on the deployment; with
    `vllm_line`, every `vllm_version_is("X.Y.Z")` that no hint names is true exactly when X.Y.Z
    is on that line (how vllm-ascend picks its code paths). Other conditions leave both
    branches as candidates.

    Decorators other than staticmethod/classmethod/property (e.g. @torch.compile,
    @functools.wraps-style wrappers) are not evaluated: the kind stays method/function and the
    signature is the def's, which is also what `render_signature` reports for wrappers that set
    `__wrapped__`. Class decorators are not evaluated either: methods a decorator generates
    (@dataclass's __init__) are not found, and one it replaces (vLLM's @support_torch_compile
    wraps __init__) keeps the def's signature, where the live check would see the wrapper's.

    Inherited attributes follow Python's C3 linearisation of the bases; a class whose bases
    differ between branches gets one linearisation per combination.
    """

    def __init__(self, roots: Mapping[str, Path], branch_hints: Mapping[str, bool] | None = None,
                 vllm_line: str | None = None):
        self._roots = {name: normalise_root(name, Path(path)) for name, path in roots.items()}
        hints = {**DEFAULT_BRANCH_HINTS, **(branch_hints or {})}
        self._hints = VersionHints(
            {normalise_condition(text): bool(value) for text, value in hints.items()}, vllm_line)
        self._modules: dict[str, Module | str] = {}
        self._mro_cache: dict[tuple[int, int], list[_Mro]] = {}

    def covers(self, module: str) -> bool:
        return module.split(".")[0] in self._roots

    def resolve(self, ref: TargetRef) -> StaticResolved:
        """Where `ref` is defined; raises LookupError with a readable reason."""
        module = self._load(ref.module)
        outcomes = [_Outcome(_ModuleValue(module))]
        for index, part in enumerate(ref.qualname.split(".")):
            outcomes = [
                found.under(outcome.when)
                for outcome in outcomes
                for found in self._attribute(outcome.value, part, _Hops())
            ]
            if index < len(ref.owner_path):
                outcomes = [_as_namespace(o, part) for o in outcomes]
        return _decide(ref, [_as_result(ref, o) for o in outcomes])

    def resolve_attribute(self, ref: TargetRef) -> StaticResolved:
        """Like `resolve`, and also finds what exists on instances only: a dataclass field
        (an annotation in the body of a class decorated @...dataclass or @config, vLLM's
        dataclass wrapper) or an attribute a method assigns (`self.name = ...`), in the
        class or along its bases. For catalog `reads` (catalog.Attribute)."""
        try:
            return self.resolve(ref)
        except LookupError as first:
            if not ref.owner_path:
                raise
            owner = TargetRef(ref.module, ".".join(ref.owner_path))
            classes = [o.value for o in self._walk(owner) if isinstance(o.value, _ClassValue)]
            for cls in classes:
                for mro in self._mros(cls, _Hops()):
                    for entry in mro.entries:
                        if isinstance(entry, _ClassValue):
                            found = _instance_attribute(entry, ref.attr)
                            if found is not None:
                                return found
            raise first

    def _walk(self, ref: TargetRef) -> list[_Outcome]:
        module = self._load(ref.module)
        outcomes = [_Outcome(_ModuleValue(module))]
        for part in ref.qualname.split("."):
            outcomes = [
                found.under(outcome.when)
                for outcome in outcomes
                for found in self._attribute(outcome.value, part, _Hops())
            ]
        return outcomes

    # Loading --------------------------------------------------------------------------------

    def _load(self, name: str) -> Module:
        """The parsed module `name`; each file is read once, and so is each failure to."""
        cached = self._modules.get(name)
        if cached is None:
            try:
                cached = self._parse(name)
            except LookupError as exc:
                cached = str(exc)
            self._modules[name] = cached
        if isinstance(cached, Module):
            return cached
        raise LookupError(cached)

    def _parse(self, name: str) -> Module:
        parts = name.split(".")
        if not all(part.isidentifier() for part in parts):
            raise LookupError(f"{name!r} is not a module name")
        root = self._roots.get(parts[0])
        if root is None:
            raise LookupError(
                f"module {name} is outside the given sources (add --source {parts[0]}=DIR)"
            )
        package_init = root.joinpath(*parts, "__init__.py")
        module_file = root.joinpath(*parts[:-1], parts[-1] + ".py")
        for path, is_package in ((package_init, True), (module_file, False)):
            if path.is_file():
                source, tree = read_module(path)
                return Module(name, path, source, tree, is_package)
        raise LookupError(f"module {name} not found in {root}")

    def _scope(self, module: Module, node: ast.Module | ast.ClassDef) -> Scope:
        scope = module.scopes.get(id(node))
        if scope is None:
            reader = BodyReader(module, self._hints, in_class=isinstance(node, ast.ClassDef))
            names = reader.body(node.body, {}, ())
            scope = Scope(names, reader.stars)
            module.scopes[id(node)] = scope
        return scope

    def _submodule(self, module: Module, name: str) -> Module | None:
        if not module.is_package:
            return None
        try:
            return self._load(f"{module.name}.{name}")
        except LookupError:
            return None

    # Attribute lookup -----------------------------------------------------------------------

    def _attribute(self, value: _Value, name: str, hops: _Hops) -> list[_Outcome]:
        """What `value.name` may be: one outcome per candidate definition."""
        if isinstance(value, _ModuleValue):
            return self._module_attribute(value.module, name, hops)
        if isinstance(value, _ClassValue):
            return self._class_attribute(value, name, hops)
        if isinstance(value, _External):
            dotted = f"{value.name}.{name}" if value.name else name
            return [_Outcome(_External(value.module, dotted))]
        if isinstance(value, _Leaf):
            leaf = value.resolved
            return [_Outcome(_Failure(
                f"cannot look up {name!r} on the {leaf.kind} at {leaf.file}:{leaf.line}"
            ))]
        return [_Outcome(value)]

    def _module_attribute(self, module: Module, name: str, hops: _Hops) -> list[_Outcome]:
        state = self._scope(module, module.tree).names.get(name)
        outcomes: list[_Outcome] = []
        if state is not None:
            for site in state.sites:
                outcomes += self._follow(site, module, None, name, hops)
            if not state.maybe_unbound:
                return outcomes
        submodule = self._submodule(module, name)
        if submodule is not None:
            fallback = [_Outcome(_ModuleValue(submodule))]
        else:
            fallback = self._star(module, name, hops)
        if fallback:
            return outcomes + fallback
        if state is not None:
            where = "; ".join(" and ".join(s.when) or "always" for s in state.sites)
            return outcomes + [_Outcome(_Failure(
                f"{module.name}.{name} may be unbound: it is bound only when {where}"
            ))]
        lazy = _module_getattr(module, name)
        if lazy is not None:
            return [_Outcome(lazy)]
        return [_Outcome(_Failure(self._missing(module, name)))]

    def _star(self, module: Module, name: str, hops: _Hops) -> list[_Outcome]:
        """What a `from m import *` (m inside the roots) provides for `name`, if any.

        Only consulted when the module binds the name nowhere itself; `__all__` is not read.
        """
        for star in self._scope(module, module.tree).stars:
            if star.module is None or not self.covers(star.module) or name.startswith("_"):
                continue
            try:
                source = self._load(star.module)
            except LookupError:
                continue
            if name in self._scope(source, source.tree).names:
                site = Import(star.module, name, star.line, star.when)
                return self._follow(site, module, None, name, hops)
        return []

    def _missing(self, module: Module, name: str) -> str:
        outside = [
            s.module for s in self._scope(module, module.tree).stars
            if s.module is not None and not self.covers(s.module)
        ]
        reason = f"module {module.name} has no attribute {name!r}"
        if outside:
            reason += f" (unless it comes from `from {outside[0]} import *`, outside the sources)"
        return reason

    def _class_attribute(self, cls: _ClassValue, name: str, hops: _Hops) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for mro in self._mros(cls, hops):
            for found in self._along_mro(cls, mro.entries, name, hops):
                found = found.under(mro.when)
                if found not in outcomes:
                    outcomes.append(found)
        return outcomes

    def _along_mro(
        self, cls: _ClassValue, mro: tuple[_Value, ...], name: str, hops: _Hops
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for entry in mro:
            if isinstance(entry, _External):
                if (entry.module, entry.name) in _TRANSPARENT_BASES:
                    continue
                return outcomes + [_Outcome(_Failure(
                    f"class {cls.label} does not define {name!r} within the given sources; it "
                    f"would be inherited from {entry.label}, outside them ({entry.source_hint})"
                ))]
            if not isinstance(entry, _ClassValue):
                return outcomes + [_Outcome(entry)]
            state = self._scope(entry.module, entry.node).names.get(name)
            if state is None:
                continue
            for site in state.sites:
                outcomes += self._follow(site, entry.module, entry, name, hops)
            if not state.maybe_unbound:
                return outcomes
        if outcomes:
            return outcomes + [_Outcome(_Failure(
                f"class {cls.label} may lack {name!r}: it is defined only under some conditions"
            ))]
        return [_Outcome(_Failure(_absent(cls, mro, name)))]

    # Following a binding to what it binds ---------------------------------------------------

    def _follow(
        self, site: Site, module: Module, cls: _ClassValue | None, name: str, hops: _Hops
    ) -> list[_Outcome]:
        if isinstance(site, Def):
            return [_Outcome(self._definition(site.node, module, cls), site.when)]
        if isinstance(site, Import):
            return [o.under(site.when) for o in self._imported(site, module, hops)]
        return [o.under(site.when) for o in self._assigned(site, module, cls, name, hops)]

    def _definition(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
        module: Module,
        cls: _ClassValue | None,
    ) -> _Value:
        if isinstance(node, ast.ClassDef):
            qualname = f"{cls.qualname}.{node.name}" if cls else node.name
            return _ClassValue(module, node, qualname)
        owner = cls.label if cls else module.name
        kind = function_kind(node) if cls else "function"
        signature = None if kind == "property" else render_ast_signature(node)
        return _Leaf(StaticResolved(str(module.file), node.lineno, signature, kind, owner))

    def _imported(self, site: Import, module: Module, hops: _Hops) -> list[_Outcome]:
        if site.module is None:
            return [_Outcome(_Failure(
                f"{module.file}:{site.line}: relative import beyond the top-level package"
            ))]
        if not self.covers(site.module):
            return [_Outcome(_External(site.module, site.attr or ""))]
        step = hops.step(site.module, site.attr or "")
        if isinstance(step, _Failure):
            return [_Outcome(step)]
        try:
            source = self._load(site.module)
        except LookupError as exc:
            return [_Outcome(_Failure(f"{module.file}:{site.line}: {exc}"))]
        if site.attr is None:
            return [_Outcome(_ModuleValue(source))]
        if source is module:
            # `from . import sub` in a package's own __init__: the name is not bound there yet,
            # so Python imports the submodule.
            submodule = self._submodule(source, site.attr)
            if submodule is not None:
                return [_Outcome(_ModuleValue(submodule))]
        return self._module_attribute(source, site.attr, step)

    def _assigned(
        self, site: Assign, module: Module, cls: _ClassValue | None, name: str, hops: _Hops
    ) -> list[_Outcome]:
        owner = cls.label if cls else module.name
        here = _Leaf(StaticResolved(str(module.file), site.node.lineno, None, "attribute", owner))
        dotted = dotted_name(site.value) if site.value is not None else None
        if dotted is None:
            return [_Outcome(here)]
        # Keyed apart from an import of the same name, which may legitimately lead here.
        step = hops.step(owner, f"{name} (line {site.node.lineno})")
        if isinstance(step, _Failure):
            return [_Outcome(step)]
        head, *path = dotted.split(".")
        if site.head is not None:  # bound earlier in the same body
            values = [o for s in site.head for o in self._follow(s, module, cls, head, step)]
        elif cls is not None:  # a class body falls back to the module's globals
            values = self._name(head, module, None, step)
        else:
            values = self._star(module, head, step) or [_Outcome(_External("builtins", head))]
        for attr in path:
            values = [
                found.under(outer.when)
                for outer in values
                for found in self._attribute(outer.value, attr, step)
            ]
        outcomes = []
        for outcome in values:
            value = outcome.value
            if isinstance(value, _External) and value.module == "builtins":
                value = here  # `X = int`: an attribute, not something to look for elsewhere
            elif cls is not None and isinstance(value, _Leaf) and value.resolved.kind == "function":
                # A module function stored in a class body is a method of that class.
                leaf = value.resolved
                value = _Leaf(StaticResolved(leaf.file, leaf.line, leaf.signature, "method",
                                             cls.label))
            outcomes.append(_Outcome(value, outcome.when))
        return outcomes

    def _expression(
        self,
        expr: ast.expr,
        module: Module,
        cls: _ClassValue | None,
        hops: _Hops,
    ) -> list[_Outcome]:
        """Values of a base-class expression (`Name`, `a.b.c`, `Base[T]`) in the body `cls`
        (None: the module) holding the class statement."""
        if isinstance(expr, ast.Subscript):  # `Generic[T]`, `Base[Meta]`: the class is the value
            return self._expression(expr.value, module, cls, hops)
        if isinstance(expr, ast.Attribute):
            return [
                found.under(outer.when)
                for outer in self._expression(expr.value, module, cls, hops)
                for found in self._attribute(outer.value, expr.attr, hops)
            ]
        if not isinstance(expr, ast.Name):
            return [_Outcome(_Failure(
                f"{module.file}:{expr.lineno}: `{ast.unparse(expr)}` cannot be resolved statically"
            ))]
        return self._name(expr.id, module, cls, hops)

    def _name(
        self, name: str, module: Module, cls: _ClassValue | None, hops: _Hops
    ) -> list[_Outcome]:
        """Python's lookup for a name in a class body: the body, then globals, then builtins.

        The bodies' final states stand in for their states when the name is evaluated; for
        base classes and module globals that is what vllm-ascend-style code needs.
        """
        scopes: list[tuple[ast.Module | ast.ClassDef, _ClassValue | None]] = [(module.tree, None)]
        if cls is not None:
            scopes.insert(0, (cls.node, cls))
        for node, owner in scopes:
            state = self._scope(module, node).names.get(name)
            if state is not None and state.sites:
                return [o for s in state.sites for o in self._follow(s, module, owner, name, hops)]
        return self._star(module, name, hops) or [_Outcome(_External("builtins", name))]

    # Inheritance ----------------------------------------------------------------------------

    def _mros(
        self, cls: _ClassValue, hops: _Hops, visiting: frozenset[tuple[int, int]] = frozenset()
    ) -> list[_Mro]:
        """Every MRO the class may have: one per combination of candidate bases."""
        key = (id(cls.module), id(cls.node))
        if key in self._mro_cache:
            return self._mro_cache[key]
        if key in visiting:
            return [_Mro((cls, _Failure(f"class {cls.label} inherits from itself")))]
        visiting = visiting | {key}
        scope_cls = self._enclosing_class(cls)
        per_base: list[list[_Outcome]] = []
        for base in cls.node.bases:
            found: list[_Outcome] = []
            for outcome in self._expression(base, cls.module, scope_cls, hops):
                if all(outcome.value != seen.value for seen in found):
                    found.append(outcome)
            per_base.append(found)
        mros: list[_Mro] = []
        for chosen in itertools.product(*per_base):
            when = tuple(c for outcome in chosen for c in outcome.when)
            bases = [outcome.value for outcome in chosen]
            mros.extend(m.under(when) for m in self._linearise(cls, bases, hops, visiting))
            if len(mros) > MAX_MRO_VARIANTS:
                reason = f"class {cls.label} has too many possible base combinations"
                mros = [_Mro((cls, _Failure(reason)))]
                break
        self._mro_cache[key] = mros
        return mros

    def _linearise(
        self,
        cls: _ClassValue,
        bases: list[_Value],
        hops: _Hops,
        visiting: frozenset[tuple[int, int]],
    ) -> list[_Mro]:
        base_mros: list[list[_Mro]] = []
        for index, base in enumerate(bases):
            if isinstance(base, _ClassValue):
                base_mros.append(self._mros(base, hops, visiting))
                continue
            if not isinstance(base, (_External, _Failure)):
                base = bases[index] = _Failure(f"a base of {cls.label} is not a class")
            base_mros.append([_Mro((base,))])
        result: list[_Mro] = []
        for chosen in itertools.islice(itertools.product(*base_mros), MAX_MRO_VARIANTS + 1):
            merged = _c3([list(m.entries) for m in chosen] + [list(bases)])
            if merged is None:
                merged = [_Failure(f"class {cls.label}: no consistent method resolution order")]
            when = tuple(dict.fromkeys(c for m in chosen for c in m.when))
            result.append(_Mro((cls, *merged), when))
        return result

    def _enclosing_class(self, cls: _ClassValue) -> _ClassValue | None:
        """The class whose body holds `cls` (its bases are evaluated there), if any."""
        outer, _, _ = cls.qualname.rpartition(".")
        if not outer:
            return None
        node: ast.Module | ast.ClassDef = cls.module.tree
        qualname: list[str] = []
        for part in outer.split("."):
            state = self._scope(cls.module, node).names.get(part)
            defs = [s.node for s in state.sites if isinstance(s, Def)] if state else []
            if not defs or not isinstance(defs[0], ast.ClassDef):
                return None
            node = defs[0]
            qualname.append(part)
        assert isinstance(node, ast.ClassDef)
        return _ClassValue(cls.module, node, ".".join(qualname))


def _c3(sequences: list[list[_Value]]) -> list[_Value] | None:
    """C3 merge of the base MROs and the base list; None when no consistent order exists."""
    result: list[_Value] = []
    sequences = [s for s in sequences if s]
    while sequences:
        for sequence in sequences:
            head = sequence[0]
            if not any(head in other[1:] for other in sequences):
                break
        else:
            return None
        result.append(head)
        sequences = [s[1:] if s[0] == head else s for s in sequences]
        sequences = [s for s in sequences if s]
    return result


def _absent(cls: _ClassValue, mro: tuple[_Value, ...], name: str) -> str:
    """Why `name` is not found on `cls`, with what a static reading cannot rule out."""
    reason = f"class {cls.label} has no attribute {name!r}"
    if name in vars(object):
        reason += f" other than object.{name}"
    decorators = [
        ast.unparse(d) for entry in mro if isinstance(entry, _ClassValue)
        for d in entry.node.decorator_list
    ]
    if decorators:
        # @dataclass writes __init__/__eq__; others (e.g. vLLM's @support_torch_compile) may
        # add or replace methods: only running them would tell.
        reason += f" (unless the class decorator @{decorators[0]} adds it)"
    return reason


def _module_getattr(module: Module, name: str) -> _Leaf | None:
    """A name a module-level `__getattr__` (PEP 562) provides: one it compares its argument
    with (`if name == "current_platform":`, vllm/platforms/__init__.py). What it returns is
    not followed."""
    for stmt in module.tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__" and stmt.args.args:
            arg = stmt.args.args[0].arg
            for node in ast.walk(stmt):
                if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                        and node.left.id == arg and any(
                            isinstance(c, ast.Constant) and c.value == name
                            for c in node.comparators)):
                    return _Leaf(StaticResolved(str(module.file), node.lineno, None,
                                                "attribute", module.name))
    return None


def _is_dataclass_decorator(expr: ast.expr) -> bool:
    name = dotted_name(expr.func if isinstance(expr, ast.Call) else expr) or ""
    last = name.rsplit(".", 1)[-1]
    return last == "dataclass" or last == "config"


def _instance_attribute(cls: _ClassValue, name: str) -> StaticResolved | None:
    """`name` as a dataclass field of `cls` or assigned to `self.name` in one of its methods."""
    file = str(cls.module.file)
    if any(_is_dataclass_decorator(d) for d in cls.node.decorator_list):
        for stmt in cls.node.body:
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == name and "ClassVar" not in ast.unparse(stmt.annotation)):
                return StaticResolved(file, stmt.lineno, None, "field", cls.label)
    for stmt in cls.node.body:
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) or not stmt.args.args:
            continue
        self_name = stmt.args.args[0].arg
        for node in ast.walk(stmt):
            if _registers(node, name):
                # `layer.register_parameter("w13_weight", ...)` in a method: the parameter
                # the class gives the layer it builds weights for.
                return StaticResolved(file, node.lineno, None, "registered parameter",
                                      cls.label)
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign))
                       else [])
            for target in (t for top in targets for t in ast.walk(top)):
                if (isinstance(target, ast.Attribute) and target.attr == name
                        and isinstance(target.value, ast.Name) and target.value.id == self_name
                        and isinstance(target.ctx, ast.Store)):
                    return StaticResolved(file, node.lineno, None, "instance attribute",
                                          cls.label)
    return _proxied(cls, name)


def _proxied(cls: _ClassValue, name: str) -> StaticResolved | None:
    """A name a class with `__getattr__` lists among the attributes it forwards: a string in
    a tuple/list/set class attribute (vllm-ascend's _ExtraForwardContextProxy.extra_attrs)."""
    body = cls.node.body
    if not any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in body):
        return None
    for stmt in body:
        value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Tuple, ast.List, ast.Set)) and any(
                isinstance(e, ast.Constant) and e.value == name for e in value.elts):
            return StaticResolved(str(cls.module.file), stmt.lineno, None,
                                  "attribute forwarded by __getattr__", cls.label)
    return None


def _registers(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("register_parameter", "register_buffer") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == name)


def normalise_root(name: str, path: Path) -> Path:
    """The directory that contains package `name`, given it or the package directory itself;
    ValueError saying why `path` is neither (the CLI checks --source with it)."""
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a top-level package name")
    if (path / name).is_dir() or (path / f"{name}.py").is_file():
        return path
    if path.name == name and path.is_dir():
        return path.parent
    raise ValueError(f"{path} is neither the package {name} nor a folder containing it")


def _as_namespace(outcome: _Outcome, part: str) -> _Outcome:
    """Only modules, classes and failures can hold the next part of a qualname."""
    value = outcome.value
    if isinstance(value, _Leaf):
        resolved = value.resolved
        reason = (f"{part} is a {resolved.kind} ({resolved.file}:{resolved.line}), "
                  f"not a class or module")
        return _Outcome(_Failure(reason), outcome.when)
    return outcome


def _as_result(ref: TargetRef, outcome: _Outcome) -> _Outcome:
    """Turn a final value into a StaticResolved leaf or a failure explaining why it is not."""
    value = outcome.value
    if isinstance(value, _ClassValue):
        outer, _, _ = value.qualname.rpartition(".")
        owner = f"{value.module.name}:{outer}" if outer else value.module.name
        resolved = StaticResolved(str(value.module.file), value.node.lineno, None, "class", owner)
        value = _Leaf(resolved)
    elif isinstance(value, _ModuleValue):
        value = _Failure(f"{ref} is the module {value.module.name}, not an attribute")
    elif isinstance(value, _External):
        value = _Failure(
            f"{ref} resolves to {value.label}, outside the given sources ({value.source_hint})"
        )
    return _Outcome(value, outcome.when)


def _decide(ref: TargetRef, outcomes: list[_Outcome]) -> StaticResolved:
    """One answer when all candidates agree; otherwise every candidate, with its conditions."""
    unique: list[_Outcome] = []
    for outcome in outcomes:
        if all(outcome.value != seen.value for seen in unique):
            unique.append(outcome)
    leaves = [o.value.resolved for o in unique if isinstance(o.value, _Leaf)]
    failures = [o.value for o in unique if isinstance(o.value, _Failure)]
    if not failures and len({(r.kind, r.signature) for r in leaves}) == 1:
        return leaves[0]
    if not unique:
        raise LookupError(f"{ref}: nothing found")
    if len(unique) == 1 and failures:
        raise LookupError(failures[0].reason)
    if leaves:
        header = (f"{ref} is ambiguous: its definition depends on conditions this check "
                  "cannot decide (give a branch hint for them):")
    else:
        header = f"{ref} cannot be resolved on any path:"
    lines = [header]
    for outcome in unique:
        condition = " and ".join(outcome.when) or "otherwise"
        lines.append(f"  when {condition}: {_describe(outcome.value)}")
    raise LookupError("\n".join(lines))


def _describe(value: _Value) -> str:
    if isinstance(value, _Leaf):
        r = value.resolved
        return f"{r.file}:{r.line}: {r.kind}" + (f" {r.signature}" if r.signature else "")
    assert isinstance(value, _Failure)
    return value.reason
