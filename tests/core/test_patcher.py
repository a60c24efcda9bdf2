"""Loader semantics on throw-away modules: atomic, idempotent, reversible, lazy, copies."""

import importlib
import sys

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError, PatchError
from ascend_patch.core.patcher import PATCHER
from tests.stack import LINE, OTHER_RANGE, STACK

# The toy implementations and the throw-away modules they patch are outside the catalog and
# outside vllm: both opt-ins are needed.
TOY_HEADER = "version: 1\nallow_external_impls: true\nallow_external_targets: true\n"


def config_for(write_config, *patches: str, name: str = "config.yaml"):
    body = "".join(patches)
    return load_config(write_config(TOY_HEADER + "patches:\n" + body, name))


def patch(name: str, impl: str, target: str, options: str = "{}", on_error: str = "fail") -> str:
    return (
        f"  - name: {name}\n    impl: tests.fixtures.toy_impls:{impl}\n    target: {target}\n"
        f"    options: {options}\n    on_error: {on_error}\n"
    )


def test_eager_patch_keeps_original_reachable_and_reverts(write_config, toy_module):
    module = importlib.import_module(toy_module)
    original = module.greet
    config = config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
    (record,) = PATCHER.apply(config)
    assert record.status == "applied"
    assert module.greet("ann") == "patched:hello ann"
    assert module.greet.__wrapped__ is original
    assert record.context.stats == {"calls": 1}
    PATCHER.revert()
    assert module.greet is original
    assert module.greet("ann") == "hello ann"


def test_applying_twice_changes_nothing(write_config, toy_module):
    module = importlib.import_module(toy_module)
    config = config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
    first = PATCHER.apply(config)
    patched = module.greet
    second = PATCHER.apply(load_config(config.path))
    assert [r.status for r in second] == [r.status for r in first] == ["applied"]
    assert module.greet is patched
    assert module.greet("bo") == "patched:hello bo"


def test_a_second_different_config_is_refused(write_config, toy_module):
    importlib.import_module(toy_module)
    PATCHER.apply(config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:greet")))
    other = config_for(write_config, patch("g", "FUNCTION", f"{toy_module}:greet", "{prefix: x}"), name="b.yaml")
    with pytest.raises(PatchError, match="another config .* is already applied in this process"):
        PATCHER.apply(other)


def test_failure_rolls_back_every_earlier_patch(write_config, toy_module):
    module = importlib.import_module(toy_module)
    original_greet, original_method = module.greet, module.Greeter.greet
    config = config_for(
        write_config,
        patch("first", "FUNCTION", f"{toy_module}:greet"),
        patch("second", "METHOD", f"{toy_module}:Greeter.greet", "{fail: true}"),
    )
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.path}:10: patch 'second': tests.fixtures.toy_impls:make_prefixer failed: "
        "RuntimeError: factory asked to fail"
    )
    assert module.greet is original_greet
    assert module.Greeter.greet is original_method
    assert PATCHER.config is None and PATCHER.installed == []


def test_on_error_skip_keeps_the_others(write_config, toy_module):
    module = importlib.import_module(toy_module)
    config = config_for(
        write_config,
        patch("first", "FUNCTION", f"{toy_module}:greet"),
        patch("second", "METHOD", f"{toy_module}:Greeter.greet", "{fail: true}", on_error="skip"),
    )
    records = PATCHER.apply(config)
    assert [(r.name, r.status) for r in records] == [("first", "applied"), ("second", "skipped")]
    assert records[1].reason == (
        "on_error: skip: tests.fixtures.toy_impls:make_prefixer failed: RuntimeError: factory asked to fail"
    )
    assert module.greet("c") == "patched:hello c"
    assert module.Greeter().greet("c") == "hi c"


def test_signature_mismatch_shows_both(write_config, toy_module):
    importlib.import_module(toy_module)
    config = config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:greet_changed"))
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.path}:5: patch 'f': target {toy_module}:greet_changed has signature (name, loud), "
        "but toy.function expects (name); the installed vLLM changed it, so the patch is refused"
    )


def test_vllm_version_outside_range_is_refused(write_config, toy_module):
    importlib.import_module(toy_module)
    config = config_for(write_config, patch("old", "ANCIENT", f"{toy_module}:greet"))
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value).endswith(
        f"patch 'old': toy.ancient declares no sites for vLLM {LINE} on platform vllm "
        "(lines it patches there: 0.1)")


def test_config_level_vllm_range(write_config, toy_module):
    importlib.import_module(toy_module)
    path = write_config(
        f"version: 1\nvllm: '{OTHER_RANGE}'\nallow_external_impls: true\n"
        "allow_external_targets: true\npatches:\n"
        + patch("f", "FUNCTION", f"{toy_module}:greet", on_error="skip")
    )
    (record,) = PATCHER.apply(load_config(path))
    assert record.status == "skipped"
    assert record.reason == (
        f"on_error: skip: {STACK.vllm} is outside '{OTHER_RANGE}' required by {path}")


def test_config_range_admitting_no_supported_line_is_a_config_error(write_config):
    path = write_config("version: 1\nvllm: '>=0.40'\npatches: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:2: vllm: '>=0.40' admits no supported vLLM line "
        "(supported: 0.13.x, 0.18.x, 0.23.x, 0.32.x, 0.33.x, 0.34.x)"]


def test_inherited_method_is_shadowed_then_removed(write_config, toy_module):
    module = importlib.import_module(toy_module)
    config = config_for(write_config, patch("m", "METHOD", f"{toy_module}:Loud.greet"))
    PATCHER.apply(config)
    assert module.Loud().greet("d") == "patched:hi d"
    assert module.Greeter().greet("d") == "hi d"
    PATCHER.revert()
    assert "greet" not in vars(module.Loud)
    assert module.Loud().greet("d") == "hi d"


def test_lazy_patch_applies_when_the_module_is_first_imported(write_config, toy_module):
    config = config_for(write_config, patch("m", "METHOD", f"{toy_module}:Greeter.greet"))
    (record,) = PATCHER.apply(config)
    assert toy_module not in sys.modules, "applying must not import the target"
    assert record.status == "pending"
    module = importlib.import_module(toy_module)
    assert record.status == "applied"
    assert module.Greeter().greet("e") == "patched:hi e"


def test_lazy_failure_fails_the_import_with_the_loaders_message(write_config, toy_module):
    config = config_for(write_config, patch("m", "METHOD", f"{toy_module}:Greeter.greet", "{fail: true}"))
    PATCHER.apply(config)
    with pytest.raises(PatchError, match="patch 'm': .*factory asked to fail"):
        importlib.import_module(toy_module)
    assert toy_module not in sys.modules


def test_revert_cancels_pending_patches(write_config, toy_module):
    config = config_for(write_config, patch("m", "METHOD", f"{toy_module}:Greeter.greet"))
    PATCHER.apply(config)
    PATCHER.revert()
    module = importlib.import_module(toy_module)
    assert module.Greeter().greet("f") == "hi f"


def test_from_import_copies_are_patched_and_restored(write_config, toy_module, tmp_path):
    user = f"{toy_module}_user"
    (tmp_path / f"{user}.py").write_text(f"from {toy_module} import greet\n")
    user_module = importlib.import_module(user)
    try:
        original = user_module.greet
        config = config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
        (record,) = PATCHER.apply(config)
        assert record.copies == [f"{user}.greet"]
        assert user_module.greet("g") == "patched:hello g"
        PATCHER.revert()
        assert user_module.greet is original
    finally:
        sys.modules.pop(user, None)


def test_multi_site_patch_applies_both(write_config, toy_module):
    module = importlib.import_module(toy_module)
    path = write_config(
        TOY_HEADER + "patches:\n"
        "  - name: both\n    impl: tests.fixtures.toy_impls:TWO_SITES\n"
        f"    target: {{function: '{toy_module}:greet', method: '{toy_module}:Greeter.greet'}}\n"
    )
    (record,) = PATCHER.apply(load_config(path))
    assert record.applied_roles == ["function", "method"]
    assert (module.greet("h"), module.Greeter().greet("h")) == ("patched:hello h", "patched:hi h")


def test_a_patch_is_applied_without_its_optional_sites(write_config, toy_module, tmp_path):
    """An optional site (a quantization method's module, say) waits for its module; the
    patch is applied meanwhile, and stays applied once that module arrives."""
    module = importlib.import_module(toy_module)
    later = f"{toy_module}_later"
    (tmp_path / f"{later}.py").write_text(
        "class Greeter:\n    def greet(self, name):\n        return 'hi ' + name\n")
    path = write_config(
        TOY_HEADER + "patches:\n"
        "  - name: opt\n    impl: tests.fixtures.toy_impls:WITH_OPTIONAL\n"
        f"    target: {{function: '{toy_module}:greet', method: '{later}:Greeter.greet'}}\n"
    )
    try:
        (record,) = PATCHER.apply(load_config(path))
        assert later not in sys.modules
        assert (record.status, record.applied_roles) == ("applied", ["function"])
        assert module.greet("i") == "patched:hello i"
        imported = importlib.import_module(later)
        assert (record.status, record.applied_roles) == ("applied", ["function", "method"])
        assert imported.Greeter().greet("i") == "patched:hi i"
    finally:
        sys.modules.pop(later, None)


def test_missing_target_attribute(write_config, toy_module):
    importlib.import_module(toy_module)
    config = config_for(write_config, patch("f", "FUNCTION", f"{toy_module}:Greeter.nope"))
    with pytest.raises(PatchError, match=f"target {toy_module}:Greeter.nope: class {toy_module}.Greeter has no attribute 'nope'"):
        PATCHER.apply(config)
