"""`extends` chains and per-model profiles: merging, validation with lines, selection."""

import importlib

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError
from ascend_patch.core.profiles import ModelInfo, select
from ascend_patch.core.runtime import apply_from_env

BASE = """
version: 1
allow_external_impls: true
allow_external_targets: true
patches:
  - name: greet
    impl: tests.fixtures.toy_impls:FUNCTION
    target: {module}:greet
    options: {{prefix: base}}
profiles:
  deepseek:
    match: {{architectures: [DeepseekV3ForCausalLM]}}
    patches:
      greet: {{options: {{prefix: ds}}}}
  mixtral:
    match: {{model: "*Mixtral*"}}
    patches:
      greet: {{enabled: false}}
  manual:
    add:
      - name: meth
        impl: tests.fixtures.toy_impls:METHOD
        target: {module}:Greeter.greet
"""


@pytest.fixture
def base_config(write_config, toy_module):
    return write_config(BASE.format(module=toy_module), name="base.yaml")


def errors(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_profiles_are_planned_at_load_time(base_config):
    config = load_config(base_config)
    assert config.patch("greet").options.prefix == "base"
    assert config.with_profile("deepseek").patch("greet").options.prefix == "ds"
    assert config.with_profile("mixtral").patch("greet").enabled is False
    assert [p.name for p in config.with_profile("manual").patches] == ["greet", "meth"]


def test_extends_overrides_by_name_relative_to_the_file(base_config, write_config, tmp_path):
    (tmp_path / "fleet").mkdir()
    child = tmp_path / "fleet" / "child.yaml"
    child.write_text(
        "version: 1\nextends: ../base.yaml\nprofiles:\n  deepseek:\n"
        "    match: {architectures: [DeepseekV3ForCausalLM]}\n"
        "    patches: {greet: {options: {prefix: child}}}\n"
    )
    config = load_config(child)
    assert config.files == (str(base_config.resolve()), str(child))
    assert config.patch("greet").options.prefix == "base"
    assert config.with_profile("deepseek").patch("greet").options.prefix == "child"
    assert set(config.profiles) == {"deepseek", "mixtral", "manual"}
    assert config.digest != load_config(base_config).digest


def test_extends_cycle_is_refused(write_config):
    a = write_config("version: 1\nextends: b.yaml\n", name="a.yaml")
    b = write_config("version: 1\nextends: a.yaml\n", name="b.yaml")
    (problem,) = errors(a)
    assert problem == (
        f"{a.resolve()}:2: extends: extends cycle: {a.resolve()} -> {b.resolve()} -> {a.resolve()}"
    )


def test_missing_base(write_config):
    child = write_config("version: 1\nextends: nowhere.yaml\n")
    assert errors(child) == [f"{child}:2: extends: base config {child.parent / 'nowhere.yaml'} not found"]


def test_error_in_a_base_names_the_base_file(write_config):
    write_config("version: 1\npatches:\n  - name: x\n    impl: ops.nope\n", name="base.yaml")
    child = write_config("version: 1\nextends: base.yaml\n", name="child.yaml")
    (problem,) = errors(child)
    assert problem.startswith(f"{child.parent.resolve() / 'base.yaml'}:4: patches[0].impl: unknown implementation 'ops.nope'")


def test_profile_option_errors_point_at_the_profile(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: moe
            impl: moe.capacity
            options: {drop_token_ratio: 0.05}
        profiles:
          risky:
            patches:
              moe:
                options:
                  drop_token_ratio: 1.5
    """)
    assert errors(path) == [
        f"{path}:11: profiles.risky.patches.moe.options.drop_token_ratio: input should be less than or equal to 0.5"
    ]


def test_profile_override_of_unknown_patch(write_config):
    path = write_config("version: 1\nprofiles:\n  p:\n    patches: {ghost: {enabled: false}}\n")
    assert errors(path) == [f"{path}:4: profiles.p.patches.ghost: no base patch named 'ghost' to override"]


def test_selection_by_architecture_glob_and_none(base_config):
    config = load_config(base_config)
    assert select(config, ModelInfo("/m/ds", ("DeepseekV3ForCausalLM",)), None) == "deepseek"
    assert select(config, ModelInfo("mistralai/Mixtral-8x7B", ("MixtralForCausalLM",)), None) == "mixtral"
    assert select(config, ModelInfo("Qwen/Qwen3-30B-A3B", ("Qwen3MoeForCausalLM",)), None) is None


def test_ambiguous_match_is_an_error(base_config):
    config = load_config(base_config)
    with pytest.raises(ConfigError, match="matches several profiles: deepseek, mixtral"):
        select(config, ModelInfo("org/Mixtral-DS", ("DeepseekV3ForCausalLM",)), None)


def test_pinned_profile_on_a_model_it_does_not_match(base_config):
    config = load_config(base_config)
    with pytest.raises(ConfigError) as info:
        select(config, ModelInfo("Qwen/Qwen3", ("Qwen3MoeForCausalLM",)), "deepseek")
    assert str(info.value) == (
        f"invalid ascend-patch config: {base_config}:10: profiles.deepseek: pinned by "
        "ASCEND_PATCH_PROFILE but does not match model 'Qwen/Qwen3' (architectures: "
        "Qwen3MoeForCausalLM); its match is {'architectures': ['DeepseekV3ForCausalLM']}. "
        "Set 'allow_unmatched: true' in the profile to allow this"
    )
    # A profile without `match` is for pinning by hand on anything.
    assert select(config, ModelInfo("Qwen/Qwen3", ()), "manual") == "manual"


def test_pinned_profile_applies_at_once(base_config, toy_module):
    env = {"ASCEND_PATCH_CONFIG": str(base_config), "ASCEND_PATCH_PROFILE": "manual"}
    records = apply_from_env(env)
    assert [r.name for r in records] == ["greet", "meth"]
    assert env["ASCEND_PATCH_PROFILE_RESOLVED"] == "manual"
    module = importlib.import_module(toy_module)
    assert module.Greeter().greet("x") == "patched:hi x"


def test_child_uses_the_parents_choice(base_config, toy_module):
    env = {"ASCEND_PATCH_CONFIG": str(base_config), "ASCEND_PATCH_PROFILE_RESOLVED": "deepseek"}
    apply_from_env(env)
    module = importlib.import_module(toy_module)
    assert module.greet("y") == "ds:hello y"


def test_unknown_pinned_profile(base_config):
    with pytest.raises(ConfigError, match=r"\$ASCEND_PATCH_PROFILE: names no profile of .*: 'nope' \(profiles: deepseek, mixtral, manual\)"):
        apply_from_env({"ASCEND_PATCH_CONFIG": str(base_config), "ASCEND_PATCH_PROFILE": "nope"})


def test_auto_selection_waits_for_the_model(base_config):
    env = {"ASCEND_PATCH_CONFIG": str(base_config)}
    assert apply_from_env(env) == []
    assert "ASCEND_PATCH_PROFILE_RESOLVED" not in env
