"""`ctx.upstream` (core/upstream.py) and the audit that keeps implementations on it.

The audit reads ascend_patch/impls/** with ast (nothing is imported but the catalog entries):
no module imports vLLM, vllm-ascend or torch_npu itself (outside ALLOWED), and every
`<...>.upstream.<key>` an implementation package reads is declared by one of its site sets.
So a symbol used is a symbol `validate` checks. The namespace is always reached through a
name or attribute called `upstream` (`ctx.upstream`, `state.upstream`, a parameter
`upstream`): that is what the audit recognises.
"""

from __future__ import annotations

import ast
import importlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ascend_patch.core.catalog import Implementation, Interface, Site, SiteSet
from ascend_patch.core.context import PatchContext
from ascend_patch.core.errors import PatchError
from ascend_patch.core.upstream import Upstream, for_implementation

REPO = Path(__file__).resolve().parents[2]
IMPLS = REPO / "ascend_patch" / "impls"
UPSTREAM_ROOTS = ("vllm", "vllm_ascend", "torch_npu")

# (module path under the repo, root package it imports), each with why it cannot go through
# ctx.upstream. An entry nothing uses any more fails the audit too.
ALLOWED = {
    # torch_npu is the NPU runtime, not vLLM or vllm-ascend code: no vLLM line declares it
    # (the npu backend also runs under vLLM's own platforms), `validate` cannot import it
    # without CANN, and callers hand in an emulation through `ops` in tests. Imported only
    # when the npu backend really computes on an NPU.
    ("ascend_patch/impls/moe/experts/npu_backend.py", "torch_npu"),
    # The same for the ops' NPU path (chosen by the tensor's device, `ops` for emulation).
    ("ascend_patch/impls/ops/kernels.py", "torch_npu"),
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _upstream_root(module: str) -> str | None:
    root = module.split(".")[0]
    return root if root in UPSTREAM_ROOTS else None


def _is_upstream_ns(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "upstream") or (
        isinstance(node, ast.Attribute) and node.attr == "upstream")


def _constant_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_sys_modules(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "modules"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def scan(path: str, source: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]],
                                          list[Finding]]:
    """(upstream imports as (line, module), upstream keys read as (line, key), findings
    that are violations whatever the allow-list says)."""
    imports: list[tuple[int, str]] = []
    keys: list[tuple[int, str]] = []
    findings: list[Finding] = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            imports += [(node.lineno, a.name) for a in node.names if _upstream_root(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _upstream_root(node.module):
                imports.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = _constant_str(node.args[0]) if node.args else None
            if name in ("import_module", "__import__") and first and _upstream_root(first):
                imports.append((node.lineno, first))
            elif (name == "get" and isinstance(func, ast.Attribute)
                  and _is_sys_modules(func.value) and first and _upstream_root(first)):
                imports.append((node.lineno, first))
            elif name in ("getattr", "hasattr", "setattr") and node.args and _is_upstream_ns(
                    node.args[0]):
                findings.append(Finding(path, node.lineno, f"{name}() on the upstream namespace: "
                                        "read a declared key as an attribute"))
        elif isinstance(node, ast.Subscript) and _is_sys_modules(node.value):
            module = _constant_str(node.slice)
            if module and _upstream_root(module):
                imports.append((node.lineno, module))
        elif isinstance(node, ast.Attribute) and _is_upstream_ns(node.value):
            keys.append((node.lineno, node.attr))
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and _is_upstream_ns(
                node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(not (isinstance(t, ast.Name) and t.id == "upstream") for t in targets):
                findings.append(Finding(path, node.lineno, "the upstream namespace bound to "
                                        "another name: the audit reads only `upstream.<key>`"))
    return imports, keys, findings


def declared_keys(package: str) -> tuple[set[str], set[str]]:
    """(keys some site set of the package's implementations resolves, keys only ambiguous)."""
    spec = importlib.import_module(f"ascend_patch.impls.{package}.spec")
    usable: set[str] = set()
    ambiguous: set[str] = set()
    for impl in spec.IMPLEMENTATIONS.values():
        for site_set in impl.site_sets:
            usable |= set(site_set.upstream_keys())
            ambiguous |= set(site_set.ambiguous_keys())
    return usable, ambiguous - usable


def audit(files: dict[str, str], keys_of: dict[str, tuple[set[str], set[str]]],
          allowed: set[tuple[str, str]] = ALLOWED) -> tuple[list[Finding], set]:
    """Violations in `files` (repo-relative path -> source; the package is the directory
    under impls/), and the allow-list entries that were used."""
    findings: list[Finding] = []
    used_allowances = set()
    for path, source in sorted(files.items()):
        package = Path(path).relative_to("ascend_patch/impls").parts[0]
        imports, keys, found = scan(path, source)
        findings += found
        for line, module in imports:
            entry = (path, _upstream_root(module))
            if entry in allowed:
                used_allowances.add(entry)
                continue
            findings.append(Finding(path, line, f"imports {module} itself: declare what it "
                                    "uses in the catalog and read it as ctx.upstream.<key>"))
        usable, ambiguous = keys_of.get(package, (set(), set()))
        for line, key in keys:
            if key in usable:
                continue
            why = ("is ambiguous in every site set declaring it: give the Interface a key="
                   if key in ambiguous else "is declared by no site set")
            findings.append(Finding(path, line, f"upstream.{key} {why} of "
                                    f"ascend_patch/impls/{package}/spec.py"))
    return sorted(findings, key=lambda f: (f.path, f.line)), used_allowances


def tree_files() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(IMPLS.rglob("*.py"))}


def packages() -> list[str]:
    return sorted(p.parent.name for p in IMPLS.glob("*/spec.py"))


# -- the audit, on the tree ------------------------------------------------------------------


def test_implementations_use_only_declared_upstream_symbols():
    files = tree_files()
    findings, used = audit(files, {name: declared_keys(name) for name in packages()})
    assert not findings, "\n".join(map(str, findings))
    assert used == ALLOWED, f"allow-list entries no longer needed: {sorted(ALLOWED - used)}"


def test_the_audit_sees_the_adapters_reads():
    """Guards the audit itself: the moe adapters read their vLLM and vllm-ascend symbols
    through the namespace, and the audit finds those reads."""
    seen = {key for path, source in tree_files().items() if "/moe/" in path
            for _, key in scan(path, source)[1]}
    assert {"get_ep_group", "FusedMoEKernel", "select_experts", "_EXTRA_CTX",
            "gather_from_sequence_parallel_region"} <= seen


# -- the audit, on planted violations ---------------------------------------------------------

KEYS = {"moe": ({"get_ep_group"}, {"apply"})}


def planted(source: str, path: str = "ascend_patch/impls/moe/adapters/planted.py"):
    return audit({path: textwrap.dedent(source)}, KEYS)[0]


@pytest.mark.parametrize("source", [
    "from vllm.distributed import get_ep_group\n",
    "import vllm_ascend.ops.fused_moe as fm\n",
    "def f():\n    import torch_npu\n",
    "import importlib\nm = importlib.import_module('vllm.config')\n",
    "import sys\nm = sys.modules['vllm_ascend.utils']\n",
    "import sys\nm = sys.modules.get('vllm.platforms')\n",
])
def test_a_planted_import_fails_the_audit(source):
    (finding,) = planted(source)
    assert "itself" in finding.message and finding.line == source.count("\n")


def test_planted_reads_fail_the_audit():
    findings = planted("""
        def f(ctx, state, upstream, name):
            ctx.upstream.get_ep_group()         # declared: fine
            ctx.upstream.get_tp_group()         # not declared
            state.upstream.apply                # declared twice: ambiguous
            upstream.current_platform           # a parameter named upstream
            getattr(ctx.upstream, name)         # not auditable
            up = ctx.upstream                   # nor is an alias
            upstream = state.upstream           # the same name: fine
        """)
    assert [(f.line, f.message.split(" ")[0]) for f in findings] == [
        (4, "upstream.get_tp_group"), (5, "upstream.apply"), (6, "upstream.current_platform"),
        (7, "getattr()"), (8, "the")]
    assert "ambiguous" in findings[1].message


def test_the_allow_list_is_per_file():
    source = "def ops():\n    import torch_npu\n"
    assert planted(source, "ascend_patch/impls/moe/experts/npu_backend.py") == []
    assert len(planted(source, "ascend_patch/impls/moe/experts/torch_backend.py")) == 1


def test_a_planted_module_file_fails_the_audit(tmp_path):
    """A module written into a package of the tree, read as the tree is read."""
    module = tmp_path / "ascend_patch" / "impls" / "moe" / "adapters" / "planted.py"
    module.parent.mkdir(parents=True)
    module.write_text("from vllm.distributed import get_dp_group\n\n"
                      "def f(ctx):\n    return ctx.upstream.get_world_group()\n")
    files = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.py")}
    findings = audit(files, {"moe": declared_keys("moe")})[0]
    assert [(f.line, f.message.split(" ")[0]) for f in findings] == [
        (1, "imports"), (4, "upstream.get_world_group")]


# -- the namespace ----------------------------------------------------------------------------


def _impl(toy: str, *interfaces: Interface) -> Implementation:
    return Implementation(
        name="toy.impl", summary="", why="",
        site_sets=(SiteSet(lines=("0.32",), sites=(Site(f"{toy}:greet", None, "x:y"),),
                           relies_on=interfaces),),
    )


def test_keys_resolve_lazily_to_the_live_object(toy_module):
    import sys

    impl = _impl(toy_module, Interface(f"{toy_module}:greet", "(name)", "called"),
                 Interface(f"{toy_module}:Greeter.greet", "(self, name)", "a method",
                           key="greeter_greet"))
    upstream = for_implementation(impl, "0.32", "vllm")
    assert toy_module not in sys.modules  # nothing imported before the first read
    assert upstream.greet("x") == "hello x"
    module = sys.modules[toy_module]
    assert upstream.greeter_greet is module.Greeter.greet
    # Kept as a plain attribute: later reads never run __getattr__ (torch.compile traces them).
    assert vars(upstream)["greet"] is module.greet
    assert dir(upstream) == ["greet", "greeter_greet"]
    with pytest.raises(AttributeError, match="read-only"):
        upstream.greet = print


def test_a_warm_read_traces_under_torch_compile():
    torch = pytest.importorskip("torch")
    upstream = Upstream({"relu": Interface("torch.nn.functional:relu", None, "")}, what="toy")
    upstream.relu  # the first read imports: eagerly, before tracing

    @torch.compile(fullgraph=True, backend="eager")
    def forward(x):
        return upstream.relu(x) + 1

    assert torch.equal(forward(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0]))


def test_an_undeclared_key_names_the_declarer_and_the_declared_keys(toy_module):
    upstream = for_implementation(
        _impl(toy_module, Interface(f"{toy_module}:greet", "(name)", "called")), "0.32", "vllm")
    with pytest.raises(AttributeError) as err:
        upstream.Greeter
    assert str(err.value) == ("toy.impl for vLLM 0.32 on vllm declares no upstream interface "
                              "'Greeter' (declared: greet); add it to the site set's relies_on")
    empty = for_implementation(_impl(toy_module), "0.23", "ascend")
    with pytest.raises(AttributeError, match=r"toy.impl for vLLM 0.23 on ascend .*"
                                             r"\(declared: none\)"):
        empty.greet


def test_a_derived_key_two_targets_share_is_ambiguous(toy_module):
    upstream = for_implementation(_impl(
        toy_module, Interface(f"{toy_module}:greet", "(name)", "called"),
        Interface(f"{toy_module}:Greeter.greet", "(self, name)", "checked only")), "0.32", "vllm")
    with pytest.raises(AttributeError, match="'greet' is ambiguous.*give the Interface used a"):
        upstream.greet


def test_a_given_key_must_be_unique():
    with pytest.raises(ValueError, match="interface key 'f' names several targets"):
        SiteSet(lines=("0.32",), sites=(Site("m:g", None, "x:y"),), relies_on=(
            Interface("m:f", None, ""), Interface("m:C.g", None, "", key="f")))
    with pytest.raises(ValueError, match="not an identifier"):
        Interface("m:f", None, "", key="a.b")


def test_what_validate_would_refuse_is_refused_at_first_read(toy_module):
    upstream = for_implementation(_impl(
        toy_module,
        Interface(f"{toy_module}:greet", "(name, loud)", "called"),
        Interface(f"{toy_module}:gone", None, "read"),
    ), "0.32", "vllm", error=PatchError)
    with pytest.raises(PatchError, match=r"has signature \(name\), not the declared "
                                         r"\(name, loud\)"):
        upstream.greet
    with pytest.raises(PatchError, match=r"upstream 'gone' .* has no attribute 'gone'"):
        upstream.gone


def test_a_module_is_not_an_interface(toy_module, tmp_path):
    (tmp_path / f"{toy_module}_pkg").mkdir()
    (tmp_path / f"{toy_module}_pkg" / "__init__.py").write_text("from . import sub\n")
    (tmp_path / f"{toy_module}_pkg" / "sub.py").write_text("X = 1\n")
    upstream = Upstream({"sub": Interface(f"{toy_module}_pkg:sub", None, "a module")},
                        what="toy")
    with pytest.raises(LookupError, match="is a module: declare the attributes used"):
        upstream.sub


def test_without_imports_a_module_not_loaded_does_not_resolve(toy_module):
    upstream = Upstream({"greet": Interface(f"{toy_module}:greet", None, "")}, what="toy",
                        import_modules=False)
    with pytest.raises(LookupError, match="upstream 'greet'"):
        upstream.greet


def test_the_context_resolves_its_implementations_declarations(toy_module):
    from ascend_patch.core.versions import Stack

    impl = _impl(toy_module, Interface(f"{toy_module}:greet", "(name)", "called"))
    ctx = PatchContext("p", impl.name, None, where="c.yaml:3", stack=Stack("0.32", "vllm"),
                       impl=impl)
    assert ctx.upstream.greet("y") == "hello y"
    assert ctx.upstream is ctx.upstream
    ctx.close()  # a reverted patch keeps nothing resolved
    assert ctx._upstream is None
    other = PatchContext("p", impl.name, None, where="c.yaml:3",
                         stack=Stack("0.23", "vllm"), impl=impl)
    with pytest.raises(AttributeError, match="toy.impl for vLLM 0.23 on vllm declares no"):
        other.upstream.greet
    with pytest.raises(PatchError, match=r"c.yaml:3: patch 'p' \(nowhere\): not a catalog"):
        PatchContext("p", "nowhere", None, where="c.yaml:3").upstream
