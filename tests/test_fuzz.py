"""Generated configs and environments: the CLI answers 0 or 2, the loader raises nothing but
AscendPatchError subclasses. Never a traceback for a user's input.

Module and target names come from fixed lists: a config that opts into external impls or
targets makes `validate` import what it names, and a generated name could be any installed
module (antigravity opens a browser).
"""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ascend_patch.cli.main import main
from ascend_patch.core.errors import AscendPatchError
from ascend_patch.core.runtime import apply_from_env, reset

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAMES = st.sampled_from(["rms", "moe", "act", "x", "has space", "", "a" * 70, "rms-norm", "é"])
IMPLS = st.sampled_from([
    "ops.rms_norm", "ops.silu_and_mul", "moe.capacity", "distributed.cpu_collectives",
    "moe.magic", "tests.fixtures.toy_impls:FUNCTION", "tests.fixtures.toy_impls:ToyOptions",
    "os:path", "nonexistent_fuzz_mod:X", "a:b:c", ":",
])
TARGETS = st.sampled_from([
    "vllm.model_executor.layers.layernorm:RMSNorm.forward_native",
    "vllm.model_executor.layers.layernorm.RMSNorm.forward_native",
    "vllm.model_executor.layers.activation:SiluAndMul.forward_native",
    "vllm.model_executor.layers.activation:SiluAndMul.forward_cpu",
    "vllm.model_executor.layers.layernorm:RMSNorm.nope",
    "vllm.model_executor.layers.no_such_module:X.y",
    "vllm.model_executor.layers.layernorm.sub:X.y",
    "nonexistent_fuzz_mod:f", "tests.fixtures.toy_impls:make_prefixer", "os:system",
    "not a target", "", "a..b", "1abc:def",
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["yes", "on", "0256", "1:30", "2024-13-45", ".nan", "-.inf", "~", "1e999"]),
)
OPTION_KEYS = st.sampled_from([
    "drop_token_ratio", "min_tokens", "granularity", "drop_policy", "keep_top1", "renormalize",
    "simulate_ep_size", "backend", "dispatch", "log_interval", "fuse_lists",
    "reduce_scatter_mode", "prefix", "fail", "eps",
])
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


def _maybe(key: str, strategy):
    return st.one_of(st.just({}), strategy.map(lambda v: {key: v}))


def _mostly(good, bad):
    """Usually (4 in 5) a valid value, so that most documents get past the schema to the
    deeper checks; sometimes a hostile one."""
    return st.sampled_from(range(5)).flatmap(lambda i: bad if i == 4 else good)


def _sometimes(key: str, strategy):
    """Mostly absent: each present key is one more chance for the document to be refused."""
    return _mostly(st.just({}), strategy.map(lambda v: {key: v}))


def _merge(parts) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


PATCH = st.tuples(
    _mostly(st.sampled_from(["rms", "moe", "act"]).map(lambda n: {"name": n}),
            _maybe("name", st.one_of(NAMES, SCALARS))),
    _mostly(st.sampled_from(["ops.rms_norm", "ops.silu_and_mul", "moe.capacity"]).map(
        lambda i: {"impl": i}), _maybe("impl", st.one_of(IMPLS, SCALARS))),
    _sometimes("target", st.one_of(TARGETS, st.dictionaries(st.sampled_from(["main", "apply", "x"]),
                                                        TARGETS, max_size=2), SCALARS)),
    _sometimes("options", st.one_of(st.dictionaries(OPTION_KEYS, VALUES, max_size=4), SCALARS)),
    _sometimes("on_error", st.sampled_from(["fail", "skip", "ignore", True])),
    _sometimes("enabled", st.one_of(st.booleans(), SCALARS)),
    _sometimes("extra", VALUES),
).map(_merge)

PROFILE = st.tuples(
    _maybe("match", st.one_of(st.fixed_dictionaries({}, optional={
        "architectures": st.lists(st.sampled_from(["DeepseekV3ForCausalLM", "X"]), max_size=2),
        "model": st.sampled_from(["*", "*DeepSeek*", "[", None]),
        "vllm": st.sampled_from([">=0.32", "junk", ">=9"])}), SCALARS)),
    _maybe("patches", st.dictionaries(NAMES, st.fixed_dictionaries({}, optional={
        "options": st.dictionaries(OPTION_KEYS, VALUES, max_size=2), "enabled": SCALARS,
        "on_error": st.sampled_from(["skip", "x"])}), max_size=2)),
    _maybe("add", st.lists(PATCH, max_size=2)),
    _maybe("allow_unmatched", SCALARS),
).map(_merge)

CONFIG = st.tuples(
    _mostly(st.just({"version": 1}), _maybe("version", SCALARS)),
    _sometimes("vllm", st.sampled_from([">=0.32,<0.33", ">=0.40", "junk", None])),
    _sometimes("description", SCALARS),
    _sometimes("allow_external_impls", st.one_of(st.booleans(), SCALARS)),
    _sometimes("allow_external_targets", st.one_of(st.booleans(), SCALARS)),
    _sometimes("extends", st.sampled_from(["base.yaml", "missing.yaml", "config.yaml", "..", ""])),
    _mostly(st.lists(PATCH, max_size=3).map(lambda p: {"patches": p}), _maybe("patches", SCALARS)),
    _sometimes("profiles", st.one_of(st.dictionaries(NAMES, PROFILE, max_size=2), SCALARS)),
    _sometimes("pathces", VALUES),
).map(_merge)

YAML_CHARS = st.sampled_from(list("ab1:-[]{},&*!|>'\"#%@`?~ \n\t.=<\\") + ["\x00", "\x07", "é",
                                                                           "\ufeff", "\u2028"])
GOOD = "version: 1\npatches:\n  - name: rms\n    impl: ops.rms_norm\n    options: {}\n"
TEXT = st.one_of(
    st.text(YAML_CHARS, max_size=80),
    st.tuples(st.integers(0, len(GOOD)), st.text(YAML_CHARS, min_size=1, max_size=6)).map(
        lambda t: GOOD[:t[0]] + t[1] + GOOD[t[0]:]),
    st.sampled_from(["version: 1\n" + "[" * 200 + "]" * 200, "a: &a [*a]\n", "x: !!binary eA==\n",
                     "version: 1\n---\nversion: 1\n", "? [a]\n: b\n", "<<: {a: 1}\n"]),
)


def _dump(data) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (ValueError, OverflowError):  # a float PyYAML cannot write
        return GOOD


def _run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _check_cli(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base.yaml").write_text(GOOD)
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        for argv in (["plan", "--no-check", str(path)], ["validate", str(path)]):
            code, err = _run_cli(argv)
            event(f"{argv[0]}: exit {code}")
            assert code in (0, 2), (argv, code, err)
            if code == 2:
                assert err.strip(), argv  # every refusal says why


@pytest.mark.contract  # validate and plan import the installed vLLM's targets
@FUZZ
@given(CONFIG)
def test_generated_configs_through_the_cli(data):
    _check_cli(_dump(data))


@pytest.mark.contract  # validate imports the installed vLLM's targets
@FUZZ
@given(TEXT)
def test_generated_yaml_text_through_the_cli(text):
    _check_cli(text)


ENV_VALUES = st.one_of(
    st.text(max_size=20), st.sampled_from(["", "0", "1", "nan", "inf", "-1", "1e-9", "1e9", "*",
                                           "rms", "rms,moe", "DEBUG", "loud", "-", "a" * 64,
                                           "{rms: {x: 1}}", "{moe: {drop_token_ratio: .nan}}",
                                           "a: &a [*a]", "!!python/name:os.system", "[1, 2]",
                                           "{toy: {prefix: x}}", "0" * 64, "{toy: {prefix: \udcff}}",
                                           "\udce9", "LOUD", "x" * 70000]),
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.floats().map(str),
)
VARIABLES = ["ASCEND_PATCH_DISABLE", "ASCEND_PATCH_PROFILE", "ASCEND_PATCH_PROFILE_RESOLVED",
             "ASCEND_PATCH_OVERRIDE", "ASCEND_PATCH_REPORT_INTERVAL", "ASCEND_PATCH_LOG_LEVEL",
             "ASCEND_PATCH_CONFIG_DIGEST", "ASCEND_PATCH_CONFG"]
TOY = """version: 1
allow_external_impls: true
allow_external_targets: true
patches:
  - {name: toy, impl: 'tests.fixtures.toy_impls:FUNCTION', target: 'nonexistent_fuzz_mod:f', on_error: skip}
  - {name: rms, impl: ops.rms_norm}
profiles:
  loud: {patches: {toy: {options: {prefix: LOUD}}}}
  deepseek: {match: {architectures: [DeepseekV3ForCausalLM]}}
"""


@FUZZ
@given(st.one_of(
           # one variable alone (its hostile values reach the loader), or several together
           st.tuples(st.sampled_from(VARIABLES), ENV_VALUES).map(lambda t: {t[0]: t[1]}),
           st.tuples(*(_sometimes(name, ENV_VALUES) for name in VARIABLES)).map(_merge)),
       _mostly(st.just("toy"), st.sampled_from(["generated", "missing", "dir", "none"])), CONFIG,
       st.sampled_from(["", "reports", "file", "file/sub"]))
def test_generated_environments_through_the_loader(values, which, data, report):
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "base.yaml").write_text(GOOD)
        (tmp_path / "file").write_text("")
        config = {"toy": tmp_path / "toy.yaml", "generated": tmp_path / "config.yaml",
                  "missing": tmp_path / "missing.yaml", "dir": tmp_path, "none": ""}[which]
        (tmp_path / "toy.yaml").write_text(TOY)
        (tmp_path / "config.yaml").write_text(_dump(data))
        env = {**values, "ASCEND_PATCH_CONFIG": str(config)}
        if report:
            env["ASCEND_PATCH_REPORT_DIR"] = str(tmp_path / report)
        try:
            result = apply_from_env(env)
        except AscendPatchError as exc:
            event(f"loader: {type(exc).__name__}")
        else:
            event("loader: applied")
            assert result is None if which == "none" else isinstance(result, list)
        finally:
            reset()



PLANNED = """version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {drop_token_ratio: 0.1, min_tokens: 0}
  - name: rms
    impl: ops.rms_norm
"""
PROFILES = """profiles:
  big:
    patches:
      moe: {options: {drop_policy: position}, enabled: true}
      rms: {enabled: false}
    add:
      - {name: act, impl: ops.silu_and_mul}
  small: {patches: {moe: {options: {drop_token_ratio: 0.05}}}}
  deepseek: {match: {architectures: [DeepseekV3ForCausalLM]}}
"""
OPTION_VALUES = {
    "drop_token_ratio": _mostly(st.sampled_from([0, 0.02, 0.2, 0.5]),
                                st.sampled_from([0.7, -1, "x", None, True])),
    "drop_policy": _mostly(st.sampled_from(["probs", "position"]), st.sampled_from(["seed", 1])),
    "min_tokens": _mostly(st.sampled_from([0, 16]), st.sampled_from([-1, 1.5])),
    "bogus": st.just(1),
}
OVERRIDES = st.dictionaries(
    _mostly(st.just("moe"), st.sampled_from(["rms", "act", "nope"])),
    st.dictionaries(_mostly(st.sampled_from(["drop_token_ratio", "drop_policy", "min_tokens"]),
                            st.just("bogus")), st.integers(0, 3), max_size=3),
    max_size=3,
).flatmap(lambda shape: st.fixed_dictionaries({
    patch: st.fixed_dictionaries({key: OPTION_VALUES[key] for key in options})
    for patch, options in shape.items()}))
SETTINGS = st.fixed_dictionaries({}, optional={
    "ASCEND_PATCH_OVERRIDE": OVERRIDES.map(lambda o: __import__("json").dumps(o)),
    "ASCEND_PATCH_PROFILE": _mostly(st.sampled_from(["big", "small", "deepseek"]),
                                    st.just("huge")),
    "ASCEND_PATCH_PROFILE_RESOLVED": st.sampled_from(["-", "big", "small"]),
    "ASCEND_PATCH_DISABLE": st.lists(_mostly(st.sampled_from(["moe", "rms", "act", "*"]),
                                             st.just("zzz")), max_size=3).map(",".join),
})


def _loader_applies(env) -> tuple[list | None, str]:
    """What the loader hands the patcher for `env`: the options per patch and the disabled
    ones (None: it applies nothing yet, the profile waits for the model), or its refusal."""
    from unittest import mock

    from ascend_patch.core.patcher import PATCHER

    seen = []

    def capture(config, disabled=frozenset()):
        seen.append([(p.name, p.options.model_dump(mode="json"),
                      not p.enabled or p.name in disabled or "*" in disabled)
                     for p in config.patches])
        return []

    try:
        with mock.patch.object(PATCHER, "apply", capture):
            apply_from_env(dict(env))
    except AscendPatchError as exc:
        return None, str(exc)
    finally:
        reset()
    return (seen[0] if seen else None), ""


@FUZZ
@given(SETTINGS, st.booleans())
def test_plan_shows_what_the_loader_applies(env, with_profiles):
    """For the same environment, `plan --json` shows the options (and the patches turned
    off) the loader hands the patcher, or refuses with the loader's own message."""
    import json
    import os
    from unittest import mock

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(PLANNED + (PROFILES if with_profiles else ""))
        env = {**env, "ASCEND_PATCH_CONFIG": str(path)}
        applied, refusal = _loader_applies(env)
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
            code = main(["plan", "--json", "--no-check", str(path)])
        if refusal:
            event("refused")
            assert (code, err.getvalue().strip().removeprefix("error: ")) == (2, refusal)
            return
        assert code == 0, err.getvalue()
        plan = json.loads(out.getvalue())
        shown = [(p["name"], p["options"], p["status"].startswith("off"))
                 for p in plan["patches"]]
        if applied is None:  # the profile is chosen per model: plan shows the base patches
            event("per model")
            assert plan["profile"] is None and "ASCEND_PATCH_PROFILE" not in env
            return
        event(f"applied profile {plan['profile']}")
        assert shown == applied
