import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """A fresh, not yet imported module with a function and a class; returns its name."""
    name = f"toy_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        def greet(name):
            return "hello " + name

        class Greeter:
            def greet(self, name):
                return "hi " + name

        class Loud(Greeter):
            pass

        def greet_changed(name, loud):
            return name
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _revert_patches():
    # apply_from_env pins path, digest and profile in os.environ for child processes:
    # restore them so that no test sees another's.
    saved = {k: v for k, v in os.environ.items() if k.startswith("ASCEND_PATCH_")}
    yield
    from ascend_patch.core.runtime import reset

    reset()  # first: it puts back what the loader replaced, which the lines below then drop
    for key in [k for k in os.environ if k.startswith("ASCEND_PATCH_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny DeepseekV3-shaped MoE model directory (config + tokenizer; dummy weights)."""
    from ascend_patch.harness.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_deepseek_v3"), "deepseek_v3")


@pytest.fixture
def ascend_logs(caplog, monkeypatch):
    """caplog for the `ascend_patch` logger, which keeps its own handler and does not
    propagate once the loader configured it: let it propagate for the test."""
    import logging

    from ascend_patch.core.runtime import _configure_logging

    _configure_logging()
    monkeypatch.setattr(logging.getLogger("ascend_patch"), "propagate", True)
    return caplog


# The suite's tiers (ascend_patch/core/stacks.py says which run in which environment):
#   unit      imports no vLLM: runs once, in the primary environment (a guard below checks it)
#   contract  imports vLLM or reads real upstream source, starts no engine: every environment
#             with a CPU stack
#   ascend    the contract tests of tests/ascend only: environments built for a vllm-ascend
#             release alone (its vLLM line has no CPU stack here)
#   e2e       starts engines or servers (marker `vllm`): the primary environment
#   smoke     the one server test (marker `smoke`) each other CPU environment runs
#   slow      multi-node launches and studies (marker `slow`): only with `-m slow`
# A contract test marked `once` does not depend on the installed line (it reads every declared
# source statically, or checks our own code over gloo, which other tests also run on every
# line): only the primary environment runs it.
# A test module is unit when listed here; otherwise contract unless marked (a test of a unit
# module that needs vLLM is marked `contract`).
UNIT = (
    "tests/moe/test_capacity.py",
    "tests/moe/test_capacity_properties.py",
    "tests/moe/test_planner_edges.py",
    "tests/moe/test_sync_free.py",
    "tests/moe/test_backends.py",
    "tests/moe/test_npu_backend.py",
    "tests/moe/test_fused_mc2_overflow.py",
    "tests/core/test_static_targets.py",
    "tests/core/test_source.py",
    "tests/core/test_probe.py",
    "tests/ascend/test_dispatch_rules.py",
    "tests/ascend/test_quant_ops.py",
    "tests/bench/",
    "tests/test_fuzz.py",
    "tests/cli/test_ab.py",
    "tests/cli/test_ab_server.py",
    "tests/cli/test_cli_args.py",
    "tests/cli/test_render.py",
    "tests/cli/test_plan_quantization.py",
    "tests/cli/test_plan_settings.py",
    "tests/cli/test_schema.py",
    "tests/core/test_config.py",
    "tests/core/test_profiles.py",
    "tests/core/test_settings.py",
    "tests/core/test_metrics.py",
    "tests/core/test_report_faults.py",
    "tests/core/test_runtime_state.py",
    "tests/core/test_session.py",
    "tests/core/test_targets_confined.py",
    "tests/core/test_lab_apart.py",
    "tests/core/test_stacks.py",
    "tests/core/test_upstream.py",
    "tests/core/test_attribute_audit.py",
    "tests/moe/test_stats.py",
    "tests/moe/test_multirank.py",
    "tests/ascend/test_prod_profile.py",
    "tests/test_docs.py",
    "tests/test_layers.py",
    "tests/test_light_venv.py",
    "tests/moe/test_layout.py",
    "tests/moe/test_planner_hook.py",
    "tests/moe/test_triton_route.py",
)
TIERS = ("unit", "contract", "ascend", "e2e", "smoke", "slow")
ASCEND = "tests/ascend/"


def tier_of(item) -> str:
    if item.get_closest_marker("slow"):
        return "slow"
    if item.get_closest_marker("vllm"):
        return "e2e"
    if item.get_closest_marker("contract"):
        return "contract"
    path = Path(item.fspath).relative_to(REPO).as_posix()
    return "unit" if path.startswith(UNIT) else "contract"


def in_ascend(item) -> bool:
    return Path(item.fspath).relative_to(REPO).as_posix().startswith(ASCEND)


def pytest_addoption(parser):
    parser.addoption("--tier", action="append", choices=TIERS, default=[],
                     help="run only the tests of this tier (repeatable); default: every tier "
                     "but slow")


def pytest_ignore_collect(collection_path, config):
    # The unit tier does not even import the other modules: collecting them would import vLLM
    # (some do at module level) and make the guard below meaningless.
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    path = collection_path.relative_to(REPO).as_posix()
    if config.getoption("--tier") == ["unit"]:
        return not path.startswith(UNIT)
    if config.getoption("--tier") == ["ascend"]:  # the other modules import this line's vLLM
        return not path.startswith(ASCEND)
    return None


def pytest_collection_modifyitems(config, items):
    tiers = set(config.getoption("--tier"))
    if not tiers:
        return
    keep, drop = [], []
    for item in items:
        tier = tier_of(item)
        wanted = tier in tiers or ("smoke" in tiers and item.get_closest_marker("smoke")) or (
            "ascend" in tiers and tier == "contract" and in_ascend(item))
        if wanted and item.get_closest_marker("once"):
            from tests.stack import IS_PRIMARY  # imported only where a `once` test is wanted

            wanted = IS_PRIMARY
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    # Unit tests promise to run without vLLM: hold them to it, or the tier lies about what it
    # needs (and about running once being enough).
    if session.config.getoption("--tier") == ["unit"] and "vllm" in sys.modules:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "unit tier imported vllm: move the test module that did to the contract tier "
            "(tests/conftest.py UNIT)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
