"""`ctx.upstream` (core/upstream.py): declared interfaces by key, resolved on first read."""

from __future__ import annotations

import pytest

from ascend_patch.core.catalog import Implementation, Interface, Site, SiteSet
from ascend_patch.core.context import PatchContext
from ascend_patch.core.errors import PatchError
from ascend_patch.core.upstream import Upstream, for_implementation


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
