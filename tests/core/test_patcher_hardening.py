"""One patch per function, lazy failures that stay failed, revert next to other tools, and
exactly which copies are rewritten."""

import importlib
import logging
import sys
import textwrap

import pytest

from ascend_patch.core import report
from ascend_patch.core.catalog import Implementation, Site, SiteSet
from ascend_patch.core.versions import LINE_NAMES
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import PatchError
from ascend_patch.core.imports import WATCHER
from ascend_patch.core.patcher import PATCHER
from tests.fixtures.toy_impls import ToyOptions

from .test_patcher import TOY_HEADER, patch

# Like the toy implementations, without a signature check: can target anything callable.
ANY = Implementation(
    name="toy.any", summary="prefixes", why="tests",
    site_sets=(SiteSet(lines=LINE_NAMES, sites=(
        Site(target="placeholder.module:attr", signature=None,
             factory="tests.fixtures.toy_impls:make_prefixer"),)),),
    options=ToyOptions,
)


def load(write_config, *patches: str, name: str = "config.yaml"):
    return load_config(write_config(TOY_HEADER + "patches:\n" + "".join(patches), name))


@pytest.fixture
def reexport(toy_module, tmp_path):
    """A module that re-exports the toy module's function and class."""
    name = f"{toy_module}_reexport"
    (tmp_path / f"{name}.py").write_text(f"from {toy_module} import Greeter, greet\n")
    yield name
    sys.modules.pop(name, None)


# -- one patch per resolved target --------------------------------------------------------


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_base_then_inherited_attribute_is_refused(write_config, toy_module, on_error):
    module = importlib.import_module(toy_module)
    original = module.Greeter.greet
    config = load(write_config, patch("base", "METHOD", f"{toy_module}:Greeter.greet"),
                  patch("sub", "METHOD", f"{toy_module}:Loud.greet", on_error=on_error))
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.path}:10: patch 'sub': target {toy_module}:Loud.greet is already patched by "
        "'base'; one patch per function")
    assert module.Greeter.greet is original and "greet" not in vars(module.Loud)
    assert PATCHER.config is None


def test_inherited_attribute_then_base_is_refused(write_config, toy_module):
    importlib.import_module(toy_module)
    config = load(write_config, patch("sub", "METHOD", f"{toy_module}:Loud.greet"),
                  patch("base", "METHOD", f"{toy_module}:Greeter.greet"))
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.path}:10: patch 'base': target {toy_module}:Greeter.greet is the same function "
        f"as {toy_module}:Loud.greet, already patched by 'sub'; one patch per function")


def test_home_then_reexport_is_refused(write_config, toy_module, reexport):
    importlib.import_module(reexport)
    config = load(write_config, patch("home", "FUNCTION", f"{toy_module}:greet"),
                  patch("again", "FUNCTION", f"{reexport}:greet"))
    with pytest.raises(PatchError, match=f"target {reexport}:greet is already patched by 'home'"):
        PATCHER.apply(config)


def test_reexport_then_home_is_refused(write_config, toy_module, reexport):
    importlib.import_module(reexport)
    config = load(write_config, patch("again", "FUNCTION", f"{reexport}:greet"),
                  patch("home", "FUNCTION", f"{toy_module}:greet"))
    with pytest.raises(PatchError, match=f"target {toy_module}:greet is the same function as "
                                         f"{reexport}:greet, already patched by 'again'"):
        PATCHER.apply(config)


def test_lazy_alias_conflict_fails_the_import(write_config, toy_module, reexport):
    config = load(write_config, patch("home", "FUNCTION", f"{toy_module}:greet"),
                  patch("again", "FUNCTION", f"{reexport}:greet", on_error="skip"))
    assert [r.status for r in PATCHER.apply(config)] == ["pending", "pending"]
    message = (f"{config.path}:10: patch 'again': target {reexport}:greet is already patched by "
               "'home'; one patch per function")
    for _ in range(2):  # and it stays failed
        with pytest.raises(PatchError) as info:
            importlib.import_module(reexport)
        assert str(info.value) == message
    assert PATCHER.records["again"].status == "failed"


def test_a_function_wrapped_by_another_patcher_of_ours_is_refused(write_config, toy_module):
    module = importlib.import_module(toy_module)
    module.greet.__ascend_patch__ = "someone-else"
    config = load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet", on_error="skip"))
    with pytest.raises(PatchError, match=f"target {toy_module}:greet is already patched by "
                                         "'someone-else'; one patch per function"):
        PATCHER.apply(config)


def test_validate_refuses_two_targets_of_one_vllm_function(write_config, capsys):
    from ascend_patch.cli.main import main

    # vllm.model_executor.models.llama does `from ...activation import SiluAndMul`.
    path = write_config("""
        version: 1
        patches:
          - name: act
            impl: ops.silu_and_mul
          - name: act-again
            impl: ops.silu_and_mul
            target: vllm.model_executor.models.llama:SiluAndMul.forward_native
    """)
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:5: patches.act-again: target vllm.model_executor.models.llama:SiluAndMul."
        "forward_native is the same function as vllm.model_executor.layers.activation:"
        "SiluAndMul.forward_native, patched by 'act'; one patch per function")


# -- lazy failures stay failed --------------------------------------------------------------


def test_a_failed_lazy_patch_fails_every_later_import(write_config, toy_module, tmp_path):
    report.configure(tmp_path / "reports", 0)
    config = load(write_config, patch("m", "METHOD", f"{toy_module}:Greeter.greet", "{fail: true}"),
                  patch("f", "FUNCTION", f"{toy_module}:greet"))
    PATCHER.apply(config)
    message = (f"{config.path}:5: patch 'm': tests.fixtures.toy_impls:make_prefixer failed: "
               "RuntimeError: factory asked to fail")
    for _ in range(3):
        with pytest.raises(PatchError) as info:
            importlib.import_module(toy_module)
        assert str(info.value) == message
        assert toy_module not in sys.modules
    record = PATCHER.records["m"]
    assert (record.status, record.reason, record.applied_roles) == ("failed", message, [])
    (data,) = report.read_reports(tmp_path / "reports")
    assert [(p["name"], p["status"], p["reason"]) for p in data["patches"]] == [
        ("m", "failed", message), ("f", "pending", "")]  # its module never loaded


def test_a_module_whose_own_import_failed_is_patched_when_imported_again(
        write_config, toy_module, tmp_path):
    flaky = f"{toy_module}_flaky"
    (tmp_path / f"{flaky}.py").write_text(textwrap.dedent(f"""
        import os
        if not os.path.exists({str(tmp_path / 'ready')!r}):
            raise ImportError("not ready yet")

        def greet(name):
            return "hello " + name
    """))
    try:
        (record,) = PATCHER.apply(load(write_config, patch("f", "FUNCTION", f"{flaky}:greet")))
        with pytest.raises(ImportError, match="not ready yet"):
            importlib.import_module(flaky)
        assert record.status == "pending" and WATCHER.watched() == [flaky]
        (tmp_path / "ready").write_text("")
        assert importlib.import_module(flaky).greet("x") == "patched:hello x"
        assert record.status == "applied"
    finally:
        sys.modules.pop(flaky, None)


# -- revert next to other tools ----------------------------------------------------------------


def test_revert_leaves_a_later_patch_by_another_tool(write_config, toy_module, ascend_logs):
    module = importlib.import_module(toy_module)
    original_method = module.Greeter.greet
    PATCHER.apply(load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"),
                       patch("m", "METHOD", f"{toy_module}:Greeter.greet")))

    def theirs(name):
        return "theirs"

    module.greet = theirs
    with ascend_logs.at_level(logging.WARNING, logger="ascend_patch"):
        PATCHER.revert()
    assert module.greet is theirs
    assert module.Greeter.greet is original_method
    left = (f"{toy_module}:greet (f): left as it is, replaced by "
            f"tests.core.test_patcher_hardening.test_revert_leaves_a_later_patch_by_another_tool."
            "<locals>.theirs after ascend-patch installed its replacement")
    assert PATCHER.left_in_place == [left]
    assert report.snapshot()["left_in_place"] == [left]
    assert [r.getMessage() for r in ascend_logs.records] == [
        f"ascend-patch [MainProcess pid {__import__('os').getpid()}]: revert: {left}"]


def test_revert_leaves_an_attribute_another_tool_removed(write_config, toy_module):
    module = importlib.import_module(toy_module)
    PATCHER.apply(load(write_config, patch("m", "METHOD", f"{toy_module}:Loud.greet")))
    del module.Loud.greet  # our shadowing attribute, removed by someone else
    PATCHER.revert()
    assert PATCHER.left_in_place[-1] == (
        f"{toy_module}:Loud.greet (m): left as it is, removed after ascend-patch installed its "
        "replacement")
    assert module.Loud().greet("a") == "hi a"


def test_a_replacement_another_tool_put_back_is_not_counted_as_ours(write_config, toy_module):
    """unittest.mock saves what it replaces and puts it back at stop(): after a revert that
    left its mock in place, that is our old replacement, which no session installed."""
    from unittest import mock

    module = importlib.import_module(toy_module)
    original = module.greet
    config = load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
    PATCHER.apply(config)
    ours = module.greet
    tool = mock.patch.object(module, "greet", side_effect=lambda name: "mocked")
    tool.start()
    PATCHER.revert()  # the mock is not ours: left in place
    assert module.greet("x") == "mocked"
    tool.stop()
    assert module.greet is ours
    (record,) = PATCHER.apply(config)
    assert record.status == "applied"
    assert module.greet is not ours
    assert module.greet.__wrapped__ is original  # unwrapped, not wrapped a second time
    assert module.greet("x") == "patched:hello x"
    assert record.context.stats == {"calls": 1}
    PATCHER.revert()
    assert module.greet is original
    assert PATCHER.left_in_place == []


def test_a_second_revert_removes_our_replacement_once_another_tool_put_it_back(
        write_config, toy_module):
    module = importlib.import_module(toy_module)
    original = module.greet
    PATCHER.apply(load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet")))
    saved = module.greet

    def theirs(name):
        return "theirs:" + saved(name)

    module.greet = theirs
    PATCHER.revert()
    assert module.greet is theirs
    module.greet = saved  # the other tool restores what it saved: our replacement
    PATCHER.revert()
    assert module.greet is original
    assert PATCHER.left_in_place == []


def test_another_tools_wrapper_carrying_our_marker_is_refused_and_left(write_config,
                                                                       toy_module):
    """functools.wraps copies the replacement's attributes, our marker too: the wrapper
    around a replacement a revert left in place is not ours, and wrapping it would run the
    patch twice."""
    import functools

    module = importlib.import_module(toy_module)
    config = load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
    PATCHER.apply(config)
    ours = module.greet

    @functools.wraps(ours)
    def theirs(name):
        return "theirs:" + ours(name)

    module.greet = theirs
    PATCHER.revert()
    assert theirs.__ascend_patch__ == "f"
    with pytest.raises(PatchError) as info:
        PATCHER.apply(config)
    assert str(info.value) == (
        f"{config.patches[0].file}:{config.patches[0].line}: patch 'f': target "
        f"{toy_module}:greet is already patched by 'f'; one patch per function "
        f"({_qualname(theirs)} carries that mark but this process did not install it: another "
        "tool's wrapper around a replacement a revert left in place, or another copy of "
        "ascend-patch)")
    assert module.greet is theirs
    assert module.greet("x") == "theirs:patched:hello x"


def _qualname(function) -> str:
    return f"{function.__module__}.{function.__qualname__}"


# -- exactly which copies are rewritten -----------------------------------------------------


def test_copy_rule_rewrites_module_level_names_only(write_config, toy_module, tmp_path):
    user = f"{toy_module}_user"
    (tmp_path / f"{user}.py").write_text(textwrap.dedent(f"""
        import functools
        from {toy_module} import greet
        from {toy_module} import greet as hello
        HANDLERS = [greet]
        TABLE = {{"g": greet}}
        PARTIAL = functools.partial(greet)

        class Holder:
            fn = greet

        def call(f=greet):
            return f

        def closure():
            return lambda: greet
    """))
    module = importlib.import_module(toy_module)
    original = module.greet
    used = importlib.import_module(user)
    try:
        (record,) = PATCHER.apply(load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet")))
        assert sorted(record.copies) == [f"{user}.greet", f"{user}.hello"]
        assert used.greet is module.greet is used.hello is not original
        assert used.HANDLERS[0] is original and used.TABLE["g"] is original
        assert used.PARTIAL.func is original and vars(used.Holder)["fn"] is original
        assert used.call() is original
        PATCHER.revert()
        assert used.greet is used.hello is module.greet is original
    finally:
        sys.modules.pop(user, None)


def test_copies_of_a_function_defined_elsewhere_are_not_followed(write_config, toy_module, reexport):
    module = importlib.import_module(toy_module)
    again = importlib.import_module(reexport)
    original = module.greet
    (record,) = PATCHER.apply(load(write_config, patch("f", "FUNCTION", f"{reexport}:greet")))
    assert record.copies == []
    assert module.greet is original
    assert again.greet("a") == "patched:hello a"


def test_copies_of_a_non_function_are_not_followed(write_config, toy_module, tmp_path):
    name = f"{toy_module}_values"
    (tmp_path / f"{name}.py").write_text("FLAG = print\n")  # a builtin bound to a name
    try:
        values = importlib.import_module(name)
        config = load(write_config, "  - name: p\n    impl: tests.core.test_patcher_hardening:ANY\n"
                                    f"    target: {name}:FLAG\n")
        (record,) = PATCHER.apply(config)
        assert record.copies == []
        import builtins

        assert builtins.print is print and values.FLAG is not print
    finally:
        sys.modules.pop(name, None)


# -- a different switch is a different config ------------------------------------------------


def test_other_disabled_set_or_options_are_refused(write_config, toy_module):
    importlib.import_module(toy_module)
    config = load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet"))
    PATCHER.apply(config)
    with pytest.raises(PatchError, match=r"already applied in this process \(disabled patches "
                                         r"\[\] applied, \['f'\] asked for\)"):
        PATCHER.apply(config, disabled=frozenset({"f"}))
    other = load(write_config, patch("f", "FUNCTION", f"{toy_module}:greet", "{prefix: x}"), name="b.yaml")
    with pytest.raises(PatchError, match="another config"):
        PATCHER.apply(other)
