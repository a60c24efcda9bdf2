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


# Test modules whose outcome does not depend on the installed vLLM line (the planner, YAML,
# static source reading, fuzzing): scripts/test.sh runs them on the first line only and passes
# --skip-line-free on the others, which keeps the whole CI run inside its time budget.
LINE_FREE = (
    "tests/moe/test_capacity.py",
    "tests/moe/test_capacity_properties.py",
    "tests/moe/test_planner_edges.py",
    "tests/moe/test_backends.py",
    "tests/moe/test_npu_backend.py",
    "tests/moe/test_multirank.py",
    "tests/core/test_static_targets.py",
    "tests/core/test_source.py",
    "tests/ascend/test_dispatch_rules.py",
    "tests/bench/",
    "tests/test_fuzz.py",
    # The drop method's accuracy on a learned router: the planner's, the same on every line.
    "tests/e2e/test_trained_moe.py",
    # A/B tooling (lab, not product): it drives vLLM through the same offline runner and
    # server launcher that the per-line e2e tests exercise on every line.
    "tests/cli/test_ab.py",
    "tests/cli/test_ab_server.py",
    "tests/e2e/test_ab_servers.py",
)


def pytest_addoption(parser):
    parser.addoption("--skip-line-free", action="store_true",
                     help="deselect the tests that do not depend on the vLLM line")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--skip-line-free"):
        return
    keep, drop = [], []
    for item in items:
        path = Path(item.fspath).relative_to(REPO).as_posix()
        (drop if path.startswith(LINE_FREE) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
