"""One process, one config: what the loader writes to the environment is undone by reset(), and
a second apply with other switches is refused like another config."""

import importlib
import os

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError, PatchError
from ascend_patch.core.patcher import PATCHER
from ascend_patch.core.runtime import apply_from_env, reset

from .test_patcher import TOY_HEADER, patch

SET_BY_LOADER = ("ASCEND_PATCH_CONFIG", "ASCEND_PATCH_CONFIG_DIGEST", "ASCEND_PATCH_PROFILE_RESOLVED")


@pytest.fixture
def toy_config(write_config, toy_module):
    return write_config(
        TOY_HEADER + "patches:\n" + patch("func", "FUNCTION", f"{toy_module}:greet")
        + patch("meth", "METHOD", f"{toy_module}:Greeter.greet")
        + "profiles:\n  loud:\n    patches: {func: {options: {prefix: LOUD}}}\n"
        + "  quiet:\n    patches: {func: {options: {prefix: quiet}}}\n"
    )


def loader_vars(env) -> dict:
    return {k: env.get(k) for k in SET_BY_LOADER}


def test_reset_restores_what_the_loader_set_in_os_environ(toy_config, monkeypatch):
    relative = os.path.relpath(toy_config)
    monkeypatch.setenv("ASCEND_PATCH_CONFIG", relative)
    monkeypatch.setenv("ASCEND_PATCH_PROFILE", "loud")
    for key in SET_BY_LOADER[1:]:
        monkeypatch.delenv(key, raising=False)
    apply_from_env()
    assert loader_vars(os.environ) == {
        "ASCEND_PATCH_CONFIG": str(toy_config.resolve()),
        "ASCEND_PATCH_CONFIG_DIGEST": load_config(toy_config).digest,
        "ASCEND_PATCH_PROFILE_RESOLVED": "loud",
    }
    reset()
    assert loader_vars(os.environ) == {"ASCEND_PATCH_CONFIG": relative,
                                       "ASCEND_PATCH_CONFIG_DIGEST": None,
                                       "ASCEND_PATCH_PROFILE_RESOLVED": None}


def test_a_new_config_or_pin_after_reset_works(toy_config, toy_module, write_config):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_PROFILE": "loud"}
    apply_from_env(env)
    reset()
    assert env == {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_PROFILE": "loud"}
    env["ASCEND_PATCH_PROFILE"] = "quiet"  # another pin
    apply_from_env(env)
    assert importlib.import_module(toy_module).greet("a") == "quiet:hello a"
    reset()
    other = write_config(TOY_HEADER + "patches:\n" + patch("f2", "FUNCTION", f"{toy_module}:greet",
                                                           "{prefix: other}"), name="other.yaml")
    env = {"ASCEND_PATCH_CONFIG": str(other)}
    (record,) = apply_from_env(env)
    assert record.status == "applied"
    assert importlib.import_module(toy_module).greet("a") == "other:hello a"


def test_a_failed_apply_leaves_the_environment_as_it_was(toy_config, toy_module):
    importlib.import_module(toy_module)
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_PROFILE": "loud",
           "ASCEND_PATCH_OVERRIDE": "{meth: {fail: true}}"}
    before = dict(env)
    with pytest.raises(PatchError, match="factory asked to fail"):
        apply_from_env(env)
    assert env == before
    assert PATCHER.config is None and PATCHER.installed == []


@pytest.mark.parametrize(("variable", "first", "second"), [
    ("ASCEND_PATCH_OVERRIDE", "{func: {prefix: a}}", "{func: {prefix: b}}"),
    ("ASCEND_PATCH_DISABLE", "meth", "func"),
    ("ASCEND_PATCH_DISABLE", "", "meth"),
])
def test_other_switches_in_the_same_process_are_refused(toy_config, variable, first, second):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), variable: first}
    records = apply_from_env(env)
    assert apply_from_env(dict(env)) == records  # the same again: nothing changes
    with pytest.raises(PatchError) as info:
        apply_from_env({**env, variable: second})
    shown = {"ASCEND_PATCH_OVERRIDE": (second, first),
             "ASCEND_PATCH_DISABLE": (second, first)}[variable]
    assert str(info.value) == (
        f"ascend-patch is already applied in this process with other settings: ${variable} "
        f"{shown[0]!r} (applied: {shown[1]!r}). One process applies one config: start a new "
        "process, or call ascend_patch.core.runtime.reset() first")


def test_other_switches_are_refused_while_waiting_for_the_model(toy_config):
    apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config)})  # profiles: waits for the model
    assert PATCHER.config is None
    with pytest.raises(PatchError, match=r"\$ASCEND_PATCH_OVERRIDE '\{func: \{prefix: x\}\}' "
                                         r"\(applied: ''\)"):
        apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config),
                        "ASCEND_PATCH_OVERRIDE": "{func: {prefix: x}}"})


def test_an_override_for_a_patch_only_a_profile_adds(write_config, toy_module):
    path = write_config(
        TOY_HEADER + "patches: []\nprofiles:\n  extra:\n    add:\n"
        + patch("late", "FUNCTION", f"{toy_module}:greet").replace("  - ", "      - ", 1)
        .replace("\n    ", "\n        ")
    )
    env = {"ASCEND_PATCH_CONFIG": str(path), "ASCEND_PATCH_PROFILE": "extra",
           "ASCEND_PATCH_OVERRIDE": "{late: {prefix: o}}"}
    apply_from_env(env)
    assert importlib.import_module(toy_module).greet("a") == "o:hello a"
    reset()
    with pytest.raises(ConfigError, match=r"late.prefix: input should be a valid string"):
        apply_from_env({**env, "ASCEND_PATCH_OVERRIDE": "{late: {prefix: 3}}"})
