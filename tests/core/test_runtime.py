"""Start-up from the environment: switches, digest pinning, reports, zero cost when unset."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from tests.stack import STACK

from ascend_patch.core import report
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError, ConsistencyError
from ascend_patch.core.runtime import apply_from_env

from .test_patcher import TOY_HEADER, patch


@pytest.fixture
def toy_config(write_config, toy_module):
    return write_config(
        TOY_HEADER + "patches:\n"
        + patch("func", "FUNCTION", f"{toy_module}:greet")
        + patch("meth", "METHOD", f"{toy_module}:Greeter.greet")
    )


def test_unset_config_does_nothing():
    assert apply_from_env({}) is None


def test_disable_switch_names_patches(toy_config, toy_module):
    records = apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_DISABLE": "meth"})
    assert [(r.name, r.status, r.reason) for r in records] == [
        ("func", "pending", ""), ("meth", "disabled", "ASCEND_PATCH_DISABLE")]
    module = importlib.import_module(toy_module)
    assert (module.greet("a"), module.Greeter().greet("a")) == ("patched:hello a", "hi a")


def test_disable_star_turns_everything_off(toy_config):
    records = apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_DISABLE": "*"})
    assert [r.status for r in records] == ["disabled", "disabled"]


def test_disable_with_unknown_name_is_an_error(toy_config):
    with pytest.raises(ConfigError) as info:
        apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_DISABLE": "func,mehh"})
    assert str(info.value) == (
        f"invalid ascend-patch config: $ASCEND_PATCH_DISABLE: names no patch of {toy_config}: mehh "
        "(patches: func, meth)"
    )


def test_child_reading_a_changed_file_refuses_to_start(toy_config):
    with pytest.raises(ConsistencyError, match="the file changed after the first process read it"):
        apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_CONFIG_DIGEST": "0" * 64})


def test_first_process_pins_path_and_digest_for_children(toy_config, monkeypatch):
    monkeypatch.setenv("ASCEND_PATCH_CONFIG", os.path.relpath(toy_config))
    monkeypatch.delenv("ASCEND_PATCH_CONFIG_DIGEST", raising=False)
    apply_from_env()
    assert os.environ["ASCEND_PATCH_CONFIG"] == str(toy_config.resolve())
    assert os.environ["ASCEND_PATCH_CONFIG_DIGEST"] == load_config(toy_config).digest


def test_report_file_lists_every_patch(toy_config, toy_module, tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_PATCH_REPORT_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("ASCEND_PATCH_CONFIG", str(toy_config))
    monkeypatch.delenv("ASCEND_PATCH_CONFIG_DIGEST", raising=False)
    apply_from_env()
    module = importlib.import_module(toy_module)  # applies both lazily and rewrites the report
    module.greet("z")
    report.flush()
    (data,) = report.read_reports(tmp_path / "reports")
    assert data["pid"] == os.getpid()
    assert (data["label"], data["role"], data["process"]) == ("main", "main", "MainProcess")
    assert (data["dp_rank"], data["tp_rank"], data["ep_rank"], data["node_rank"]) == (None,) * 4
    assert data["vllm"] == str(STACK.vllm)
    assert (data["vllm_line"], data["platform"]) == (STACK.line, "vllm")
    assert [(p["name"], p["status"], p["stats"]) for p in data["patches"]] == [
        ("func", "applied", {"calls": 1}), ("meth", "applied", {"calls": 0})]
    assert data["waiting_for_import"] == []


def test_plugin_with_config_unset_imports_nothing_else():
    code = (
        "import sys; from ascend_patch.plugin import register; register(); "
        "print(sorted(m for m in sys.modules if m.startswith(('ascend_patch', 'pydantic', 'yaml', 'torch'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_PATCH")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == ["ascend_patch", "ascend_patch.plugin"]


def test_plugin_logs_and_raises_on_a_bad_config(write_config):
    bad = write_config("version: 1\npatches:\n  - name: x\n    impl: nope\n")
    env = {**os.environ, "ASCEND_PATCH_CONFIG": str(bad)}
    code = "from ascend_patch.plugin import register; register()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 1
    expected = f"{bad}:4: patches[0].impl: unknown implementation 'nope'"
    assert expected in out.stderr.splitlines()[0]
    assert "ConfigError" in out.stderr


def test_option_override_from_the_environment(toy_config, toy_module):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_OVERRIDE": "{func: {prefix: armB}}"}
    apply_from_env(env)
    module = importlib.import_module(toy_module)
    assert module.greet("q") == "armB:hello q"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("{nope: {prefix: x}}", "$ASCEND_PATCH_OVERRIDE:1: nope: no patch named 'nope' in {path}"),
        ("{func: {prefix: 3}}", "$ASCEND_PATCH_OVERRIDE:1: func.prefix: input should be a valid string"),
        ("{func: {colour: red}}", "$ASCEND_PATCH_OVERRIDE:1: func.colour: unknown key"),
        ("[1, 2]", "$ASCEND_PATCH_OVERRIDE:1: must be a mapping {patch name: {option: value}}"),
    ],
)
def test_bad_option_override(toy_config, override, message):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_OVERRIDE": override}
    with pytest.raises(ConfigError) as info:
        apply_from_env(env)
    assert str(info.value) == "invalid ascend-patch config: " + message.replace("{path}", str(toy_config))


def test_report_is_rewritten_in_the_background(toy_config, toy_module, tmp_path):
    code = f"""
import importlib, json, os, sys, time
sys.path.insert(0, {str(toy_config.parent)!r})
from ascend_patch.core.runtime import apply_from_env
apply_from_env()
module = importlib.import_module({toy_module!r})
for _ in range(3):
    module.greet("x")
directory = os.environ["ASCEND_PATCH_REPORT_DIR"]
deadline = time.monotonic() + 20
calls = None
while calls != 3 and time.monotonic() < deadline:
    time.sleep(0.1)
    (path,) = [p for p in os.listdir(directory) if p.endswith(".json") and not p.startswith(".")]
    calls = json.load(open(os.path.join(directory, path)))["patches"][0]["stats"]["calls"]
print(calls)
os._exit(0)  # no atexit: only the background writer can have written the 3 calls
"""
    env = {**os.environ, "ASCEND_PATCH_CONFIG": str(toy_config),
           "ASCEND_PATCH_REPORT_DIR": str(tmp_path / "reports"), "ASCEND_PATCH_REPORT_INTERVAL": "0.2",
           "PYTHONPATH": os.pathsep.join([str(toy_config.parent), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_bad_report_interval_is_a_clear_error(toy_config, tmp_path):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_REPORT_DIR": str(tmp_path / "r"),
           "ASCEND_PATCH_REPORT_INTERVAL": "often"}
    with pytest.raises(ConfigError) as info:
        apply_from_env(env)
    assert str(info.value) == (
        "invalid ascend-patch config: $ASCEND_PATCH_REPORT_INTERVAL: 'often' is not a number of "
        "seconds: 0 (no periodic rewrite) or 0.05 to 86400")
    from ascend_patch.core.patcher import PATCHER

    assert PATCHER.config is None and PATCHER.installed == []
    assert env == {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_REPORT_DIR": str(tmp_path / "r"),
                   "ASCEND_PATCH_REPORT_INTERVAL": "often"}
    assert not (tmp_path / "r").exists()


def test_vllms_compile_cache_key_covers_what_is_patched(toy_config):
    """A VllmConfig built after the first process applied a config carries the deployment's
    patch identity in additional_config, which vLLM's compile-cache hash covers: a graph
    compiled without the patches (or with others) is never loaded for this deployment."""
    from vllm.config import VllmConfig

    from ascend_patch import __version__

    unpatched = VllmConfig().compute_hash()
    env = {"ASCEND_PATCH_CONFIG": str(toy_config)}
    apply_from_env(env)
    config = VllmConfig()
    assert config.additional_config == {"ascend_patch": {
        "version": __version__, "config_sha256": load_config(toy_config).digest,
        "profile": "-", "override_sha256": None, "disable": ""}}
    patched = config.compute_hash()
    assert patched != unpatched
    from ascend_patch.core.runtime import reset

    reset()
    apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_DISABLE": "meth"})
    other = VllmConfig()
    assert other.additional_config["ascend_patch"]["disable"] == "meth"
    assert other.compute_hash() not in (patched, unpatched)
    reset()
    assert VllmConfig().compute_hash() == unpatched
