"""The checks' imports run in a forked child: every way an import can fail is a reason, the
modules after one that killed the child are still imported, and the checker's own process
imports none of them."""

import sys
import uuid

import pytest

from ascend_patch.core.probe import PROVEN, Imports


def test_every_failure_is_a_reason_and_the_rest_still_imported(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    bodies = {
        "fine": "X = 1",
        "raises": "raise RuntimeError('no NPU here')",
        "silent": "raise ValueError()",
        "exits": "import os\nos._exit(7)",
        "dies": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "hangs": "import time\ntime.sleep(60)",
        "after": "Y = 2",
    }
    names = {key: f"probe_{key}_{tag}" for key in bodies}
    for key, body in bodies.items():
        (tmp_path / f"{names[key]}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = Imports()
    missing = "no_such_module_" + tag
    modules = [*names.values(), missing]

    def check():  # what a check does in the child: import, then read the modules
        problems = {m: imports.problem(m) for m in modules}
        return problems, sys.modules[names["after"]].Y

    problems, after = imports.guarded(check, timeout=5)
    assert after == 2  # the child that finished imported the module after those that died
    expected = {
        names["fine"]: None,
        names["raises"]: "failed: RuntimeError: no NPU here",
        names["silent"]: "failed: ValueError",
        names["exits"]: "ended the process (exit status 7)",
        names["dies"]: "killed the process (SIGKILL)",
        names["hangs"]: "did not finish within 5s",
        names["after"]: None,
        missing: f"failed: ModuleNotFoundError: No module named '{missing}'",
    }
    assert problems == expected
    assert imports.failed == {m: why for m, why in expected.items() if why}
    assert not any(name in sys.modules for name in names.values())  # only children imported
    # What a child imported without harm, this process may import itself next time.
    assert {m for m in PROVEN if tag in m} == {names["fine"], names["after"]}


def test_the_checks_own_exception_comes_back_and_a_child_dying_outside_an_import_is_named():
    imports = Imports()

    def fails():
        raise KeyError("inside the check")

    with pytest.raises(KeyError, match="inside the check"):
        imports.guarded(fails)

    def dies():
        import os

        os._exit(4)

    with pytest.raises(RuntimeError, match=r"^the checks' child process died outside any import "
                                           r"\(ended the process \(exit status 4\)\)$"):
        imports.guarded(dies)
