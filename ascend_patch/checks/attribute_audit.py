"""The attribute audit: every upstream attribute an adapter reads, calls or overrides is declared.

`ctx.upstream.<key>` (core/upstream.py) covers the symbols an adapter takes from vLLM; what
it then reads on the objects vLLM hands it (`moe.moe_parallel_config.use_batched_activation_format`,
`layer.expert_map`, a method overridden in a subclass of an upstream class) is invisible to
`validate` unless the catalog declares it. vLLM 0.34 removed such an attribute and every MoE
layer would have raised AttributeError at load while `validate` passed: this audit is what
makes that a test failure.

Read with ast; nothing of the adapters is imported (torch, pydantic and the standard library
are, to list their attribute names: `torch_and_stdlib_names`):

* The modules audited for a site set are its factories' modules and every module of
  `ascend_patch.impls` they import (at module level or inside functions), transitively.
* Names collected from them: each `x.name` read or written (`self.name = ...` is a
  definition of ours instead; Attribute nodes; `<...>.upstream.<key>` is a
  catalog key, already audited by tests/core/test_upstream.py, and left out), each
  `getattr/hasattr/setattr(x, "name")` with a constant name, and each name a class defines
  in its body when one of its bases is read from `upstream` (an override of an upstream
  method or attribute: upstream renaming it would silently leave ours dead).
* Left out where the receiver tells: every attribute of a chain rooted at a name the module
  binds by importing something that is not vLLM or vllm-ascend (`torch.ops.x.y`,
  `dist.group.WORLD`, `F.silu`), and getattr on such a name; names spelled `ascend_patch*`
  (our own additions, also on subclasses of upstream classes); the modules in
  TENSOR_ONLY_MODULES (torch_npu compute, handed tensors only); NOT_UPSTREAM (three torch
  names reached through locals, each with where).
* Names subtracted by spelling (`own_names`, `torch_and_stdlib_names`): names ascend_patch
  itself defines (functions, classes, class attributes, module globals, `self.x = ...` /
  `obj.x = ...` assignments, annotated fields), except the overrides above; and the
  attribute names of torch, torch.Tensor, torch.nn.Module, pydantic.BaseModel, Python's
  built-in types and the standard library modules the audited code imports.
* Limits, by construction: a name is judged by its spelling, not by the object it is read on
  (no type inference), so an upstream attribute spelled like one of ours or like a
  torch/stdlib attribute (`parallel.ep_size`: we have an `ep_size` too; `layer.to`) is not
  required, though the catalog declares the ones we know of; an attribute reached through
  a name computed at run time (`getattr(layer, name)`) is not seen; a module counts whole
  for every site set that reaches it, whichever of its functions that set runs.
* What must hold: every remaining name is declared for the site set (line x platform) whose
  modules use it: the last segment of one of its Site or Interface targets, an Interface
  key, or one of its `reads` (catalog.Attribute).
* Line-specific reads are written `if "<key>" in <...>.upstream:` (Upstream.__contains__:
  the key is declared for this patch's line and platform): the body counts only for site
  sets declaring the key, the `else` branch only for the others. Other conditions are not
  interpreted: both branches count.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ascend_patch.core.catalog import Implementation, SiteSet

PACKAGE = "ascend_patch"
IMPLS = f"{PACKAGE}.impls"
UPSTREAM_ROOTS = ("vllm", "vllm_ascend")
# Non-upstream attributes read on objects the rules below cannot tell apart, each with what
# it is read on. Keep it short: every entry is a name the audit no longer checks anywhere.
NOT_UPSTREAM = {
    "register_fake": "torch.library.CustomOpDef (custom_ops.py)",
    "current_device": "torch.npu, reached as getattr(torch, 'npu') (consistency.py)",
    "is_current_stream_capturing": "torch.npu, reached as getattr(torch, 'npu')",
}
# Modules of impls that are catalog data, never adapter code.
_DATA_MODULES = ("spec", "options")
# Modules that compute on tensors with torch or a torch_npu module handed in as `ops` (the
# torch_npu importers tests/core/test_upstream.py allows): no vLLM object reaches them.
TENSOR_ONLY_MODULES = ("ascend_patch.impls.moe.experts.npu_backend", "ascend_patch.impls.ops.kernels")
# Conditions a use sits under: (key, True) inside `if "key" in upstream`, False in its else.
Condition = tuple[str, bool]


@dataclass(frozen=True)
class Use:
    module: str
    line: int
    name: str
    how: str  # "read" | "write" | "getattr" | "hasattr" | "setattr" | "override"
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Finding:
    implementation: str
    lines: tuple[str, ...]
    platform: str
    use: Use

    def __str__(self) -> str:
        u = self.use
        return (f"{u.module}:{u.line}: {u.how} of upstream attribute {u.name!r} is not "
                f"declared by {self.implementation} for vLLM {', '.join(self.lines)} on "
                f"{self.platform} (declare it in the site set's relies_on or reads)")


@dataclass
class ModuleScan:
    name: str
    uses: list[Use] = field(default_factory=list)
    defines: set[str] = field(default_factory=set)
    imports: set[str] = field(default_factory=set)
    stdlib: set[str] = field(default_factory=set)


def module_path(name: str, root: Path) -> Path:
    """The source file of a module of this package, under `root` (the repository)."""
    base = root.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_upstream_ns(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "upstream") or (
        isinstance(node, ast.Attribute) and node.attr == "upstream")


def _upstream_key_test(test: ast.expr) -> str | None:
    """`"key" in <...>.upstream` -> "key"."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.In)
            and isinstance(test.left, ast.Constant) and isinstance(test.left.value, str)
            and _is_upstream_ns(test.comparators[0])):
        return test.left.value
    return None


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _foreign_import_names(tree: ast.Module) -> set[str]:
    """Names bound anywhere in the module by importing something that is not upstream
    (torch, torch_npu, the standard library, ascend_patch): attributes read through them
    are not upstream attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in UPSTREAM_ROOTS:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] not in UPSTREAM_ROOTS:
                names.update(alias.asname or alias.name for alias in node.names)
    return names


class _Scanner(ast.NodeVisitor):
    def __init__(self, scan: ModuleScan, foreign: set[str]) -> None:
        self.scan = scan
        self.foreign = foreign
        self.when: tuple[Condition, ...] = ()

    def _use(self, node: ast.AST, name: str, how: str) -> None:
        self.scan.uses.append(Use(self.scan.name, getattr(node, "lineno", 0), name, how,
                                  self.when))

    def visit_If(self, node: ast.If) -> None:
        key = _upstream_key_test(node.test)
        if key is None:
            self.generic_visit(node)
            return
        outer = self.when
        self.when = outer + ((key, True),)
        for stmt in node.body:
            self.visit(stmt)
        self.when = outer + ((key, False),)
        for stmt in node.orelse:
            self.visit(stmt)
        self.when = outer

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _root_name(node) in self.foreign:  # torch.ops.x.y, dist.group.WORLD, F.silu
            return
        # <...>.upstream.<key>: a catalog key; `ctx.upstream` itself: the namespace.
        if not _is_upstream_ns(node.value) and node.attr != "upstream":
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if isinstance(node.ctx, ast.Load):
                self._use(node, node.attr, "read")
            elif on_self:
                self.scan.defines.add(node.attr)  # `self.x = ...`: an attribute we define
            else:
                self._use(node, node.attr, "write")  # `method.moe_kernel = ...`
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _root_name(node.args[0]) not in self.foreign):
            self._use(node, node.args[1].value, func.id)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        upstream_base = any(
            isinstance(b, ast.Attribute) and _is_upstream_ns(b.value) for b in node.bases)
        for stmt in node.body:
            for name in _bound_names(stmt):
                # Our own additions to an upstream subclass are spelled ascend_patch*.
                if upstream_base and not name.startswith(("__", PACKAGE)):
                    self._use(stmt, name, "override")
                elif not upstream_base:
                    self.scan.defines.add(name)
        self.scan.defines.add(node.name)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scan.defines.add(node.name)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            self.scan.defines.update(_bound_names(stmt))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._imported(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        self._imported(node.module)
        if node.module.startswith(PACKAGE + "."):
            for alias in node.names:  # `from ascend_patch.impls.moe import custom_ops`
                self._imported(f"{node.module}.{alias.name}")

    def _imported(self, module: str) -> None:
        if module == IMPLS or module.startswith(IMPLS + "."):
            self.scan.imports.add(module)
        elif module.split(".")[0] in sys.stdlib_module_names:
            self.scan.stdlib.add(module)


def _bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def scan_source(name: str, source: str) -> ModuleScan:
    scan = ModuleScan(name)
    tree = ast.parse(source, filename=name)
    _Scanner(scan, _foreign_import_names(tree)).visit(tree)
    return scan


def adapter_modules(factories: Iterable[str], root: Path,
                    sources: Mapping[str, str] | None = None) -> dict[str, ModuleScan]:
    """The factories' modules and the impls modules they import, transitively, scanned.
    `sources` overrides a module's text (the tests' pre-fix adapter)."""
    sources = sources or {}
    todo = [f.partition(":")[0] for f in factories]
    scans: dict[str, ModuleScan] = {}
    while todo:
        name = todo.pop()
        if (name in scans or name.rsplit(".", 1)[-1] in _DATA_MODULES
                or name in TENSOR_ONLY_MODULES):
            continue
        path = module_path(name, root)
        if name not in sources and not path.is_file():
            continue  # `from pkg import function`: the attribute of a module, not a module
        text = sources.get(name) or path.read_text()
        scans[name] = scan_source(name, text)
        todo.extend(scans[name].imports)
    return scans


def own_names(root: Path) -> set[str]:
    """Every name ascend_patch defines (overrides of upstream classes excluded)."""
    names: set[str] = set()
    for path in (root / PACKAGE).rglob("*.py"):
        names |= scan_source(str(path), path.read_text()).defines
    return names


def torch_and_stdlib_names(stdlib_modules: Iterable[str]) -> set[str]:
    """Attribute names of torch, Tensor, nn.Module, built-in types and the given standard
    library modules (and what they define), which no catalog declares. Imports torch."""
    import pydantic
    import torch

    objects: list[object] = [torch, torch.Tensor, torch.nn.Module, pydantic.BaseModel]
    objects += [getattr(builtins, n) for n in dir(builtins) if isinstance(getattr(builtins, n), type)]
    for module in stdlib_modules:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        mod = importlib.import_module(module)
        objects.append(mod)
        objects += [v for v in vars(mod).values() if isinstance(v, type)]
    names: set[str] = set()
    for obj in objects:
        names.update(dir(obj))
    return names


def declared_names(site_set: SiteSet) -> set[str]:
    names = {site.target.replace(":", ".").rsplit(".", 1)[-1] for site in site_set.sites}
    for interface in site_set.relies_on:
        names |= {interface.key, interface.target.replace(":", ".").rsplit(".", 1)[-1]}
    names |= {attr.name for attr in site_set.reads}
    return names


def _applies(use: Use, keys: set[str]) -> bool:
    return all((key in keys) == positive for key, positive in use.when)


def audit(implementations: Iterable[Implementation], root: Path, *,
          sources: Mapping[str, str] | None = None,
          ignore: set[str] | None = None) -> list[Finding]:
    """Every undeclared upstream attribute use, per site set that patches something.
    `ignore`: names known not to be upstream's (default: own_names + torch_and_stdlib_names)."""
    findings: list[Finding] = []
    own = own_names(root) if ignore is None else set()
    for impl in implementations:
        for site_set in impl.site_sets:
            if not site_set.sites:
                continue
            scans = adapter_modules([s.factory for s in site_set.sites], root, sources)
            skip = ignore if ignore is not None else own | torch_and_stdlib_names(
                {m for s in scans.values() for m in s.stdlib})
            declared = declared_names(site_set)
            keys = set(site_set.upstream_keys())
            seen: set[tuple[str, str]] = set()
            for scan in scans.values():
                for use in scan.uses:
                    if use.how != "override" and (use.name in skip or use.name in NOT_UPSTREAM
                                                   or use.name.startswith(PACKAGE)):
                        continue
                    if use.name in declared or not _applies(use, keys):
                        continue
                    if (use.module, use.name) in seen:
                        continue
                    seen.add((use.module, use.name))
                    findings.append(Finding(impl.name, site_set.lines, site_set.platform, use))
    return findings
