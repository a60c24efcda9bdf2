"""The attribute audit (checks/attribute_audit.py): every upstream attribute an adapter reads,
calls or overrides is declared for each line whose site set runs it.

Unit tier: ast over the package's own files; torch is imported to tell its attribute names
apart, vLLM never.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ascend_patch.checks import attribute_audit
from ascend_patch.checks.attribute_audit import Finding, audit, scan_source
from ascend_patch.core import catalog
from ascend_patch.core.catalog import Attribute, Implementation, Interface, Site, SiteSet
from ascend_patch.core.upstream import Upstream

REPO = Path(__file__).resolve().parents[2]
MODULAR = "ascend_patch.impls.moe.adapters.vllm_modular"


def builtin_implementations() -> list[Implementation]:
    return [catalog.lookup(name) for name in catalog.builtin_names()]


def test_the_shipped_adapters_declare_every_upstream_attribute_they_use():
    findings = audit(builtin_implementations(), REPO)
    assert findings == [], "\n".join(map(str, findings))


# The adapter as it was before 0.34 support: the batched-format flag read on the parallel
# config whatever the line (vLLM 0.34 removed it: every MoE layer would raise at load).
FIXED = """    unhandled = _unhandled_format(method, layer, upstream)
    if unhandled is not None:
        return unhandled
"""
PRE_FIX = """    if moe.moe_parallel_config.use_batched_activation_format:
        return "batched activation format (DeepEP LL / NIXL EP)"
"""


def pre_fix_adapter() -> str:
    text = (REPO / "ascend_patch/impls/moe/adapters/vllm_modular.py").read_text()
    assert text.count(FIXED) == 1, "the fixed read moved: update this fixture with it"
    return text.replace(FIXED, PRE_FIX)


def test_the_pre_fix_adapter_fails_the_audit_on_0_34_exactly_for_the_removed_attribute():
    findings = audit(builtin_implementations(), REPO, sources={MODULAR: pre_fix_adapter()})
    assert [(f.implementation, f.lines, f.platform, f.use.module, f.use.name, f.use.how)
            for f in findings] == [
        ("moe.capacity", ("0.34",), "vllm", MODULAR, "use_batched_activation_format", "read")]
    line = pre_fix_adapter().splitlines()[findings[0].use.line - 1]
    assert line.strip() == "if moe.moe_parallel_config.use_batched_activation_format:"
    assert str(findings[0]) == (
        f"{MODULAR}:{findings[0].use.line}: read of upstream attribute "
        "'use_batched_activation_format' is not declared by moe.capacity for vLLM 0.34 on "
        "vllm (declare it in the site set's relies_on or reads)")


def test_the_fixed_adapter_reads_each_line_s_own_attribute():
    """The if-branch (`"activation_format" in upstream`) counts for 0.34 only, its else for
    the others: both are then declared where they run."""
    scan = scan_source(MODULAR, (REPO / "ascend_patch/impls/moe/adapters/vllm_modular.py")
                       .read_text())
    when = {u.name: u.when for u in scan.uses
            if u.name in ("use_batched_activation_format", "activation_format")
            and u.how == "read"}
    assert when == {"activation_format": (("activation_format", True),),
                    "use_batched_activation_format": (("activation_format", False),)}
    moe = catalog.lookup("moe.capacity")
    declared_034 = attribute_audit.declared_names(moe.site_set("0.34", "vllm"))
    for line in ("0.23", "0.32", "0.33"):
        site_set = moe.site_set(line, "vllm")
        assert "activation_format" not in site_set.upstream_keys(), line
        assert "use_batched_activation_format" in attribute_audit.declared_names(site_set)
    assert "activation_format" in moe.site_set("0.34", "vllm").upstream_keys()
    assert "use_batched_activation_format" not in declared_034


# The rules, on a small adapter of a made-up implementation.

ADAPTER = '''
import logging
import torch
import torch.distributed as dist

from ascend_patch.impls.fake import helper


def make(original, ctx):
    upstream = ctx.upstream
    layer = original.layer
    layer.expert_map.to("cpu")
    layer.kernel = None
    torch.ops.ascend_patch.op(dist.group.WORLD)
    getattr(layer, "optional_flag", None)
    name = "dynamic"
    getattr(layer, name)
    if "new_key" in ctx.upstream:
        layer.new_attr
    else:
        layer.old_attr
    logging.getLogger("x").warning("y")

    class Experts(upstream.Base):
        def _supports_thing(self):
            self.own_state = 1
            return self.own_state

        ascend_patch_marker = True

    return Experts
'''
HELPER = '''
def helper(x):
    return x.helped
'''


def fake_impl(*site_sets: SiteSet) -> Implementation:
    return Implementation("fake", "s", "w", site_sets)


def fake_site_set(lines, relies_on=(), reads=()) -> SiteSet:
    return SiteSet(lines=lines, sites=(Site("up.m:C.f", None, "ascend_patch.impls.fake.adapter:make"),),
                   relies_on=relies_on, reads=reads)


def names(findings: list[Finding]) -> dict[tuple[str, ...], set[str]]:
    out: dict[tuple[str, ...], set[str]] = {}
    for f in findings:
        out.setdefault(f.lines, set()).add(f.use.name)
    return out


def run_fake(*site_sets: SiteSet) -> list[Finding]:
    sources = {"ascend_patch.impls.fake.adapter": textwrap.dedent(ADAPTER),
               "ascend_patch.impls.fake.helper": textwrap.dedent(HELPER)}
    # `ignore` stands for own_names + torch_and_stdlib_names, so the expectation is exact.
    return audit([fake_impl(*site_sets)], REPO, sources=sources,
                 ignore={"to", "warning", "getLogger", "layer"})


def test_rules_on_a_made_up_adapter():
    base = (Interface("up.m:Base", None, "subclassed"),)
    findings = run_fake(fake_site_set(("1",), base),
                        fake_site_set(("2",), base + (Interface("up.m:C.new_key", None, "n"),)))
    # Read on an upstream object: expert_map, optional_flag (getattr), the branch's attribute,
    # the override _supports_thing; helper.py's `helped` (an impls module it imports).
    # Not: torch/dist chains, a getattr with a computed name, Base (an upstream key), the
    # ascend_patch-prefixed class attribute, names in `ignore`.
    # A write to the layer counts (`kernel`); `self.own_state = ...` defines a name of ours
    # (the real run subtracts own_names; here `ignore` stands for them).
    common = {"expert_map", "optional_flag", "_supports_thing", "helped", "kernel", "own_state"}
    assert names(findings) == {("1",): common | {"old_attr"}, ("2",): common | {"new_attr"}}
    assert {f.use.how for f in findings if f.use.name == "_supports_thing"} == {"override"}
    assert {f.use.how for f in findings if f.use.name == "optional_flag"} == {"getattr"}
    assert {f.use.how for f in findings if f.use.name == "kernel"} == {"write"}
    assert "own_state" in scan_source("m", textwrap.dedent(ADAPTER)).defines


def test_declared_reads_and_interface_targets_satisfy_the_audit():
    reads = tuple(Attribute(f"up.m:C.{n}") for n in
                  ("expert_map", "optional_flag", "helped", "old_attr", "kernel", "own_state"))
    findings = run_fake(fake_site_set(("1",), (Interface("up.m:Base._supports_thing", None, "o"),
                                               Interface("up.m:Base", None, "b")), reads))
    assert findings == []


def test_upstream_contains_is_declared_for_this_line_without_resolving():
    declared = {"activation_format": Interface("nowhere.module:Cls.activation_format", None, "w")}
    upstream = Upstream(declared, what="test")
    assert "activation_format" in upstream
    assert "use_batched_activation_format" not in upstream
    # Nothing was resolved (the module does not exist): membership only reads the catalog.
    assert "activation_format" not in vars(upstream)


@pytest.mark.parametrize("line, expected", [("0.32", False), ("0.33", False), ("0.34", True)])
def test_the_catalog_keys_the_0_34_activation_format(line, expected):
    site_set = catalog.lookup("moe.capacity").site_set(line, "vllm")
    assert ("activation_format" in site_set.upstream_keys()) is expected
    assert ("SubstitutedRoutedExperts" in site_set.upstream_keys()) is expected
