"""Schema, catalog and options validation: one error per problem, with file:line:key."""

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_minimal_config_loads_with_defaults(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
    """)
    config = load_config(path)
    (patch,) = config.patches
    assert (patch.name, patch.impl.name, patch.on_error, patch.enabled, patch.line) == (
        "rms", "ops.rms_norm", "fail", True, 3)
    assert str(patch.sites[0].target) == "vllm.model_executor.layers.layernorm:RMSNorm.forward_native"
    assert len(config.digest) == 64


def test_unknown_top_level_key(write_config):
    path = write_config("""
        version: 1
        pathces: []
    """)
    assert problems_of(path) == [f"{path}:2: pathces: unknown key"]


def test_unknown_patch_key_and_wrong_type_are_both_reported(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
            taget: x.y
            enabled: "yes"
    """)
    assert problems_of(path) == [
        f"{path}:5: patches[0].taget: unknown key",
        f"{path}:6: patches[0].enabled: must be true or false, not the string 'yes'",
    ]


def test_wrong_version(write_config):
    path = write_config("version: 2\npatches: []\n")
    assert problems_of(path) == [f"{path}:1: version: must be 1"]


def test_missing_version(write_config):
    path = write_config("patches: []\n")
    assert problems_of(path) == [f"{path}:1: version: required key is missing"]


def test_top_level_must_be_mapping(write_config):
    path = write_config("- 1\n- 2\n")
    assert problems_of(path) == [
        f"{path}:1: the top level must be a mapping with 'version' and 'patches'"
    ]


def test_bad_vllm_range(write_config):
    path = write_config("version: 1\nvllm: 'newest please'\n")
    assert problems_of(path) == [
        f"{path}:2: vllm: value error, 'newest please' is not a version range such as '>=0.32,<0.33'"
    ]


def test_unknown_implementation_lists_the_catalog(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: x
            impl: moe.magic
    """)
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: patches[0].impl: unknown implementation 'moe.magic'; the catalog has: ")
    assert "ops.rms_norm" in problem


def test_options_are_validated_by_the_implementation(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
            options:
              eps: 1.0e-5
    """)
    assert problems_of(path) == [f"{path}:6: patches[0].options.eps: unknown key"]


def test_duplicate_names_and_shared_target(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
          - name: rms
            impl: ops.silu_and_mul
          - name: rms-again
            impl: ops.rms_norm
    """)
    assert problems_of(path) == [
        f"{path}:5: patches[1].name: duplicate patch name 'rms' (also patches[0])",
        f"{path}:7: patches[2].target: vllm.model_executor.layers.layernorm:RMSNorm.forward_native "
        "is already patched by 'rms'",
    ]


def test_bad_patch_name(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: "has space"
            impl: ops.rms_norm
    """)
    assert problems_of(path) == [
        f"{path}:3: patches[0].name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$'"
    ]


def test_external_impl_is_refused_by_default(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: toy
            impl: tests.fixtures.toy_impls:FUNCTION
    """)
    assert problems_of(path) == [
        f"{path}:4: patches[0].impl: 'tests.fixtures.toy_impls:FUNCTION' is outside the catalog; "
        "set 'allow_external_impls: true' at the top level to allow implementations from other packages"
    ]


def test_external_impl_must_be_an_implementation(write_config):
    path = write_config("""
        version: 1
        allow_external_impls: true
        patches:
          - name: toy
            impl: tests.fixtures.toy_impls:ToyOptions
    """)
    assert problems_of(path) == [
        f"{path}:5: patches[0].impl: 'tests.fixtures.toy_impls:ToyOptions' is "
        "ModelMetaclass, not an ascend_patch Implementation"
    ]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("vllm.model_executor.layers.layernorm.RMSNorm.forward_native",
         "vllm.model_executor.layers.layernorm:RMSNorm.forward_native"),
        ("pkg.mod:func", "pkg.mod:func"),
        ("pkg.mod.func", "pkg.mod:func"),
    ],
)
def test_target_override_forms(write_config, target, expected):
    path = write_config(f"""
        version: 1
        allow_external_targets: true
        patches:
          - name: rms
            impl: ops.rms_norm
            target: {target}
    """)
    assert str(load_config(path).patches[0].sites[0].target) == expected


def test_bad_target_override(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
            target: "not a path"
    """)
    assert problems_of(path) == [
        f"{path}:5: patches[0].target: 'not a path' is not a target: use "
        "'package.module:Class.attr' or 'package.module.Class.attr'"
    ]


def test_multi_site_impl_needs_a_mapping(write_config):
    path = write_config("""
        version: 1
        allow_external_impls: true
        patches:
          - name: two
            impl: tests.fixtures.toy_impls:TWO_SITES
            target: a.b:c
          - name: three
            impl: tests.fixtures.toy_impls:TWO_SITES
            target: {nope: a.b:c}
    """)
    assert problems_of(path) == [
        f"{path}:6: patches[0].target: toy.two_sites patches several sites (function, method); "
        "give a mapping role -> target",
        f"{path}:9: patches[1].target.nope: toy.two_sites has no site 'nope'; its sites: function, method",
    ]
