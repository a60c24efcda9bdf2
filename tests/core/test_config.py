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
    assert problems_of(path) == [f"{path}:2: pathces: unknown key (did you mean 'patches'?)"]


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
        f"{path}:5: patches[0].taget: unknown key (did you mean 'target'?)",
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


# -- every problem of every file in one pass (issue 24, item 3) -------------------------------


def test_schema_catalog_and_option_problems_in_one_pass(write_config):
    path = write_config("""
        version: 1
        descripton: three problems, three stages
        patches:
          - name: moe
            impl: moe.capacity
            options: {drop_token_ratio: 9}
          - name: rms
            impl: ops.rms_nrom
    """)
    assert problems_of(path) == [
        f"{path}:2: descripton: unknown key (did you mean 'description'?)",
        f"{path}:6: patches[0].options.drop_token_ratio: input should be less than or equal to 0.5",
        f"{path}:8: patches[1].impl: unknown implementation 'ops.rms_nrom'; did you mean "
        "'ops.rms_norm'? The catalog has: " + ", ".join(__import__(
            "ascend_patch.core.catalog", fromlist=["x"]).builtin_names()),
    ]


def test_a_broken_patch_entry_does_not_hide_the_others(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: moe
            impl: moe.capacity
            on_error: explode
          - name: gone
            options: {x: 1}
          - name: rms
            impl: ops.rms_norm
            options: {eps: 1}
        profiles:
          p:
            patches:
              gone: {enabled: true}
    """)
    assert problems_of(path) == [
        f"{path}:5: patches[0].on_error: must be 'fail' or 'skip'",
        f"{path}:6: patches[1].impl: required key is missing",
        f"{path}:10: patches[2].options.eps: unknown key",
    ]


def test_a_leaf_error_does_not_hide_its_base_error(write_config):
    base = write_config("""
        version: 1
        patches:
          - name: rms
            impl: nothing.here
    """, "base.yaml")
    leaf = write_config("""
        version: 1
        extends: base.yaml
        patches:
          - name: act
            impl: ops.silu_and_mul
            options: {x: 1}
        profles: {}
    """)
    assert problems_of(leaf) == [
        f"{base}:4: patches[0].impl: unknown implementation 'nothing.here'; the catalog has: "
        + ", ".join(__import__("ascend_patch.core.catalog", fromlist=["x"]).builtin_names()),
        f"{leaf}:6: patches[0].options.x: unknown key",
        f"{leaf}:7: profles: unknown key (did you mean 'profiles'?)",
    ]


@pytest.mark.parametrize(("value", "message"), [
    ('""', "must name a base config file, not ''"),
    ('"  "', "must name a base config file, not '  '"),
    (".", "base config {dir} is a folder, not a config file"),
    ("5", "input should be a valid string"),
    ("[a.yaml]", "input should be a valid string"),
])
def test_bad_extends_names_the_file_and_line_of_the_key(write_config, tmp_path, value, message):
    path = write_config(f"""
        version: 1
        patches: []
        extends: {value}
    """)
    assert problems_of(path) == [f"{path}:3: extends: " + message.format(dir=tmp_path)]


def test_an_unreadable_base_is_reported_at_the_extends_key(write_config, tmp_path):
    (tmp_path / "big.yaml").write_bytes(b"#" * ((1 << 20) + 1))
    path = write_config("""
        version: 1
        extends: big.yaml
    """)
    assert problems_of(path) == [
        f"{path}:2: extends: base config {tmp_path / 'big.yaml'}: file is {(1 << 20) + 1} bytes; "
        f"configs are limited to {1 << 20}"]


def test_problems_are_capped(write_config):
    from ascend_patch.core.source import MAX_PROBLEMS

    patches = "".join(f"  - {{name: p{i}, impl: ops.nope}}\n" for i in range(MAX_PROBLEMS + 5))
    path = write_config("version: 1\npatches:\n" + patches)
    problems = problems_of(path)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == f"{path}: 5 more problems not shown"
