"""Imports probed in a child interpreter: every way an import can fail is a reason, and the
modules after one that killed the child are still probed."""

import sys
import uuid

from ascend_patch.core.probe import import_failures


def test_every_failure_is_a_reason_and_the_rest_still_probed(tmp_path, monkeypatch):
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
    failures = import_failures([*names.values(), "no_such_module_" + tag], timeout=10)
    assert failures == {
        names["raises"]: "failed: RuntimeError: no NPU here",
        names["silent"]: "failed: ValueError",
        names["exits"]: "ended the process (exit status 7)",
        names["dies"]: "killed the process (SIGKILL)",
        names["hangs"]: "did not finish within 10s",
        "no_such_module_" + tag: f"failed: ModuleNotFoundError: No module named "
                                 f"'no_such_module_{tag}'",
    }
    assert not any(name in sys.modules for name in names.values())  # only the child imported
