"""`plan` shows what a process started with the same ASCEND_PATCH_* settings applies, and
which setting changed what (issue 24, item 1). Targets are not checked: no vLLM import."""

import json

import pytest

from ascend_patch.cli.main import main

CONFIG = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {drop_token_ratio: 0.1, min_tokens: 0}
  - name: rms
    impl: ops.rms_norm
profiles:
  big:
    patches:
      moe: {options: {drop_policy: position}}
    add:
      - name: act
        impl: ops.silu_and_mul
"""


def plan_json(capsys, path) -> dict:
    assert main(["plan", "--json", "--no-check", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_applies_override_profile_pin_and_disable(capsys, monkeypatch, write_config):
    path = write_config(CONFIG)
    monkeypatch.setenv("ASCEND_PATCH_OVERRIDE", "{moe: {drop_token_ratio: 0.2}}")
    monkeypatch.setenv("ASCEND_PATCH_PROFILE", "big")
    monkeypatch.setenv("ASCEND_PATCH_DISABLE", "rms")
    plan = plan_json(capsys, path)
    assert plan["profile"] == "big"
    moe = plan["patches"][0]
    assert (moe["name"], moe["options"]["drop_token_ratio"], moe["options"]["drop_policy"]) == (
        "moe", 0.2, "position")
    assert [(p["name"], p["status"]) for p in plan["patches"]] == [
        ("moe", "apply (targets not checked)"), ("rms", "off (ASCEND_PATCH_DISABLE)"),
        ("act", "apply (targets not checked)")]
    profile = "$ASCEND_PATCH_PROFILE (profile big)"
    assert plan["changes"] == [
        {"setting": profile, "patch": "moe", "what": "option", "option": "drop_policy",
         "from": "probs", "to": "position"},
        {"setting": profile, "patch": "act", "what": "added", "option": None, "from": None,
         "to": None},
        {"setting": "$ASCEND_PATCH_OVERRIDE", "patch": "moe", "what": "option",
         "option": "drop_token_ratio", "from": 0.1, "to": 0.2},
        {"setting": "$ASCEND_PATCH_DISABLE", "patch": "rms", "what": "off", "option": None,
         "from": None, "to": None},
    ]
    assert main(["plan", "--no-check", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": profile 'big' ($ASCEND_PATCH_PROFILE)")
    assert lines[1:5] == [
        "changed by $ASCEND_PATCH_PROFILE (profile big): moe.drop_policy 'probs' -> 'position'",
        "changed by $ASCEND_PATCH_PROFILE (profile big): act added",
        "changed by $ASCEND_PATCH_OVERRIDE: moe.drop_token_ratio 0.1 -> 0.2",
        "changed by $ASCEND_PATCH_DISABLE: rms off",
    ]


def test_plan_profile_argument_wins_over_the_environment(capsys, monkeypatch, write_config):
    path = write_config(CONFIG.replace("  big:", "  small: {}\n  big:"))
    monkeypatch.setenv("ASCEND_PATCH_PROFILE", "small")
    assert main(["plan", "--json", "--no-check", "--profile", "big", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"] == "big"
    assert {c["setting"] for c in plan["changes"]} == {"--profile (profile big)"}


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("ASCEND_PATCH_OVERRIDE", "{moe: {drop_token_ratio: 0.9}}",
     "$ASCEND_PATCH_OVERRIDE:1: moe.drop_token_ratio: input should be less than or equal to 0.5"),
    ("ASCEND_PATCH_OVERRIDE", "{nope: {x: 1}}",
     "$ASCEND_PATCH_OVERRIDE:1: nope: no patch named 'nope' in {path}"),
    ("ASCEND_PATCH_PROFILE", "huge",
     "$ASCEND_PATCH_PROFILE: names no profile of {path}: 'huge' (profiles: big)"),
    ("ASCEND_PATCH_DISABLE", "rms,zzz",
     "$ASCEND_PATCH_DISABLE: names no patch of {path}: zzz (patches: act, moe, rms)"),
])
def test_plan_refuses_the_settings_the_loader_refuses(capsys, monkeypatch, write_config,
                                                      variable, value, message):
    from ascend_patch.core.errors import ConfigError
    from ascend_patch.core.runtime import apply_from_env

    path = write_config(CONFIG)
    monkeypatch.setenv(variable, value)
    assert main(["plan", "--no-check", str(path)]) == 2
    shown = capsys.readouterr().err.strip()
    assert shown == "invalid ascend-patch config: " + message.format(path=path)
    with pytest.raises(ConfigError) as loader:
        apply_from_env({"ASCEND_PATCH_CONFIG": str(path), variable: value})
    assert str(loader.value) == shown
