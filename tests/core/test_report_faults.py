"""A report directory that cannot be written costs one warning: patching, imports and serving
go on. And report.py / context.py import nothing of the patcher."""

import errno
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from ascend_patch.core import report
from ascend_patch.core.runtime import apply_from_env

from .test_patcher import TOY_HEADER, patch

TAIL = "($ASCEND_PATCH_REPORT_DIR); patching and serving go on without the report (warned once)"


@pytest.fixture
def toy_config(write_config, toy_module):
    return write_config(TOY_HEADER + "patches:\n" + patch("func", "FUNCTION", f"{toy_module}:greet"))


def warnings_of(caplog) -> list[str]:
    prefix = f"ascend-patch [MainProcess pid {os.getpid()}]: "
    return [r.getMessage().removeprefix(prefix) for r in caplog.records
            if r.levelno >= logging.WARNING]


def start(toy_config, directory, ascend_logs, interval="0"):
    with ascend_logs.at_level(logging.INFO, logger="ascend_patch"):
        (record,) = apply_from_env({"ASCEND_PATCH_CONFIG": str(toy_config),
                                    "ASCEND_PATCH_REPORT_DIR": str(directory),
                                    "ASCEND_PATCH_REPORT_INTERVAL": interval})
    return record


def test_a_regular_file_in_its_place(toy_config, toy_module, tmp_path, ascend_logs):
    (tmp_path / "reports").write_text("not a folder")
    record = start(toy_config, tmp_path / "reports", ascend_logs)
    assert warnings_of(ascend_logs) == [
        f"cannot write reports to {tmp_path / 'reports'}: it exists and is not a directory {TAIL}"]
    with ascend_logs.at_level(logging.INFO, logger="ascend_patch"):
        module = importlib.import_module(toy_module)  # flushes: no second warning
        assert report.flush() is None
    assert module.greet("a") == "patched:hello a" and record.status == "applied"
    assert len(warnings_of(ascend_logs)) == 1


def test_a_file_where_a_parent_folder_should_be(toy_config, tmp_path, ascend_logs):
    (tmp_path / "file").write_text("")
    start(toy_config, tmp_path / "file" / "reports", ascend_logs)
    assert warnings_of(ascend_logs) == [
        (f"cannot write reports to {tmp_path / 'file' / 'reports'}: Not a directory: "
        f"{tmp_path / 'file' / 'reports'} {TAIL}")]


def test_an_unwritable_directory(toy_config, toy_module, tmp_path, ascend_logs, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "reports"))

    # Tests run as root, who writes anywhere: make the file creation itself fail.
    monkeypatch.setattr(report.tempfile, "mkstemp", deny)
    record = start(toy_config, tmp_path / "reports", ascend_logs)
    assert warnings_of(ascend_logs) == [
        (f"cannot write reports to {tmp_path / 'reports'}: Permission denied: "
        f"{tmp_path / 'reports'} {TAIL}")]
    importlib.import_module(toy_module)
    assert record.status == "applied" and len(warnings_of(ascend_logs)) == 1


def test_removed_mid_run_is_created_again(toy_config, tmp_path, ascend_logs):
    start(toy_config, tmp_path / "reports", ascend_logs)
    shutil.rmtree(tmp_path / "reports")
    assert report.flush() == tmp_path / "reports" / f"main-{os.getpid()}.json"
    assert warnings_of(ascend_logs) == []


def test_disk_full_costs_one_warning_and_no_import(toy_config, toy_module, tmp_path, ascend_logs,
                                                   monkeypatch):
    record = start(toy_config, tmp_path / "reports", ascend_logs)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, *args, **kwargs):
            self.handle = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "fdopen", Full)
    with ascend_logs.at_level(logging.INFO, logger="ascend_patch"):
        module = importlib.import_module(toy_module)  # the import flushes the report
        assert module.greet("a") == "patched:hello a" and record.status == "applied"
        assert report.flush() is None
        assert warnings_of(ascend_logs) == [
            f"cannot write reports to {tmp_path / 'reports'}: No space left on device {TAIL}"]
        assert [p.name for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")] == []
        monkeypatch.setattr(report.os, "fdopen", real_fdopen)  # space again
        path = report.flush()
    assert json.loads(path.read_text())["patches"][0]["status"] == "applied"
    assert ascend_logs.records[-1].getMessage().endswith(f"report written to {path} again")


@pytest.mark.parametrize(("module", "must_not_load"), [
    ("ascend_patch.core.report", "ascend_patch.core.patcher"),
    ("ascend_patch.core.context", "ascend_patch.core.report"),
])
def test_no_import_loop(module, must_not_load):
    code = f"import sys, {module}; print({must_not_load!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_patcher_gives_its_contexts_the_report_flush(write_config, toy_module):
    from ascend_patch.core.config import load_config
    from ascend_patch.core.patcher import PATCHER

    importlib.import_module(toy_module)
    config = load_config(write_config(TOY_HEADER + "patches:\n" + patch("f", "FUNCTION", f"{toy_module}:greet")))
    (record,) = PATCHER.apply(config)
    assert record.context.flush is report.flush
