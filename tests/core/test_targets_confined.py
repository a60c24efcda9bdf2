"""Targets stay inside vLLM and its platform plugin unless the config opts out; a target module
that does not exist is found without importing anything."""

import sys
import textwrap
import uuid
from importlib import metadata

import pytest

from ascend_patch.cli.main import main
from ascend_patch.core import targets
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError, PatchError
from ascend_patch.core.patcher import PATCHER


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


OUTSIDE = "lies outside vllm, vllm_ascend; set 'allow_external_targets: true' at the top level " \
          "to patch other packages"


def test_a_target_outside_vllm_is_refused(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: rms
            impl: ops.rms_norm
            target: os:system
          - name: act
            impl: ops.silu_and_mul
            target: vllm_ascend.ops.activation:AscendSiluAndMul.forward_oot
    """)
    assert problems_of(path) == [f"{path}:5: patches[0].target: os:system {OUTSIDE}"]


def test_opt_in_allows_other_packages(write_config):
    path = write_config("""
        version: 1
        allow_external_targets: true
        patches:
          - name: rms
            impl: ops.rms_norm
            target: mypkg.layers:Norm.forward
    """)
    assert str(load_config(path).patch("rms").sites[0].target) == "mypkg.layers:Norm.forward"


def test_a_profile_patch_is_confined_too(write_config):
    path = write_config("""
        version: 1
        allow_external_impls: true
        profiles:
          p:
            add:
              - name: toy
                impl: tests.fixtures.toy_impls:FUNCTION
    """)
    # The toy implementation's default target is outside vllm as well.
    assert problems_of(path) == [f"{path}:6: profiles.p.add[0].target: placeholder.module:attr {OUTSIDE}"]


def test_the_opt_in_is_per_file(write_config):
    write_config("version: 1\nallow_external_targets: true\npatches:\n"
                 "  - {name: a, impl: ops.rms_norm, target: 'mypkg.x:f'}\n", name="base.yaml")
    child = write_config("version: 1\nextends: base.yaml\npatches:\n"
                         "  - {name: b, impl: ops.silu_and_mul, target: 'mypkg.y:g'}\n",
                         name="child.yaml")
    assert problems_of(child) == [f"{child}:4: patches[0].target: mypkg.y:g {OUTSIDE}"]


class _EntryPoints:
    def __init__(self, *points):
        self.points = points

    def __call__(self, group):
        return [p for p in self.points if p.group == group]


def test_installed_platform_plugins_are_roots(monkeypatch):
    fake = metadata.EntryPoint("fancy", "vllm_fancy.platform:register", "vllm.platform_plugins")
    monkeypatch.setattr(targets.metadata, "entry_points", _EntryPoints(fake))
    assert targets.allowed_roots({}) == ("vllm", "vllm_ascend", "vllm_fancy")
    # VLLM_PLUGINS limits the plugins vLLM loads, so it limits the roots too.
    assert targets.allowed_roots({"VLLM_PLUGINS": "other"}) == ("vllm", "vllm_ascend")
    assert targets.allowed_roots({"VLLM_PLUGINS": "fancy"}) == ("vllm", "vllm_ascend", "vllm_fancy")


@pytest.fixture
def trap_module(tmp_path, monkeypatch):
    """A module in the current directory that leaves a file behind when it is imported."""
    name = f"trap_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(tmp_path / 'imported')!r}).write_text("yes")

        def greet(name):
            return name
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["plan", "--no-check"]])
def test_validate_and_plan_never_import_a_module_outside(write_config, trap_module, capsys, command):
    path = write_config(f"version: 1\npatches:\n  - {{name: rms, impl: ops.rms_norm, target: '{trap_module}:greet'}}\n")
    assert main([*command, str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: {path}:3: patches[0].target: {trap_module}:greet {OUTSIDE}")
    assert trap_module not in sys.modules
    assert not (path.parent / "imported").exists()


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package whose __init__ leaves a file behind when it runs, with one submodule."""
    name = f"toypkg_{uuid.uuid4().hex[:8]}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'init-ran')!r}).write_text('yes')\n")
    (package / "mod.py").write_text("def greet(name):\n    return 'hello ' + name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def toy_config(write_config, target, on_error="fail"):
    return load_config(write_config(
        "version: 1\nallow_external_impls: true\nallow_external_targets: true\npatches:\n"
        f"  - name: f\n    impl: tests.fixtures.toy_impls:FUNCTION\n    target: {target}\n"
        f"    on_error: {on_error}\n"))


def test_a_missing_target_module_is_an_error_found_without_importing(write_config, toy_package, tmp_path):
    config = toy_config(write_config, f"{toy_package}.gone:greet")
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.path}:5: patch 'f': target {toy_package}.gone:greet: module "
        f"'{toy_package}.gone' does not exist here (no module '{toy_package}.gone' in "
        f"{tmp_path / toy_package})")
    assert toy_package not in sys.modules and not (tmp_path / "init-ran").exists()
    assert PATCHER.config is None
    from ascend_patch.core.imports import WATCHER

    assert WATCHER.watched() == []


def test_an_existing_module_still_waits_for_its_import(write_config, toy_package, tmp_path):
    (record,) = PATCHER.apply(toy_config(write_config, f"{toy_package}.mod:greet"))
    assert record.status == "pending"
    assert toy_package not in sys.modules and not (tmp_path / "init-ran").exists()
    module = __import__(f"{toy_package}.mod", fromlist=["greet"])
    assert module.greet("x") == "patched:hello x"


def test_a_missing_target_module_with_on_error_skip(write_config, toy_package):
    (record,) = PATCHER.apply(toy_config(write_config, f"{toy_package}.mod.deeper:greet", "skip"))
    assert (record.status, record.reason) == (
        "skipped", (f"on_error: skip: target {toy_package}.mod.deeper:greet: module "
        f"'{toy_package}.mod.deeper' does not exist here ('{toy_package}.mod' is a module, not a "
        "package)"))


def test_a_missing_top_level_package(write_config):
    name = f"nopkg_{uuid.uuid4().hex[:8]}"
    config = toy_config(write_config, f"{name}.x:f")
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (f"{config.path}:5: patch 'f': target {name}.x:f: module '{name}.x' "
                               f"does not exist here (no module '{name}' on sys.path)")


def test_validate_reports_a_missing_vllm_module(write_config, capsys):
    path = write_config("version: 1\npatches:\n  - name: rms\n    impl: ops.rms_norm\n"
                        "    target: vllm.model_executor.layers.no_such_layer:RMSNorm.forward_native\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"{path}:3: patches.rms: target vllm.model_executor.layers.no_such_layer:RMSNorm.forward_native: "
        "module 'vllm.model_executor.layers.no_such_layer' does not exist here (no module "
        "'vllm.model_executor.layers.no_such_layer' in ")
    assert err.endswith("vllm/model_executor/layers)")
