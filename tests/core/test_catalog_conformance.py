"""Every catalog entry, on the installed vLLM line: applied after and before its targets'
modules are imported, a second wrap refused, reverted to the very originals.

The other line runs the same tests in its own environment (scripts/test.sh); the vllm-ascend
site sets are checked against vllm-ascend's source in tests/ascend/test_static_sites.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ascend_patch.core import catalog
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import PatchError
from ascend_patch.core.patcher import MARKER, PATCHER
from ascend_patch.core.targets import resolve
from tests.stack import LINE

PATCHING = [
    name for name in catalog.builtin_names()
    if (site_set := catalog.lookup(name).site_set(LINE, "vllm")) is not None and site_set.sites
]


def config_text(name: str, patch: str = "p") -> str:
    return f"version: 1\npatches:\n  - name: {patch}\n    impl: {name}\n"


def test_every_entry_declares_every_line_and_platform():
    from ascend_patch.core.versions import LINE_NAMES, PLATFORMS

    for name in catalog.builtin_names():
        impl = catalog.lookup(name)
        for line in LINE_NAMES:
            for platform in PLATFORMS:
                site_set = impl.site_set(line, platform)
                assert site_set is not None, f"{name} says nothing of vLLM {line} on {platform}"
                if not site_set.sites:
                    assert (site_set.provided or site_set.unsupported).strip(), (name, line)


@pytest.mark.parametrize("name", PATCHING)
def test_applied_after_import_wrapped_once_and_reverted(name, write_config):
    config = load_config(write_config(config_text(name)))
    (patch,) = config.patches
    originals = {}
    for site in patch.sites:
        originals[site.role] = resolve(site.target)  # imports the module first
    (record,) = PATCHER.apply(config)
    assert record.status == "applied", record.reason
    assert sorted(record.applied_roles) == sorted(originals)
    assert record.interfaces_unchecked == [] or set(record.interfaces_checked) | set(
        record.interfaces_unchecked) == {str(i.target) for i in patch.relies_on}
    for site in patch.sites:
        live = resolve(site.target, import_module=False).function
        assert getattr(live, MARKER) == "p"
        assert live.__wrapped__ is originals[site.role].function

    # A second patch of the same targets, applied on top in this process, is refused.
    other = load_config(write_config(config_text(name, "again"), "other.yaml"))
    with pytest.raises(PatchError):
        PATCHER.apply(other)

    PATCHER.revert()
    for site in patch.sites:
        after = resolve(site.target, import_module=False)
        assert after.raw is originals[site.role].raw, site.target
        assert not hasattr(after.function, MARKER)


def test_applied_before_import_in_a_fresh_process(tmp_path):
    """All patching entries in one config, applied before vLLM is imported: every site
    applies when its module is first imported, and revert restores the originals."""
    config = tmp_path / "all.yaml"
    config.write_text("version: 1\npatches:\n" + "".join(
        f"  - name: p{i}\n    impl: {name}\n" for i, name in enumerate(PATCHING)))
    script = textwrap.dedent(f"""
        import importlib, json, os, sys
        os.environ["ASCEND_PATCH_CONFIG"] = {str(config)!r}
        from ascend_patch.core.runtime import apply_from_env, reset
        from ascend_patch.core.patcher import PATCHER, MARKER
        from ascend_patch.core.targets import resolve
        records = apply_from_env()
        before = {{r.name: r.status for r in records}}
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules), "vLLM imported"
        sites = [(p.name, s) for p in PATCHER.config.patches for s in p.sites]
        for _, site in sites:
            importlib.import_module(site.target.module)
        after = {{r.name: r.status for r in PATCHER.records.values()}}
        marked = all(getattr(resolve(s.target, import_module=False).function, MARKER, None) == n
                     for n, s in sites)
        reset()
        clean = all(not hasattr(resolve(s.target, import_module=False).function, MARKER)
                    for _, s in sites)
        print("RESULT " + json.dumps([before, after, marked, clean]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, run.stdout[-3000:] + run.stderr[-3000:]
    before, after, marked, clean = json.loads(line[len("RESULT "):])
    names = [f"p{i}" for i in range(len(PATCHING))]
    assert before == {n: "pending" for n in names}
    assert after == {n: "applied" for n in names}
    assert marked and clean
