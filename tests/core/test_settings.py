"""Every ASCEND_PATCH_* variable is validated up front, with errors naming the variable."""

import logging
import os
import subprocess
import sys

import pytest

from ascend_patch.core.errors import ConfigError
from ascend_patch.core.patcher import PATCHER
from ascend_patch.core.runtime import apply_from_env
from ascend_patch.core.settings import MAX_OVERRIDE_BYTES, Settings

from .test_patcher import TOY_HEADER, patch

RANGE = "seconds: 0 (no periodic rewrite) or 0.05 to 86400"


@pytest.fixture
def toy_config(write_config, toy_module):
    return write_config(TOY_HEADER + "patches:\n" + patch("func", "FUNCTION", f"{toy_module}:greet"))


def refusal(env) -> str:
    with pytest.raises(ConfigError) as info:
        apply_from_env(env)
    assert PATCHER.config is None and PATCHER.installed == []
    return str(info.value).removeprefix("invalid ascend-patch config: ")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("LOG_LEVEL", "LOUD", "unknown level 'LOUD' (levels: DEBUG, INFO, WARNING, ERROR, CRITICAL)"),
    ("LOG_LEVEL", "5", "unknown level '5' (levels: DEBUG, INFO, WARNING, ERROR, CRITICAL)"),
    ("PROFILE", "two words", ("'two words' is not a profile name (it must match "
                             "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$)")),
    ("PROFILE_RESOLVED", "../x", ("'../x' is not a profile name; the first process sets it for "
                                 "its children, do not set it yourself")),
    ("CONFIG_DIGEST", "abc", ("'abc' is not a sha256 digest (64 lower-case hex digits); the "
                             "first process sets it for its children, do not set it yourself")),
    ("DISABLE", "a,b c,*", "'b c': not a patch name; give name1,name2 or *"),
    ("REPORT_INTERVAL", "nan", f"'nan' is out of range; give a number of {RANGE}"),
    ("REPORT_INTERVAL", "inf", f"'inf' is out of range; give a number of {RANGE}"),
    ("REPORT_INTERVAL", "-1", f"'-1' is out of range; give a number of {RANGE}"),
    ("REPORT_INTERVAL", "1e-9", f"'1e-9' is out of range; give a number of {RANGE}"),
    ("REPORT_INTERVAL", "1e9", f"'1e9' is out of range; give a number of {RANGE}"),
    ("REPORT_INTERVAL", "soon", f"'soon' is not a number of {RANGE}"),
    ("METRICS_DIR", "metrics", "'metrics' is not an absolute path"),
    ("OVERRIDE", "a: &a [*a]", None),
    ("OVERRIDE", "{func: !!python/object/apply:os.system [ls]}", None),
    ("OVERRIDE", "x" * (MAX_OVERRIDE_BYTES + 1), (f"the value is {MAX_OVERRIDE_BYTES + 1} bytes; an "
                 f"override is limited to {MAX_OVERRIDE_BYTES} (put larger changes in a config file)")),
])
def test_a_bad_value_names_its_variable(toy_config, name, value, message):
    expected = {
        "a: &a [*a]": "$ASCEND_PATCH_OVERRIDE:1: a[0]: recursive alias *a: it refers to a node "
                      "that contains it",
        "{func: !!python/object/apply:os.system [ls]}":
            "$ASCEND_PATCH_OVERRIDE:1: func: tag 'tag:yaml.org,2002:python/object/apply:os.system' "
            "is not allowed",
    }.get(value) or f"$ASCEND_PATCH_{name}: {message}"
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), f"ASCEND_PATCH_{name}": value}
    assert refusal(env) == expected
    assert env == {"ASCEND_PATCH_CONFIG": str(toy_config), f"ASCEND_PATCH_{name}": value}


def test_every_bad_variable_at_once(toy_config):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_LOG_LEVEL": "x",
           "ASCEND_PATCH_REPORT_INTERVAL": "x", "ASCEND_PATCH_PROFILE": "?"}
    assert refusal(env).splitlines() == [
        "invalid ascend-patch config (3 problems):",
        "  $ASCEND_PATCH_LOG_LEVEL: unknown level 'x' (levels: DEBUG, INFO, WARNING, ERROR, CRITICAL)",
        ("  $ASCEND_PATCH_PROFILE: '?' is not a profile name (it must match "
        "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$)"),
        f"  $ASCEND_PATCH_REPORT_INTERVAL: 'x' is not a number of {RANGE}",
    ]


def test_override_that_is_not_utf8(toy_config, monkeypatch):
    monkeypatch.setenv("ASCEND_PATCH_CONFIG", str(toy_config))
    os.environb[b"ASCEND_PATCH_OVERRIDE"] = b"{func: {prefix: caf\xe9}}"
    try:
        assert refusal(None) == (
            "$ASCEND_PATCH_OVERRIDE:1: not UTF-8 text (byte 0xe9: invalid continuation byte)")
    finally:
        del os.environb[b"ASCEND_PATCH_OVERRIDE"]


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("0.05", 0.05), (" 2 ", 2.0),
                                                ("86400", 86400.0), ("", 1.0)])
def test_report_interval_in_range(value, seconds):
    assert Settings.from_environ({"ASCEND_PATCH_REPORT_INTERVAL": value}).report_interval == seconds


@pytest.mark.parametrize(("value", "level"), [("debug", logging.DEBUG), ("Warn", logging.WARNING),
                                              ("", logging.INFO)])
def test_log_level(toy_config, value, level):
    apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_LOG_LEVEL": value})
    assert logging.getLogger("ascend_patch").level == level


def test_an_unknown_variable_gets_one_warning_naming_the_close_match(toy_config, ascend_logs):
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_REPORTDIR": "/tmp/x",
           "ASCEND_PATCH_WHATEVER": "1"}
    with ascend_logs.at_level(logging.WARNING, logger="ascend_patch"):
        apply_from_env(env)
        apply_from_env(env)  # the same process again: no second warning
    pid = os.getpid()
    assert [r.getMessage() for r in ascend_logs.records] == [
        (f"ascend-patch [MainProcess pid {pid}]: $ASCEND_PATCH_REPORTDIR is not an ascend-patch "
        "variable and is ignored (did you mean ASCEND_PATCH_REPORT_DIR?)"),
        (f"ascend-patch [MainProcess pid {pid}]: $ASCEND_PATCH_WHATEVER is not an ascend-patch "
        "variable and is ignored (known: ASCEND_PATCH_CONFIG, ASCEND_PATCH_CONFIG_DIGEST, "
        "ASCEND_PATCH_DISABLE, ASCEND_PATCH_PROFILE, ASCEND_PATCH_PROFILE_RESOLVED, "
        "ASCEND_PATCH_OVERRIDE, ASCEND_PATCH_REPORT_DIR, ASCEND_PATCH_REPORT_INTERVAL, "
        "ASCEND_PATCH_LOG_LEVEL, ASCEND_PATCH_METRICS_DIR)"),
    ]


def test_plugin_warns_about_a_misspelt_config_variable(toy_config):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_PATCH_")}
    env["ASCEND_PATCH_CONFG"] = str(toy_config)
    code = "from ascend_patch.plugin import register; register()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0
    assert out.stderr.strip().endswith(
        "$ASCEND_PATCH_CONFG is not an ascend-patch variable and is ignored (did you mean "
        "ASCEND_PATCH_CONFIG?)")


def test_settings_come_from_the_mapping_given(toy_config, toy_module, tmp_path, monkeypatch):
    """apply_from_env(env) reads every variable from env, not from os.environ."""
    monkeypatch.setenv("ASCEND_PATCH_REPORT_DIR", str(tmp_path / "from-os-environ"))
    monkeypatch.setenv("ASCEND_PATCH_DISABLE", "*")
    env = {"ASCEND_PATCH_CONFIG": str(toy_config), "ASCEND_PATCH_REPORT_DIR": str(tmp_path / "given")}
    (record,) = apply_from_env(env)
    assert record.status == "pending"
    assert [p.name for p in (tmp_path / "given").glob("*.json")] == [f"main-{os.getpid()}.json"]
    assert not (tmp_path / "from-os-environ").exists()
