"""Every site, interface and attribute the catalog declares for vLLM 0.23, 0.33 and 0.34,
found in the real python files of that release's wheel (scripts/fetch_source.sh), read with
ast: what `validate --source` checks per line, plus the drift 0.34 brought.

Contract tier (reads real upstream source); skipped where the sources are not cached.
"""

from __future__ import annotations

import pytest

from ascend_patch.checks.static_targets import SourceRoots
from ascend_patch.core import catalog
from ascend_patch.core.targets import parse_target
from tests.ascend import harness
from tests.upstream_sources import require_vllm_source

_FM = "vllm.model_executor.layers.fused_moe"
BATCHED_FLAG = f"{_FM}.config:FusedMoEParallelConfig.use_batched_activation_format"


def roots(line: str, **extra) -> SourceRoots:
    return SourceRoots({"vllm": require_vllm_source(f"{line}.0"), **extra}, vllm_line=line)


def unresolved(line: str, platform: str, sources: SourceRoots) -> list[str]:
    out = []
    for name in catalog.builtin_names():
        site_set = catalog.lookup(name).site_set(line, platform)
        if site_set is None:
            continue
        for target, read in ([(s.target, False) for s in site_set.sites]
                             + [(i.target, False) for i in site_set.relies_on]
                             + [(a.target, True) for a in site_set.reads]):
            ref = parse_target(target)
            if not sources.covers(ref.module):
                out.append(f"{name}: {target}: not covered")
                continue
            try:
                (sources.resolve_attribute if read else sources.resolve)(ref)
            except LookupError as exc:
                out.append(f"{name}: {target}: {exc}")
    return out


@pytest.mark.parametrize("line", ["0.23", "0.33", "0.34"])
def test_every_declaration_of_a_line_resolves_in_its_wheel(line):
    assert unresolved(line, "vllm", roots(line)) == []


def test_every_declaration_of_the_ascend_stack_resolves_in_vllm_ascend_and_vllm():
    sources = roots("0.23", vllm_ascend=harness.require_source())
    assert unresolved("0.23", "ascend", sources) == []


def test_0_34_removed_the_batched_flag_the_0_33_catalog_reads():
    flag = parse_target(BATCHED_FLAG)
    assert roots("0.33").resolve_attribute(flag).kind == "property"
    with pytest.raises(LookupError) as info:
        roots("0.34").resolve_attribute(flag)
    assert str(info.value).startswith(
        f"class {_FM}.config:FusedMoEParallelConfig has no attribute "
        "'use_batched_activation_format'")
    moe = catalog.lookup("moe.capacity")
    assert BATCHED_FLAG in {a.target for a in moe.site_set("0.33", "vllm").reads}
    assert BATCHED_FLAG not in {a.target for a in moe.site_set("0.34", "vllm").reads}


def test_0_34_names_the_format_on_the_moe_config_and_adds_padded_standard():
    v34 = roots("0.34")
    fmt = v34.resolve(parse_target(f"{_FM}.config:FusedMoEConfig.activation_format"))
    assert fmt.kind == "property"
    padded = parse_target(f"{_FM}.modular_kernel:FusedMoEActivationFormat.PaddedStandard")
    assert v34.resolve(padded).kind == "attribute"
    with pytest.raises(LookupError):
        roots("0.33").resolve(padded)
    substituted = v34.resolve(parse_target(f"{_FM}.expert_substitution:SubstitutedRoutedExperts"))
    assert substituted.kind == "class"


def test_dataclass_fields_the_adapter_reads_are_found_as_fields():
    found = roots("0.34").resolve_attribute(
        parse_target(f"{_FM}.config:FusedMoEParallelConfig.ep_size"))
    assert (found.kind, found.owner) == ("field", f"{_FM}.config:FusedMoEParallelConfig")


@pytest.mark.parametrize("line, module", [("0.33", "vllm._custom_ops"), ("0.34", "vllm._cpu_ops")])
def test_the_cpu_moe_wrappers_the_bench_imports_are_where_it_looks(line, module):
    """scripts/bench_vs_native.py takes them from vllm._cpu_ops when the line has that module
    (cpu_ops_module), else from vllm._custom_ops."""
    sources = roots(line)
    for name in ("cpu_prepack_moe_weight", "cpu_fused_moe"):
        assert sources.resolve(parse_target(f"{module}:{name}")).kind == "function"
    has_cpu_ops = sources.covers("vllm._cpu_ops") and _module_exists(sources, "vllm._cpu_ops")
    assert has_cpu_ops is (module == "vllm._cpu_ops")
    if has_cpu_ops:
        with pytest.raises(LookupError):
            sources.resolve(parse_target("vllm._custom_ops:cpu_prepack_moe_weight"))


def _module_exists(sources: SourceRoots, module: str) -> bool:
    try:
        sources.resolve(parse_target(f"{module}:__name__"))
    except LookupError as exc:
        return "not found in" not in str(exc)
    return True
