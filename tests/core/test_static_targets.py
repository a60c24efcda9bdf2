"""Static target resolution: small fixture trees for every rule, then the real vllm-ascend source.

The fixture trees are written to tmp_path and never imported (except the one module whose
functions `render_ast_signature` is compared against `render_signature` on); the real-tree
tests read vllm-ascend 0.23.0.post1 as unpacked by scripts/fetch_vllm_ascend.sh.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from ascend_patch.checks import static_targets
from ascend_patch.checks.source_tree import render_ast_signature
from ascend_patch.checks.static_targets import MAX_IMPORT_HOPS, SourceRoots, StaticResolved
from ascend_patch.core.targets import TargetRef, parse_target, render_signature, resolve

VLLM_ASCEND_RELEASE = "vllm_ascend-0.23.0.post1"
V023 = 'vllm_version_is("0.23.0")'


def vllm_ascend_source() -> Path | None:
    """The unpacked vllm-ascend 0.23.0.post1 source, if this machine has it."""
    explicit = os.environ.get("TEST_VLLM_ASCEND_SRC")
    if explicit:
        candidate = Path(explicit)
    else:
        cache = os.environ.get("VLLM_ASCEND_CACHE_DIR", str(Path.home() / ".cache/ascend-patch"))
        candidate = Path(cache) / VLLM_ASCEND_RELEASE
    return candidate if (candidate / "vllm_ascend" / "__init__.py").is_file() else None


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def resolve_in(roots: SourceRoots, target: str) -> StaticResolved:
    return roots.resolve(parse_target(target))


def lookup_error(roots: SourceRoots, target: str) -> str:
    with pytest.raises(LookupError) as info:
        roots.resolve(parse_target(target))
    return str(info.value)


@pytest.fixture
def tree(tmp_path):
    """Write files under tmp_path/src and return a resolver over package `pkg` there."""

    def make(files: dict[str, str], hints: dict[str, bool] | None = None, **roots: str):
        src = write_tree(tmp_path / "src", files)
        mapping = {"pkg": src, **{name: src for name in roots}}
        return SourceRoots(mapping, branch_hints=hints)

    return make


# render_ast_signature == render_signature ---------------------------------------------------

SIGNATURE_MODULE = '''
import functools


def plain(a, b): ...
def defaults(a, b=1, *, c, d=2): ...
def posonly(a, b=1, /, c=2): ...
def posonly_only(a, /): ...
def posonly_all_defaults(a=1, b=2, /): ...
def varargs(*args, **kwargs): ...
def varargs_kwonly(a, *rest, key, flag=False, **extra): ...
def kwonly_only(*, a, b=1): ...
def nothing(): ...
async def coroutine(a, /, b, *c, d=1, **e): ...
def annotated(a: int, b: "str" = "x", *args: int, c: float = 1.0, **kw: object) -> None: ...


def _passthrough(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


@_passthrough
def wrapped(x, y=0, *, z): ...


class K:
    def method(self, x, y=1): ...

    @staticmethod
    def static(x, *, y): ...

    @classmethod
    def klass(cls, x, /, y=2): ...

    async def amethod(self, *a, **k): ...

    @_passthrough
    def decorated(self, q, /, r=None): ...
'''

SIGNATURE_TARGETS = [
    "plain", "defaults", "posonly", "posonly_only", "posonly_all_defaults", "varargs",
    "varargs_kwonly", "kwonly_only", "nothing", "coroutine", "annotated", "wrapped",
    "K.method", "K.static", "K.klass", "K.amethod", "K.decorated",
]


@pytest.fixture
def signature_module(tmp_path, monkeypatch):
    """A throwaway package that is both importable (for render_signature) and parsed."""
    name = f"sigpkg_{abs(hash(str(tmp_path))) % 10**8}"
    write_tree(tmp_path, {f"{name}/__init__.py": "", f"{name}/funcs.py": SIGNATURE_MODULE})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _find_def(tree: ast.Module, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    body: list[ast.stmt] = tree.body
    *outer, last = qualname.split(".")
    for part in outer:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == part).body
    return next(
        n for n in body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == last
    )


@pytest.mark.parametrize("qualname", SIGNATURE_TARGETS)
def test_render_ast_signature_equals_render_signature(signature_module, qualname):
    name, root = signature_module
    module = f"{name}.funcs"
    live = render_signature(resolve(TargetRef(module, qualname)).function)
    tree = ast.parse((root / name / "funcs.py").read_text())
    assert render_ast_signature(_find_def(tree, qualname)) == live
    assert SourceRoots({name: root}).resolve(TargetRef(module, qualname)).signature == live


def test_rendered_signatures_spell_every_parameter_kind(signature_module):
    name, root = signature_module
    roots = SourceRoots({name: root})
    expected = {
        "defaults": "(a, b=…, *, c, d=…)",
        "posonly": "(a, b=…, /, c=…)",
        "posonly_all_defaults": "(a=…, b=…, /)",
        "varargs_kwonly": "(a, *rest, key, flag=…, **extra)",
        "coroutine": "(a, /, b, *c, d=…, **e)",
        "annotated": "(a, b=…, *args, c=…, **kw)",
        "K.static": "(x, *, y)",
        "K.klass": "(cls, x, /, y=…)",
    }
    got = {q: roots.resolve(TargetRef(f"{name}.funcs", q)).signature for q in expected}
    assert got == expected


# Modules and kinds --------------------------------------------------------------------------

KINDS = {
    "pkg/__init__.py": "",
    "pkg/mod.py": '''
        import functools

        import torch

        LIMIT = 8
        COUNT: int = 3
        BARE: int

        def helper(x, *, y=1):
            return x

        async def fetch(url, /, timeout=None):
            return url

        @functools.lru_cache(maxsize=None)
        def cached(key):
            return key

        class Layer:
            scale = 1.0
            width: int = 4
            height: int

            def forward(self, x):
                return x

            @staticmethod
            def build(cfg, *args):
                return cfg

            @classmethod
            def create(cls, name=None):
                return cls()

            @property
            def size(self):
                return 1

            @size.setter
            def size(self, value):
                pass

            @functools.cached_property
            def area(self):
                return 2

            @torch.compile(dynamic=True)
            def compiled(self, x, y):
                return x

            class Inner:
                def run(self, n):
                    return n
        ''',
}


@pytest.mark.parametrize(
    ("target", "line", "signature", "kind", "owner"),
    [
        ("pkg.mod:LIMIT", 5, None, "attribute", "pkg.mod"),
        ("pkg.mod:COUNT", 6, None, "attribute", "pkg.mod"),
        ("pkg.mod:helper", 9, "(x, *, y=…)", "function", "pkg.mod"),
        ("pkg.mod:fetch", 12, "(url, /, timeout=…)", "function", "pkg.mod"),
        ("pkg.mod:cached", 16, "(key)", "function", "pkg.mod"),
        ("pkg.mod:Layer", 19, None, "class", "pkg.mod"),
        ("pkg.mod:Layer.scale", 20, None, "attribute", "pkg.mod:Layer"),
        ("pkg.mod:Layer.width", 21, None, "attribute", "pkg.mod:Layer"),
        ("pkg.mod:Layer.forward", 24, "(self, x)", "method", "pkg.mod:Layer"),
        ("pkg.mod:Layer.build", 28, "(cfg, *args)", "staticmethod", "pkg.mod:Layer"),
        ("pkg.mod:Layer.create", 32, "(cls, name=…)", "classmethod", "pkg.mod:Layer"),
        # A property is reported at its getter, even with a setter defined after it.
        ("pkg.mod:Layer.size", 36, None, "property", "pkg.mod:Layer"),
        ("pkg.mod:Layer.area", 44, None, "property", "pkg.mod:Layer"),
        # Other decorators are not evaluated: still a method, with the def's parameters.
        ("pkg.mod:Layer.compiled", 48, "(self, x, y)", "method", "pkg.mod:Layer"),
        ("pkg.mod:Layer.Inner", 51, None, "class", "pkg.mod:Layer"),
        ("pkg.mod:Layer.Inner.run", 52, "(self, n)", "method", "pkg.mod:Layer.Inner"),
    ],
)
def test_kinds_lines_signatures_and_owners(tree, tmp_path, target, line, signature, kind, owner):
    roots = tree(KINDS)
    file = str(tmp_path / "src" / "pkg" / "mod.py")
    assert resolve_in(roots, target) == StaticResolved(file, line, signature, kind, owner)


def test_a_bare_annotation_is_not_an_attribute(tree):
    roots = tree(KINDS)
    assert lookup_error(roots, "pkg.mod:BARE") == "module pkg.mod has no attribute 'BARE'"
    assert lookup_error(roots, "pkg.mod:Layer.height") == (
        "class pkg.mod:Layer has no attribute 'height'"
    )


def test_package_init_and_module_files(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "def top(a): ...\n",
        "pkg/sub/__init__.py": "def sub_init(b): ...\n",
        "pkg/sub/leaf.py": "def leaf(c): ...\n",
    })
    src = tmp_path / "src"
    assert resolve_in(roots, "pkg:top").file == str(src / "pkg" / "__init__.py")
    assert resolve_in(roots, "pkg.sub:sub_init").file == str(src / "pkg" / "sub" / "__init__.py")
    assert resolve_in(roots, "pkg.sub.leaf:leaf").file == str(src / "pkg" / "sub" / "leaf.py")


def test_missing_module_class_and_attribute_messages(tree, tmp_path):
    roots = tree(KINDS)
    src = tmp_path / "src"
    assert lookup_error(roots, "pkg.nope:f") == f"module pkg.nope not found in {src}"
    assert lookup_error(roots, "pkg.mod:Nope.f") == "module pkg.mod has no attribute 'Nope'"
    assert lookup_error(roots, "pkg.mod:Layer.nope") == (
        "class pkg.mod:Layer has no attribute 'nope'"
    )
    assert lookup_error(roots, "other.mod:f") == (
        "module other.mod is outside the given sources (add --source other=DIR)"
    )
    assert lookup_error(roots, "pkg.mod:helper.x") == (
        f"helper is a function ({src / 'pkg' / 'mod.py'}:9), not a class or module"
    )


def test_a_name_bound_outside_the_roots_names_the_source_to_add(tree):
    roots = tree(KINDS)
    assert lookup_error(roots, "pkg.mod:torch") == (
        "pkg.mod:torch resolves to torch, outside the given sources (add --source torch=DIR)"
    )
    assert lookup_error(roots, "pkg.mod:torch.compile") == (
        "pkg.mod:torch.compile resolves to torch.compile, outside the given sources "
        "(add --source torch=DIR)"
    )


def test_covers_and_root_normalisation(tmp_path):
    write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/m.py": "def f(a): ...\n"})
    containing = SourceRoots({"pkg": tmp_path})
    itself = SourceRoots({"pkg": tmp_path / "pkg"})
    assert containing.covers("pkg.m") and containing.covers("pkg")
    assert not containing.covers("pkgx.m") and not containing.covers("vllm")
    ref = TargetRef("pkg.m", "f")
    assert containing.resolve(ref) == itself.resolve(ref)
    with pytest.raises(ValueError, match="is neither the package pkg nor a folder containing"):
        SourceRoots({"pkg": tmp_path / "elsewhere"})
    with pytest.raises(ValueError, match="not a Python expression"):
        SourceRoots({"pkg": tmp_path}, branch_hints={"vllm_version_is(": True})


# Imports ------------------------------------------------------------------------------------


def test_re_export_chain_across_packages_and_aliases(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "from .api import exported\n",
        "pkg/api.py": "from pkg.impl import public as exported\n",
        "pkg/impl/__init__.py": "from .core import public\n",
        "pkg/impl/core.py": "def public(x, *, y=1):\n    return x\n",
    })
    expected = StaticResolved(
        str(tmp_path / "src" / "pkg" / "impl" / "core.py"), 1, "(x, *, y=…)", "function",
        "pkg.impl.core",
    )
    for target in ("pkg:exported", "pkg.api:exported", "pkg.impl:public", "pkg.impl.core:public"):
        assert resolve_in(roots, target) == expected


def test_module_aliases_and_attribute_paths(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/tools.py": "class Tool:\n    def use(self, how): ...\ndef util(a): ...\n",
        "pkg/user.py": """
            import pkg.tools as z
            import pkg.tools
            from pkg import tools as t

            alias = z.util
            ToolAlias = t.Tool
            """,
    })
    tools = str(tmp_path / "src" / "pkg" / "tools.py")
    util = StaticResolved(tools, 3, "(a)", "function", "pkg.tools")
    use = StaticResolved(tools, 2, "(self, how)", "method", "pkg.tools:Tool")
    assert resolve_in(roots, "pkg.user:z.util") == util
    assert resolve_in(roots, "pkg.user:alias") == util
    assert resolve_in(roots, "pkg.user:t.Tool.use") == use
    assert resolve_in(roots, "pkg.user:ToolAlias.use") == use
    assert roots.resolve(TargetRef("pkg.user", "pkg.tools.Tool.use")) == use
    assert lookup_error(roots, "pkg.user:z") == (
        "pkg.user:z is the module pkg.tools, not an attribute"
    )


def test_relative_imports(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from . import leaf\nfrom .leaf import Leaf as Exported\n",
        "pkg/a/leaf.py": "class Leaf:\n    def go(self, n=0): ...\n",
        "pkg/b/__init__.py": "",
        "pkg/b/user.py": "from ..a import Exported\nfrom ..a.leaf import Leaf\nfrom .. import a\n",
        "pkg/b/bad.py": "from .... import nothing\n",
    })
    go = StaticResolved(str(tmp_path / "src/pkg/a/leaf.py"), 2, "(self, n=…)", "method",
                        "pkg.a.leaf:Leaf")
    assert resolve_in(roots, "pkg.b.user:Exported.go") == go
    assert resolve_in(roots, "pkg.b.user:Leaf.go") == go
    assert roots.resolve(TargetRef("pkg.b.user", "a.leaf.Leaf.go")) == go
    assert roots.resolve(TargetRef("pkg.a", "leaf.Leaf.go")) == go
    assert lookup_error(roots, "pkg.b.bad:nothing") == (
        f"{tmp_path / 'src/pkg/b/bad.py'}:1: relative import beyond the top-level package"
    )


def test_star_imports_inside_the_roots(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/impl.py": "def f(a, b): ...\ndef _private(): ...\n",
        "pkg/facade.py": "from pkg.impl import *\nfrom numpy import *\n",
    })
    assert resolve_in(roots, "pkg.facade:f").file == str(tmp_path / "src/pkg/impl.py")
    assert lookup_error(roots, "pkg.facade:_private") == (
        "module pkg.facade has no attribute '_private' "
        "(unless it comes from `from numpy import *`, outside the sources)"
    )


def test_import_cycles_and_the_hop_limit(tree):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import x\n",
        "pkg/b.py": "from .a import x\n",
        "pkg/loop_a.py": "from .loop_b import y\nx = y\n",
        "pkg/loop_b.py": "from .loop_a import x\ny = x\n",
    }
    deep = MAX_IMPORT_HOPS + 5
    for i in range(deep):
        files[f"pkg/m{i}.py"] = f"from .m{i + 1} import f\n"
    files[f"pkg/m{deep}.py"] = "def f(a): ...\n"
    roots = tree(files)
    assert lookup_error(roots, "pkg.a:x") == "import cycle: pkg.b.x -> pkg.a.x -> pkg.b.x"
    assert lookup_error(roots, "pkg.loop_a:x") == (
        "import cycle: pkg.loop_a.x (line 2) -> pkg.loop_b.y -> pkg.loop_b.y (line 2) -> "
        "pkg.loop_a.x -> pkg.loop_a.x (line 2)"
    )
    assert lookup_error(roots, "pkg.m0:f") == (
        f"gave up on pkg.m{MAX_IMPORT_HOPS + 1}.f: more than {MAX_IMPORT_HOPS} import hops"
    )
    # Exactly MAX_IMPORT_HOPS hops are followed to the end; one more is refused.
    assert resolve_in(roots, f"pkg.m{deep - MAX_IMPORT_HOPS}:f").signature == "(a)"
    assert "more than" in lookup_error(roots, f"pkg.m{deep - MAX_IMPORT_HOPS - 1}:f")


def test_module_level_aliases(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/m.py": """
            def original(a, b=2): ...
            renamed = original
            Number = int
            computed = original(1)

            class C:
                def forward_oot(self, x, residual=None): ...
                forward = forward_oot
                def helper(self): ...
                helper = helper
                outside = original
            """,
        "pkg/user.py": "from pkg.m import renamed\nfrom pkg.m import renamed as again\n",
    })
    file = str(tmp_path / "src/pkg/m.py")
    assert resolve_in(roots, "pkg.m:renamed") == StaticResolved(file, 1, "(a, b=…)", "function",
                                                               "pkg.m")
    # Importing an alias is no cycle, however often the chain passes the name.
    assert resolve_in(roots, "pkg.user:again") == resolve_in(roots, "pkg.m:renamed")
    assert resolve_in(roots, "pkg.m:Number") == StaticResolved(file, 3, None, "attribute", "pkg.m")
    assert resolve_in(roots, "pkg.m:computed").kind == "attribute"
    assert resolve_in(roots, "pkg.m:C.forward") == StaticResolved(
        file, 7, "(self, x, residual=…)", "method", "pkg.m:C"
    )
    assert resolve_in(roots, "pkg.m:C.helper").line == 9
    # A module function stored in a class body is that class's method.
    assert resolve_in(roots, "pkg.m:C.outside") == StaticResolved(file, 1, "(a, b=…)", "method",
                                                                 "pkg.m:C")


# Inheritance --------------------------------------------------------------------------------


def test_inheritance_across_modules(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/base.py": """
            from abc import ABC, abstractmethod
            from typing import Generic, TypeVar

            T = TypeVar("T")

            class Base(ABC, Generic[T]):
                @abstractmethod
                def dispatch(self, item): ...

                def combine(self, a, b=None): ...
            """,
        "pkg/derived.py": """
            from pkg.base import Base

            class Derived(Base[int]):
                def dispatch(self, item, *, fast=False): ...
            """,
    })
    base = str(tmp_path / "src/pkg/base.py")
    derived = str(tmp_path / "src/pkg/derived.py")
    assert resolve_in(roots, "pkg.derived:Derived.dispatch") == StaticResolved(
        derived, 4, "(self, item, *, fast=…)", "method", "pkg.derived:Derived"
    )
    assert resolve_in(roots, "pkg.derived:Derived.combine") == StaticResolved(
        base, 10, "(self, a, b=…)", "method", "pkg.base:Base"
    )
    # ABC and Generic are known to add nothing a patch targets, so this is a plain "no".
    assert lookup_error(roots, "pkg.derived:Derived.missing") == (
        "class pkg.derived:Derived has no attribute 'missing'"
    )


def test_inherited_attributes_follow_the_c3_mro(tree):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/diamond.py": """
            class A:
                def m(self): ...
            class B(A):
                pass
            class C(A):
                def m(self, x): ...
            class D(B, C):
                pass
            class Bad(A, B):
                pass
            """,
    })
    # Depth-first would answer A.m; Python (C3) answers C.m.
    assert resolve_in(roots, "pkg.diamond:D.m").owner == "pkg.diamond:C"
    assert lookup_error(roots, "pkg.diamond:Bad.m") == (
        "class pkg.diamond:Bad: no consistent method resolution order"
    )


def test_what_a_static_reading_cannot_rule_out_is_said(tree):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/m.py": """
            from dataclasses import dataclass

            @dataclass
            class Point:
                x: int = 0

            class Plain:
                pass
            """,
    })
    assert lookup_error(roots, "pkg.m:Point.__init__") == (
        "class pkg.m:Point has no attribute '__init__' other than object.__init__ "
        "(unless the class decorator @dataclass adds it)"
    )
    assert lookup_error(roots, "pkg.m:Plain.__init__") == (
        "class pkg.m:Plain has no attribute '__init__' other than object.__init__"
    )


def test_a_base_outside_the_sources_is_named_with_the_source_to_add(tree, tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/layer.py": """
            from vllm.model_executor.layers.layernorm import RMSNorm

            class AscendRMSNorm(RMSNorm):
                def forward_oot(self, x, residual=None): ...
            """,
    }
    message = lookup_error(tree(files), "pkg.layer:AscendRMSNorm.forward_native")
    assert message == (
        "class pkg.layer:AscendRMSNorm does not define 'forward_native' within the given "
        "sources; it would be inherited from vllm.model_executor.layers.layernorm.RMSNorm, "
        "outside them (add --source vllm=DIR)"
    )
    files["vllm/__init__.py"] = ""
    files["vllm/model_executor/layers/layernorm.py"] = """
        class CustomOp:
            def forward(self, *args, **kwargs): ...
        class RMSNorm(CustomOp):
            def forward_native(self, x, residual=None): ...
        """
    roots = tree(files, vllm="")
    assert resolve_in(roots, "pkg.layer:AscendRMSNorm.forward_native") == StaticResolved(
        str(tmp_path / "src/vllm/model_executor/layers/layernorm.py"), 4,
        "(self, x, residual=…)", "method", "vllm.model_executor.layers.layernorm:RMSNorm",
    )
    assert resolve_in(roots, "pkg.layer:AscendRMSNorm.forward").signature == (
        "(self, *args, **kwargs)"
    )


# Conditional definitions --------------------------------------------------------------------

BRANCHES = {
    "pkg/__init__.py": "",
    "pkg/utils.py": "def vllm_version_is(v): ...\n",
    "pkg/old.py": "class Runner:\n    def run(self, layer, x): ...\n",
    "pkg/m.py": """
        from pkg.utils import vllm_version_is

        if vllm_version_is("0.23.0"):
            def same(a, b=1): ...
            def differs(a): ...
            from pkg.old import Runner
        else:
            def same(a, b=2): ...
            def differs(a, b): ...
            class Runner:
                def run(self, x): ...

        if vllm_version_is("0.23.0"):
            def only_old(a): ...

        if vllm_version_is('0.22.0'):
            def chain(a): ...
        elif vllm_version_is("0.23.0"):
            def chain(a, b): ...
        else:
            def chain(a, b, c): ...

        class Layer:
            if not vllm_version_is("0.23.0"):
                def forward(self, x, *, new=True): ...
            else:
                def forward(self, x): ...
        """,
}


def test_candidates_that_agree_resolve_to_the_first(tree, tmp_path):
    assert resolve_in(tree(BRANCHES), "pkg.m:same") == StaticResolved(
        str(tmp_path / "src/pkg/m.py"), 4, "(a, b=…)", "function", "pkg.m"
    )


def test_candidates_that_differ_are_ambiguous_and_name_their_conditions(tree, tmp_path):
    roots = tree(BRANCHES)
    m, old = tmp_path / "src/pkg/m.py", tmp_path / "src/pkg/old.py"
    assert lookup_error(roots, "pkg.m:differs") == (
        "pkg.m:differs is ambiguous: its definition depends on conditions this check cannot "
        "decide (give a branch hint for them):\n"
        f'  when vllm_version_is("0.23.0"): {m}:5: function (a)\n'
        f'  when not vllm_version_is("0.23.0"): {m}:9: function (a, b)'
    )
    assert lookup_error(roots, "pkg.m:Runner.run") == (
        "pkg.m:Runner.run is ambiguous: its definition depends on conditions this check "
        "cannot decide (give a branch hint for them):\n"
        f'  when vllm_version_is("0.23.0"): {old}:2: method (self, layer, x)\n'
        f'  when not vllm_version_is("0.23.0"): {m}:11: method (self, x)'
    )
    assert lookup_error(roots, "pkg.m:Layer.forward") == (
        "pkg.m:Layer.forward is ambiguous: its definition depends on conditions this check "
        "cannot decide (give a branch hint for them):\n"
        f'  when not vllm_version_is("0.23.0"): {m}:25: method (self, x, *, new=…)\n'
        f'  when not not vllm_version_is("0.23.0"): {m}:27: method (self, x)'
    )


def test_a_name_bound_in_one_branch_only_may_be_unbound(tree, tmp_path):
    assert lookup_error(tree(BRANCHES), "pkg.m:only_old") == (
        "pkg.m:only_old is ambiguous: its definition depends on conditions this check cannot "
        "decide (give a branch hint for them):\n"
        f'  when vllm_version_is("0.23.0"): {tmp_path / "src/pkg/m.py"}:14: function (a)\n'
        "  when otherwise: pkg.m.only_old may be unbound: it is bound only when "
        'vllm_version_is("0.23.0")'
    )


@pytest.mark.parametrize(
    ("hint", "value", "target", "line", "signature"),
    [
        (V023, True, "pkg.m:differs", 5, "(a)"),
        (V023, False, "pkg.m:differs", 9, "(a, b)"),
        # Hints match the condition whatever its spelling, and decide `not` conditions too.
        ("vllm_version_is( '0.23.0' )", True, "pkg.m:Runner.run", 2, "(self, layer, x)"),
        (V023, False, "pkg.m:Runner.run", 11, "(self, x)"),
        (V023, True, "pkg.m:Layer.forward", 27, "(self, x)"),
        (V023, False, "pkg.m:Layer.forward", 25, "(self, x, *, new=…)"),
        (V023, True, "pkg.m:only_old", 14, "(a)"),
    ],
)
def test_branch_hints_pick_a_branch(tree, hint, value, target, line, signature):
    resolved = resolve_in(tree(BRANCHES, hints={hint: value}), target)
    assert (resolved.line, resolved.signature) == (line, signature)


def test_hints_through_elif_and_a_branch_that_leaves_a_name_unbound(tree):
    both = {'vllm_version_is("0.22.0")': False, V023: True}
    assert resolve_in(tree(BRANCHES, hints=both), "pkg.m:chain").signature == "(a, b)"
    partial = lookup_error(tree(BRANCHES, hints={V023: True}), "pkg.m:chain")
    assert partial.startswith("pkg.m:chain is ambiguous")
    assert "when vllm_version_is('0.22.0'): " in partial
    assert lookup_error(tree(BRANCHES, hints={V023: False}), "pkg.m:only_old") == (
        "module pkg.m has no attribute 'only_old'"
    )


def test_try_except_and_type_checking_blocks(tree, tmp_path):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/fast.py": "def kernel(x, y): ...\n",
        "pkg/m.py": """
            from typing import TYPE_CHECKING

            try:
                from pkg.fast import kernel
            except ImportError:
                def kernel(x): ...

            if TYPE_CHECKING:
                from pkg.fast import kernel as typed
            else:
                def typed(x, y): ...
            """,
    })
    m = tmp_path / "src/pkg/m.py"
    assert lookup_error(roots, "pkg.m:kernel") == (
        "pkg.m:kernel is ambiguous: its definition depends on conditions this check cannot "
        "decide (give a branch hint for them):\n"
        f"  when try at line 3: {tmp_path / 'src/pkg/fast.py'}:1: function (x, y)\n"
        f"  when except ImportError at line 5: {m}:6: function (x)"
    )
    # `if TYPE_CHECKING:` never runs, so it is no second candidate.
    assert resolve_in(roots, "pkg.m:typed") == StaticResolved(str(m), 11, "(x, y)", "function",
                                                             "pkg.m")


def test_conditional_bases_carry_their_condition(tree):
    roots = tree({
        "pkg/__init__.py": "",
        "pkg/m.py": """
            if vllm_version_is("0.23.0"):
                from vllm.old import Base
            else:
                from vllm.new import Base

            class Method(Base):
                def apply(self, layer): ...
            """,
    })
    assert resolve_in(roots, "pkg.m:Method.apply").signature == "(self, layer)"
    assert lookup_error(roots, "pkg.m:Method.inherited") == (
        "pkg.m:Method.inherited cannot be resolved on any path:\n"
        '  when vllm_version_is("0.23.0"): class pkg.m:Method does not define \'inherited\' '
        "within the given sources; it would be inherited from vllm.old.Base, outside them "
        "(add --source vllm=DIR)\n"
        '  when not vllm_version_is("0.23.0"): class pkg.m:Method does not define '
        "'inherited' within the given sources; it would be inherited from vllm.new.Base, "
        "outside them (add --source vllm=DIR)"
    )


# Limits and safety --------------------------------------------------------------------------


def test_large_and_unparsable_files_are_refused(tree, tmp_path):
    big = "x = 1\n" + "#" * (2 << 20) + "\n"
    roots = tree({"pkg/__init__.py": "", "pkg/big.py": big, "pkg/broken.py": "def f(:\n"})
    size = (tmp_path / "src/pkg/big.py").stat().st_size
    assert lookup_error(roots, "pkg.big:x") == (
        f"refusing to parse {tmp_path / 'src/pkg/big.py'}: {size} bytes is over the 2 MiB limit"
    )
    assert lookup_error(roots, "pkg.broken:f").startswith(
        f"cannot parse {tmp_path / 'src/pkg/broken.py'}: "
    )


def test_nothing_in_the_tree_is_imported_or_run(tree, tmp_path):
    marker = tmp_path / "ran"
    roots = tree({
        "pkg/__init__.py": f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n",
        "pkg/m.py": f"import os\nos.system('touch {marker}')\ndef f(a): ...\n",
    })
    assert resolve_in(roots, "pkg.m:f").signature == "(a)"
    assert not marker.exists()
    assert "pkg" not in sys.modules and "pkg.m" not in sys.modules


def test_each_file_is_parsed_once(tree, monkeypatch):
    roots = tree(KINDS)
    parsed: list[str] = []
    real_parse = ast.parse

    def counting_parse(source, filename="<unknown>", *args, **kwargs):
        parsed.append(str(filename))
        return real_parse(source, filename, *args, **kwargs)

    monkeypatch.setattr(static_targets.ast, "parse", counting_parse)
    for target in ("pkg.mod:helper", "pkg.mod:Layer.forward", "pkg.mod:Layer.size", "pkg:x"):
        try:
            resolve_in(roots, target)
        except LookupError:
            pass
    files = [name for name in parsed if name.endswith(".py")]
    assert sorted(files) == sorted(set(files)) and len(files) == 2


# The real vllm-ascend 0.23.0.post1 source ---------------------------------------------------


@pytest.fixture(scope="module")
def real_source() -> Path:
    source = vllm_ascend_source()
    if source is None:
        pytest.skip("vllm-ascend 0.23.0.post1 source not cached: run scripts/fetch_vllm_ascend.sh")
    return source


@pytest.fixture(scope="module")
def real(real_source) -> SourceRoots:
    return SourceRoots({"vllm_ascend": real_source})


TD = "vllm_ascend.ops.fused_moe.token_dispatcher"
FM = "vllm_ascend.ops.fused_moe.fused_moe"
SELECT_EXPERTS = (
    "(hidden_states, router_logits, top_k, use_grouped_topk, renormalize, topk_group=…, "
    "num_expert_group=…, custom_routing_function=…, scoring_func=…, routed_scaling_factor=…, "
    "e_score_correction_bias=…, indices_type=…, mix_placement=…, num_logical_experts=…, "
    "num_shared_experts=…, num_experts=…, input_ids=…, tid2eid=…)"
)
UNQUANTIZED_APPLY = (
    "(self, layer, x, use_grouped_topk, top_k, router_logits, renormalize, topk_group=…, "
    "num_expert_group=…, custom_routing_function=…, scoring_func=…, routed_scaling_factor=…, "
    "e_score_correction_bias=…, num_experts=…, expert_map=…, apply_router_weight_on_input=…, "
    "activation=…, enable_force_load_balance=…, log2phy=…, global_redundant_expert_num=…, "
    "pertoken_scale=…, mc2_mask=…)"
)

REAL_TARGETS = [
    # target, file under vllm_ascend/, line, signature, kind, owner
    (f"{TD}:TokenDispatcherWithAll2AllV.token_dispatch", "ops/fused_moe/token_dispatcher.py",
     474, "(self, token_dispatch_input)", "method", f"{TD}:TokenDispatcherWithAll2AllV"),
    (f"{TD}:TokenDispatcherWithAll2AllV._dispatch_preprocess",
     "ops/fused_moe/token_dispatcher.py", 563, "(self, hidden_states, topk_ids)", "method",
     f"{TD}:TokenDispatcherWithAll2AllV"),
    (f"{TD}:TokenDispatcherWithAll2AllV.token_combine", "ops/fused_moe/token_dispatcher.py",
     542, "(self, hidden_states, combine_metadata, bias=…)", "method",
     f"{TD}:TokenDispatcherWithAll2AllV"),
    (f"{TD}:TokenDispatcherWithAll2AllV._combine_postprocess",
     "ops/fused_moe/token_dispatcher.py", 696,
     "(self, permutated_local_input_tokens, combine_metadata)", "method",
     f"{TD}:TokenDispatcherWithAll2AllV"),
    (f"{TD}:TokenDispatcherWithAllGather.token_dispatch", "ops/fused_moe/token_dispatcher.py",
     351, "(self, token_dispatch_input)", "method", f"{TD}:TokenDispatcherWithAllGather"),
    # Inherited from the generic abstract base, through `MoETokenDispatcher[...]`.
    (f"{TD}:TokenDispatcherWithAll2AllV.ep_group", "ops/fused_moe/token_dispatcher.py", 73,
     None, "property", f"{TD}:MoETokenDispatcher"),
    ("vllm_ascend.ops.fused_moe.moe_comm_method:MoECommMethod.fused_experts",
     "ops/fused_moe/moe_comm_method.py", 122, "(self, fused_experts_input)", "method",
     "vllm_ascend.ops.fused_moe.moe_comm_method:MoECommMethod"),
    # AlltoAllCommImpl inherits fused_experts; FusedMC2CommImpl overrides it.
    ("vllm_ascend.ops.fused_moe.moe_comm_method:AlltoAllCommImpl.fused_experts",
     "ops/fused_moe/moe_comm_method.py", 122, "(self, fused_experts_input)", "method",
     "vllm_ascend.ops.fused_moe.moe_comm_method:MoECommMethod"),
    ("vllm_ascend.ops.fused_moe.moe_comm_method:FusedMC2CommImpl.fused_experts",
     "ops/fused_moe/moe_comm_method.py", 286, "(self, fused_experts_input)", "method",
     "vllm_ascend.ops.fused_moe.moe_comm_method:FusedMC2CommImpl"),
    ("vllm_ascend.ops.fused_moe.experts_selector:select_experts",
     "ops/fused_moe/experts_selector.py", 30, SELECT_EXPERTS, "function",
     "vllm_ascend.ops.fused_moe.experts_selector"),
    # fused_moe.py only imports select_experts: followed to experts_selector.
    (f"{FM}:select_experts", "ops/fused_moe/experts_selector.py", 30, SELECT_EXPERTS,
     "function", "vllm_ascend.ops.fused_moe.experts_selector"),
    (f"{FM}:AscendUnquantizedFusedMoEMethod.apply", "ops/fused_moe/fused_moe.py", 141,
     UNQUANTIZED_APPLY, "method", f"{FM}:AscendUnquantizedFusedMoEMethod"),
    ("vllm_ascend.ascend_forward_context:select_moe_comm_method", "ascend_forward_context.py",
     303, "(num_tokens, vllm_config, is_draft_model=…)", "function",
     "vllm_ascend.ascend_forward_context"),
    ("vllm_ascend.ops.layernorm:AscendRMSNorm.forward_oot", "ops/layernorm.py", 63,
     "(self, x, residual=…)", "method", "vllm_ascend.ops.layernorm:AscendRMSNorm"),
    ("vllm_ascend.ops.activation:AscendSiluAndMul.forward_oot", "ops/activation.py", 38,
     "(self, x)", "method", "vllm_ascend.ops.activation:AscendSiluAndMul"),
]


@pytest.mark.parametrize(("target", "file", "line", "signature", "kind", "owner"), REAL_TARGETS)
def test_real_vllm_ascend_targets(real, real_source, target, file, line, signature, kind, owner):
    expected = StaticResolved(str(real_source / "vllm_ascend" / file), line, signature, kind,
                              owner)
    assert resolve_in(real, target) == expected


def test_real_runner_depends_on_the_vllm_version_branch(real_source):
    """fused_moe.py imports AscendMoERunner from fused_moe_0_23_0 on vLLM 0.23.0 and defines its
    own otherwise; their `_forward_impl` differ, so only a hint can decide."""
    target = f"{FM}:AscendMoERunner._forward_impl"
    base = real_source / "vllm_ascend/ops/fused_moe"
    message = lookup_error(SourceRoots({"vllm_ascend": real_source}), target)
    assert message == (
        f"{target} is ambiguous: its definition depends on conditions this check cannot "
        "decide (give a branch hint for them):\n"
        f'  when vllm_version_is("0.23.0"): {base / "fused_moe_0_23_0.py"}:125: method '
        "(self, layer, hidden_states, router_logits, shared_experts_input, input_ids)\n"
        f'  when not vllm_version_is("0.23.0"): {base / "fused_moe.py"}:883: method '
        "(self, hidden_states, router_logits, shared_experts_input, input_ids=…)"
    )
    on_023 = SourceRoots({"vllm_ascend": real_source}, branch_hints={V023: True})
    assert resolve_in(on_023, target) == StaticResolved(
        str(base / "fused_moe_0_23_0.py"), 125,
        "(self, layer, hidden_states, router_logits, shared_experts_input, input_ids)",
        "method", "vllm_ascend.ops.fused_moe.fused_moe_0_23_0:AscendMoERunner",
    )
    later = SourceRoots({"vllm_ascend": real_source}, branch_hints={V023: False})
    assert resolve_in(later, target) == StaticResolved(
        str(base / "fused_moe.py"), 883,
        "(self, hidden_states, router_logits, shared_experts_input, input_ids=…)",
        "method", f"{FM}:AscendMoERunner",
    )
    # AscendFusedMoE exists only on vLLM 0.23.0: the else branch does not define it.
    assert resolve_in(on_023, f"{FM}:AscendFusedMoE.forward_impl").owner == (
        "vllm_ascend.ops.fused_moe.fused_moe_0_23_0:AscendFusedMoE"
    )
    assert lookup_error(later, f"{FM}:AscendFusedMoE.forward_impl") == (
        f"module {FM} has no attribute 'AscendFusedMoE'"
    )


def test_real_inherited_vllm_methods_need_the_vllm_source(real, real_source):
    assert lookup_error(real, "vllm_ascend.ops.layernorm:AscendRMSNorm.forward_native") == (
        "class vllm_ascend.ops.layernorm:AscendRMSNorm does not define 'forward_native' within "
        "the given sources; it would be inherited from "
        "vllm.model_executor.layers.layernorm.RMSNorm, outside them (add --source vllm=DIR)"
    )
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here: no source to resolve inherited methods in")
    vllm_dir = Path(next(iter(spec.submodule_search_locations)))
    both = SourceRoots({"vllm_ascend": real_source, "vllm": vllm_dir})
    resolved = resolve_in(both, "vllm_ascend.ops.layernorm:AscendRMSNorm.forward_native")
    assert (resolved.owner, resolved.kind, resolved.signature) == (
        "vllm.model_executor.layers.layernorm:RMSNorm", "method", "(self, x, residual=…)"
    )
    assert resolved.file == str(vllm_dir / "model_executor/layers/layernorm.py")


MUTATED_FILES = ["__init__.py", "ops/__init__.py", "ops/fused_moe/__init__.py",
                 "ops/fused_moe/token_dispatcher.py"]


@pytest.fixture
def mutable_copy(real_source, tmp_path):
    """The few real files token_dispatcher targets need, copied so that a test can edit them."""
    for relative in MUTATED_FILES:
        destination = tmp_path / "vllm_ascend" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_source / "vllm_ascend" / relative, destination)

    def edit(old: str, new: str) -> SourceRoots:
        path = tmp_path / "vllm_ascend/ops/fused_moe/token_dispatcher.py"
        text = path.read_text()
        assert text.count(old) == 1, old
        path.write_text(text.replace(old, new))
        return SourceRoots({"vllm_ascend": tmp_path})

    return edit


def test_mutated_copy_renamed_method_is_missing(mutable_copy):
    roots = mutable_copy("def _dispatch_preprocess(self, hidden_states, topk_ids):",
                         "def _dispatch_preprocess_v2(self, hidden_states, topk_ids):")
    assert lookup_error(roots, f"{TD}:TokenDispatcherWithAll2AllV._dispatch_preprocess") == (
        f"class {TD}:TokenDispatcherWithAll2AllV has no attribute '_dispatch_preprocess'"
    )


def test_mutated_copy_changed_signature_is_seen(mutable_copy):
    tail = (
        '        assert bias is None, "Bias is not supported in MoEAlltoAllvTokenDispatcher."\n\n'
        "        # 1. Preprocess using metadata"
    )
    roots = mutable_copy(
        "    def token_combine(self, hidden_states, combine_metadata, bias=None):\n" + tail,
        "    def token_combine(self, hidden_states, combine_metadata, *, bias=None, stream):\n"
        + tail,
    )
    resolved = resolve_in(roots, f"{TD}:TokenDispatcherWithAll2AllV.token_combine")
    assert resolved.signature == "(self, hidden_states, combine_metadata, *, bias=…, stream)"


def test_mutated_copy_removed_override_falls_back_to_the_abstract_base(mutable_copy):
    roots = mutable_copy(
        "        self.moe_all_to_all_group_name = backend.get_hccl_comm_name(local_rank)\n\n"
        "    def token_dispatch(",
        "        self.moe_all_to_all_group_name = backend.get_hccl_comm_name(local_rank)\n\n"
        "    def token_dispatch_v2(",
    )
    resolved = resolve_in(roots, f"{TD}:TokenDispatcherWithAll2AllV.token_dispatch")
    # Same parameters, but now the abstract method: the owner and line show the change.
    assert (resolved.owner, resolved.line, resolved.signature) == (
        f"{TD}:MoETokenDispatcher", 86, "(self, token_dispatch_input)"
    )


def test_mutated_copy_conditional_redefinition_is_ambiguous(mutable_copy, tmp_path):
    last_lines = (
        "        output = output.view(combine_metadata.hidden_shape)\n        return output\n"
    )
    roots = mutable_copy(
        last_lines,
        last_lines + "\n    if vllm_version_is('0.24.0'):\n\n"
        "        def _combine_postprocess(self, tokens, combine_metadata, stream=None):\n"
        "            pass\n",
    )
    file = tmp_path / "vllm_ascend/ops/fused_moe/token_dispatcher.py"
    target = f"{TD}:TokenDispatcherWithAll2AllV._combine_postprocess"
    assert lookup_error(roots, target) == (
        f"{target} is ambiguous: its definition depends on conditions this check cannot "
        "decide (give a branch hint for them):\n"
        f"  when vllm_version_is('0.24.0'): {file}:713: method "
        "(self, tokens, combine_metadata, stream=…)\n"
        f"  when not vllm_version_is('0.24.0'): {file}:696: method "
        "(self, permutated_local_input_tokens, combine_metadata)"
    )


# This package's own factories ---------------------------------------------------------------


def test_every_catalog_factory_is_found_in_this_packages_source():
    """validate for a stack that is not installed reads the factories instead of importing
    them (importing may need torch): every one the catalog names must resolve that way."""
    from ascend_patch.core import catalog
    from ascend_patch.core.live import Checker

    package = Path(__file__).resolve().parents[2]
    checker = Checker(SourceRoots({"ascend_patch": package}), importable=False)
    factories = sorted({site.factory for name in catalog.builtin_names()
                        for site_set in catalog.lookup(name).site_sets
                        for site in site_set.sites})
    assert len(factories) > 10
    assert {f: checker.factory_problem(f) for f in factories} == dict.fromkeys(factories)
    missing = factories[0].rpartition(":")[0] + ":no_such_factory"
    assert "has no attribute 'no_such_factory'" in checker.factory_problem(missing)


def test_vllm_version_hints_follow_the_planned_line(tmp_path):
    """Any vllm_version_is("X.Y.Z") is true exactly on X.Y's line, whatever versions the source
    probes; an explicit hint still wins."""
    from ascend_patch.checks.static_targets import VersionHints

    hints = VersionHints({"vllm_version_is('0.23.5')": False}, "0.23")
    assert hints["vllm_version_is('0.23.0')"] is True
    assert hints['vllm_version_is("0.23.1")'] is True
    assert hints["vllm_version_is('0.27.1')"] is False
    assert hints["vllm_version_is('0.230.0')"] is False
    assert hints["vllm_version_is('0.23.5')"] is False
    assert "is_310p()" not in hints
    assert "vllm_version_is('0.23.0')" not in VersionHints({}, None)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        "from .utils import vllm_version_is\n"
        "if vllm_version_is('0.27.1'):\n    def f(a, b): ...\nelse:\n    def f(a): ...\n")
    (tmp_path / "pkg" / "utils.py").write_text("def vllm_version_is(v): ...\n")
    from ascend_patch.core.targets import parse_target

    roots = SourceRoots({"pkg": tmp_path}, vllm_line="0.23")
    assert roots.resolve(parse_target("pkg:f")).signature == "(a)"
    later = SourceRoots({"pkg": tmp_path}, vllm_line="0.27")
    assert later.resolve(parse_target("pkg:f")).signature == "(a, b)"


# resolve_attribute: what exists on instances only (catalog.Attribute, `reads`) -------------

INSTANCE_TREE = {
    "pkg/__init__.py": "",
    "pkg/base.py": '''
        from dataclasses import dataclass, field
        from typing import ClassVar

        import torch


        @dataclass
        class Parallel:
            ep_size: int
            use_ep: bool = False
            registry: ClassVar[dict] = {}
            _private: int = field(default=0, init=False)

            @property
            def is_sequence_parallel(self):
                return False


        class Plain:
            annotated_only: int

            def __init__(self, moe):
                self.moe = moe
                self.a, (self.b, self.c) = 1, (2, 3)
                self.typed: int = 4

            def create_weights(self, layer):
                layer.register_parameter("w13_weight", None)
                other.x = 1


        class Child(Plain):
            pass


        class Layer(torch.nn.Module):
            def __init__(self):
                self.layer_name = "x"


        class Proxy:
            extra_attrs = ("moe_comm_method", "capturing")

            def __getattr__(self, name):
                return None
    ''',
    "pkg/lazy.py": '''
        def __getattr__(name):
            if name == "current_platform":
                return object()
            raise AttributeError(name)
    ''',
}


@pytest.mark.parametrize("target, kind, line_text", [
    ("pkg.base:Parallel.ep_size", "field", "ep_size: int"),
    ("pkg.base:Parallel.use_ep", "attribute", "use_ep: bool = False"),
    ("pkg.base:Parallel.is_sequence_parallel", "property", "def is_sequence_parallel(self):"),
    ("pkg.base:Plain.moe", "instance attribute", "self.moe = moe"),
    ("pkg.base:Plain.c", "instance attribute", "self.a, (self.b, self.c) = 1, (2, 3)"),
    ("pkg.base:Plain.typed", "instance attribute", "self.typed: int = 4"),
    ("pkg.base:Plain.w13_weight", "registered parameter",
     'layer.register_parameter("w13_weight", None)'),
    ("pkg.base:Child.moe", "instance attribute", "self.moe = moe"),
    # Past a base outside the sources (torch.nn.Module), the class's own __init__ still counts.
    ("pkg.base:Layer.layer_name", "instance attribute", 'self.layer_name = "x"'),
    ("pkg.base:Proxy.moe_comm_method", "attribute forwarded by __getattr__",
     'extra_attrs = ("moe_comm_method", "capturing")'),
    ("pkg.lazy:current_platform", "attribute", 'if name == "current_platform":'),
])
def test_resolve_attribute_finds_instance_attributes(tree, target, kind, line_text):
    roots = tree(INSTANCE_TREE)
    found = roots.resolve_attribute(parse_target(target))
    assert found.kind == kind
    lines = Path(found.file).read_text().splitlines()
    assert lines[found.line - 1].strip() == line_text


@pytest.mark.parametrize("target, reason", [
    # A bare annotation outside a dataclass creates nothing.
    ("pkg.base:Plain.annotated_only", "class pkg.base:Plain has no attribute 'annotated_only'"),
    # A dataclass has its fields, not every name.
    ("pkg.base:Parallel.nope", "class pkg.base:Parallel has no attribute 'nope'"),
    # Assigned on another object, not self.
    ("pkg.base:Plain.x", "class pkg.base:Plain has no attribute 'x'"),
    ("pkg.base:Proxy.sinks", "class pkg.base:Proxy has no attribute 'sinks'"),
    ("pkg.lazy:other", "module pkg.lazy has no attribute 'other'"),
])
def test_resolve_attribute_reports_what_is_not_there(tree, target, reason):
    roots = tree(INSTANCE_TREE)
    with pytest.raises(LookupError) as info:
        roots.resolve_attribute(parse_target(target))
    assert str(info.value).startswith(reason)


def test_plain_resolve_still_refuses_instance_attributes(tree):
    """Sites and interfaces name class-level symbols (the loader resolves them on the class):
    only `reads` accept what exists on instances."""
    roots = tree(INSTANCE_TREE)
    assert "has no attribute 'ep_size'" in lookup_error(roots, "pkg.base:Parallel.ep_size")
    assert "has no attribute 'moe'" in lookup_error(roots, "pkg.base:Plain.moe")
