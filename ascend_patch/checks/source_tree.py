"""Reading a module of a source tree without importing it: what each name of a module or
class body may be bound to when the body has run, found with `ast`.

What is understood: classes, functions and assignments at module level and in class bodies,
including those under `if`/`else`, `try`/`except` and `with` (vllm-ascend picks definitions
with `if vllm_version_is("0.23.0"): ... else: ...`). Bodies of `for`/`while`/`match` and of
functions are not read: code that binds public names there is rare and not statically
knowable anyway. A branch hint decides an `if` whose condition it names; an undecided `if`
leaves every binding of both branches, each with the conditions that lead to it, so that an
ambiguity can say which hint would settle it.

static_targets.py follows these bindings across modules and classes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

MAX_FILE_BYTES = 2 << 20

# Hints every resolver starts with: `if TYPE_CHECKING:` blocks never run, and treating them as
# a possible branch would make every typing-only import look like a second definition.
DEFAULT_BRANCH_HINTS: Mapping[str, bool] = {"TYPE_CHECKING": False, "typing.TYPE_CHECKING": False}

_STATIC_DECORATORS = frozenset({"staticmethod", "builtins.staticmethod"})
_CLASS_DECORATORS = frozenset({"classmethod", "builtins.classmethod"})
_PROPERTY_DECORATORS = frozenset({
    "property",
    "builtins.property",
    "cached_property",
    "functools.cached_property",
    "abstractproperty",
    "abc.abstractproperty",
})
_ACCESSOR_DECORATORS = frozenset({"setter", "getter", "deleter"})


def render_ast_signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The `render_signature` text of the function `node` defines, without creating it.

    Parameters are rendered as written, so a method keeps `self`/`cls` exactly as
    `render_signature(raw.__func__)` would, and a staticmethod has none.
    """
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    parts: list[str] = []
    for index, arg in enumerate(positional):
        parts.append(arg.arg + ("=…" if index >= first_default else ""))
        if index + 1 == len(args.posonlyargs):
            parts.append("/")
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(arg.arg + ("=…" if default is not None else ""))
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return "(" + ", ".join(parts) + ")"


# ---------------------------------------------------------------------------------------------
# What a statement binds a name to (a "site"), and what a name may be bound to at the end of a
# body (a "name state"). `when` is the chain of undecided conditions leading to the site; it
# only feeds error messages, so that an ambiguity says which hint would settle it.


@dataclass(frozen=True)
class Def:
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    when: tuple[str, ...]


@dataclass(frozen=True)
class Assign:
    node: ast.Assign | ast.AnnAssign
    value: ast.expr | None  # set only for a plain `name = expr`, the one shape we follow
    when: tuple[str, ...]
    # What the head name of `value` was bound to in this same body when the assignment ran
    # (None: not bound here yet, so it comes from globals). Needed for `f = f` in a class body,
    # where the final state of the body only holds the assignment itself.
    head: tuple[Site, ...] | None = None


@dataclass(frozen=True)
class Import:
    module: str | None  # absolute; None when a relative import climbs above the top package
    attr: str | None  # None: the name is bound to the module itself
    line: int
    when: tuple[str, ...]


Site = Def | Assign | Import


@dataclass(frozen=True)
class NameState:
    sites: tuple[Site, ...]
    maybe_unbound: bool


State = dict[str, NameState]


@dataclass
class Scope:
    names: State
    stars: list[Import]


@dataclass(eq=False)
class Module:
    """A parsed file; compared by identity, since each module is loaded once per resolver."""

    name: str
    file: Path
    source: str
    tree: ast.Module
    is_package: bool
    scopes: dict[int, Scope] = field(default_factory=dict)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------
# Reading a body into name states.


def normalise_condition(text: str) -> str:
    """One spelling per condition, so that hints match whatever quotes or spaces were used."""
    try:
        return ast.unparse(ast.parse(text.strip(), mode="eval").body)
    except SyntaxError as exc:
        raise ValueError(f"branch hint {text!r} is not a Python expression: {exc.msg}") from None


def dotted_name(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = dotted_name(expr.value)
        return None if head is None else f"{head}.{expr.attr}"
    return None


def decorator_name(expr: ast.expr) -> str | None:
    return dotted_name(expr.func if isinstance(expr, ast.Call) else expr)


def _target_names(target: ast.expr) -> Iterable[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def is_accessor(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`@name.setter` and friends: they extend the property `name`, not replace it."""
    return any(
        isinstance(d, ast.Attribute)
        and d.attr in _ACCESSOR_DECORATORS
        and isinstance(d.value, ast.Name)
        and d.value.id == node.name
        for d in node.decorator_list
    )


def _merge(states: list[State]) -> State:
    """Every binding any of the paths may leave; a name missing on some path may be unbound."""
    merged: State = {}
    for name in dict.fromkeys(name for state in states for name in state):
        sites: list[Site] = []
        maybe_unbound = False
        for state in states:
            entry = state.get(name)
            if entry is None:
                maybe_unbound = True
                continue
            sites.extend(s for s in entry.sites if s not in sites)
            maybe_unbound = maybe_unbound or entry.maybe_unbound
        merged[name] = NameState(tuple(sites), maybe_unbound)
    return merged


def _site_key(site: Site) -> object:
    """Identity of a binding statement, whatever conditions have been attached to it since."""
    if isinstance(site, Import):
        return (site.module, site.attr, site.line)
    return id(site.node)


def _qualify(branch: State, other: State, before: State, condition: str) -> State:
    """Mark bindings made before an `if` that reach the end of one branch with its condition.

    A definition made before an `if` and replaced in the other branch only survives when this
    branch runs; saying so lets an ambiguity name the hint that settles it.
    """
    qualified = dict(branch)
    for name, entry in branch.items():
        if other.get(name) == entry or name not in before:
            continue  # untouched on both paths, or new in this branch (already conditional)
        earlier = {_site_key(site) for site in before[name].sites}
        qualified[name] = NameState(
            tuple(
                replace(site, when=(*site.when, condition)) if _site_key(site) in earlier else site
                for site in entry.sites
            ),
            entry.maybe_unbound,
        )
    return qualified


class BodyReader:
    """Walks a module or class body in execution order, as far as it can be known."""

    def __init__(self, module: Module, hints: Mapping[str, bool], in_class: bool):
        self._module = module
        self._hints = hints
        self._in_class = in_class
        self.stars: list[Import] = []

    def body(self, statements: list[ast.stmt], state: State, when: tuple[str, ...]) -> State:
        for statement in statements:
            state = self._statement(statement, state, when)
        return state

    def _statement(self, node: ast.stmt, state: State, when: tuple[str, ...]) -> State:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if self._in_class and is_accessor(node) and node.name in state:
                return state
            return self._bind(state, [node.name], Def(node, when))
        if isinstance(node, ast.ClassDef):
            return self._bind(state, [node.name], Def(node, when))
        if isinstance(node, ast.Assign):
            names = [n for target in node.targets for n in _target_names(target)]
            plain = all(isinstance(t, ast.Name) for t in node.targets)
            return self._bind(state, names, self._assign(node, plain, state, when))
        if isinstance(node, ast.AnnAssign):
            # A bare annotation (`x: int`) creates no attribute at run time.
            if node.value is None or not isinstance(node.target, ast.Name):
                return state
            return self._bind(state, [node.target.id], self._assign(node, True, state, when))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return self._imports(node, state, when)
        if isinstance(node, ast.Delete):
            gone = {n for target in node.targets for n in _target_names(target)}
            return {k: v for k, v in state.items() if k not in gone}
        if isinstance(node, ast.If):
            return self._if(node, state, when)
        if isinstance(node, (ast.Try, ast.TryStar)):
            return self._try(node, state, when)
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return self.body(node.body, state, when)
        return state

    @staticmethod
    def _assign(
        node: ast.Assign | ast.AnnAssign, plain: bool, state: State, when: tuple[str, ...]
    ) -> Assign:
        value = node.value if plain else None
        dotted = dotted_name(value) if value is not None else None
        if dotted is None:
            return Assign(node, None, when)
        entry = state.get(dotted.split(".")[0])
        return Assign(node, value, when, entry.sites if entry else None)

    @staticmethod
    def _bind(state: State, names: list[str], site: Site) -> State:
        state = dict(state)
        for name in names:
            state[name] = NameState((site,), False)
        return state

    def _imports(
        self, node: ast.Import | ast.ImportFrom, state: State, when: tuple[str, ...]
    ) -> State:
        for alias in node.names:
            if isinstance(node, ast.Import):
                # `import a.b` binds `a`; `import a.b as z` binds `z` to `a.b`.
                bound = alias.name if alias.asname else alias.name.split(".")[0]
                site = Import(bound, None, node.lineno, when)
                state = self._bind(state, [alias.asname or bound], site)
                continue
            site = Import(self._absolute(node), alias.name, node.lineno, when)
            if alias.name == "*":
                self.stars.append(site)
            else:
                state = self._bind(state, [alias.asname or alias.name], site)
        return state

    def _absolute(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        package = self._module.package.split(".")
        if node.level - 1 >= len(package):
            return None
        base = package[: len(package) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def _if(self, node: ast.If, state: State, when: tuple[str, ...]) -> State:
        text = ast.get_source_segment(self._module.source, node.test) or ast.unparse(node.test)
        decided = self._hinted(node.test)
        if decided is not None:
            return self.body(node.body if decided else node.orelse, state, when)
        taken = self.body(node.body, state, (*when, text))
        skipped = self.body(node.orelse, state, (*when, f"not {text}"))
        return _merge([
            _qualify(taken, skipped, state, text),
            _qualify(skipped, taken, state, f"not {text}"),
        ])

    def _hinted(self, test: ast.expr) -> bool | None:
        """The value a branch hint gives `test` (also through `not`); None when unknown."""
        key = ast.unparse(test)
        if key in self._hints:
            return self._hints[key]
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self._hinted(test.operand)
            return None if inner is None else not inner
        return None

    def _try(self, node: ast.Try | ast.TryStar, state: State, when: tuple[str, ...]) -> State:
        # Each handler is a possible path, entered (approximately) with the state before `try`.
        label = f"try at line {node.lineno}"
        paths = [self.body([*node.body, *node.orelse], state, (*when, label))]
        for handler in node.handlers:
            caught = ast.unparse(handler.type) if handler.type is not None else "anything"
            label = f"except {caught} at line {handler.lineno}"
            paths.append(self.body(handler.body, state, (*when, label)))
        return self.body(node.finalbody, _merge(paths), when)


def function_kind(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    names = {decorator_name(d) for d in node.decorator_list}
    if names & _STATIC_DECORATORS:
        return "staticmethod"
    if names & _CLASS_DECORATORS:
        return "classmethod"
    if names & _PROPERTY_DECORATORS or is_accessor(node):
        return "property"
    return "method"


def read_module(path: Path) -> tuple[str, ast.Module]:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LookupError(f"refusing to parse {path}: {size} bytes is over the 2 MiB limit")
    data = path.read_bytes()
    try:
        tree = ast.parse(data, filename=str(path))
    except SyntaxError as exc:
        raise LookupError(f"cannot parse {path}: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise LookupError(f"cannot parse {path}: {type(exc).__name__}") from None
    return data.decode("utf-8", errors="replace"), tree
