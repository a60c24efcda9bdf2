"""`ascend-patch`: validate a config, show what it would patch, check this machine.

Exit codes: 0 fine, 2 the config (or a patch of it) cannot be applied here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ascend_patch.cli import render
from ascend_patch.core.errors import AscendPatchError, ConfigError
from ascend_patch.core.settings import PROFILE

EXIT_OK = 0
EXIT_INVALID = 2

# Messages are never wrapped: they carry file paths that users copy and tests compare.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _stack(args: argparse.Namespace):
    """The stack to plan for: this machine's, or the one --vllm-line / --platform name."""
    from ascend_patch.core.versions import Stack, detect_platform, detect_stack

    line, platform = getattr(args, "vllm_line", None), getattr(args, "platform", None)
    if line is None and platform is None:
        return detect_stack()
    if line is None:
        line = detect_stack().line
        if line is None:
            raise ConfigError.single("--platform", None, "", "no vLLM is installed here: "
                                     "name the line with --vllm-line too")
    return Stack.for_line(line, platform or detect_platform()[0])


def _load(path: str, stack=None):
    from ascend_patch.core.config import load_config

    return load_config(path, stack)


def _checker(args: argparse.Namespace, stack):
    """Import what is installed when it is the planned stack; read --source trees otherwise,
    and this package's own factories too (importing them may import torch)."""
    import ascend_patch
    from ascend_patch.core.live import Checker
    from ascend_patch.core.versions import detect_platform, installed_vllm, line_of

    vllm = installed_vllm()
    here = line_of(vllm.version) if vllm else None
    importable = here is not None and here.name == stack.line and (
        stack.platform == detect_platform()[0])
    roots = dict(getattr(args, "source", None) or ())
    if not importable:
        roots.setdefault("ascend_patch", Path(ascend_patch.__file__).resolve().parents[1])
    sources = installed = None
    if roots or importable:
        from ascend_patch.checks.static_targets import SourceRoots

        # vllm-ascend picks code paths with vllm_version_is("X.Y.Z"): read the planned line's.
        if roots:
            sources = SourceRoots(roots, vllm_line=stack.line)
        if importable:
            installed = SourceRoots(_installed_roots(), vllm_line=stack.line)
    return Checker(sources, importable=importable, installed=installed)


def _installed_roots() -> dict[str, Path]:
    """The directories holding the installed upstream packages, found without importing them
    (for the attributes adapters read, which only the source shows)."""
    import importlib.util

    roots = {}
    for package in ("vllm", "vllm_ascend"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots[package] = Path(next(iter(spec.submodule_search_locations))).parent
    return roots


def _source_arg(text: str) -> tuple[str, object]:
    package, sep, directory = text.partition("=")
    if not sep or not package.isidentifier() or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PACKAGE=DIR, e.g. vllm_ascend=src/")
    if not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {directory} is not a directory")
    from ascend_patch.checks.static_targets import normalise_root

    try:  # checked here, where a mistake is a usage error, not in the reader's constructor
        normalise_root(package, Path(directory))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return package, Path(directory)


def cmd_validate(args: argparse.Namespace) -> int:
    from ascend_patch.core.live import live_problems

    stack = _stack(args)
    config = _load(args.config, stack)
    checker = _checker(args, stack)
    # The base patches, and every profile's: a patch only a profile adds (or enables) is
    # checked now, not when a served model first picks the profile.
    shown: dict[str, None] = {}
    added = {}
    base = {p.name for p in config.patches}
    variants = [config.with_profile(profile) for profile in [None, *config.profiles]]
    found = checker.run(variants, lambda: [live_problems(v, checker) for v in variants])
    for profile, variant, problems in zip([None, *config.profiles], variants, found):
        for patch in variant.patches:
            key = f"patches.{patch.name}"
            if profile is not None and patch.name not in base:
                key = f"profiles.{profile}.add.{patch.name}"
                added[(patch.file, patch.line, patch.name)] = patch
            for problem in problems[patch.name]:
                shown[f"{patch.file}:{patch.line}: {key}: {problem}"] = None
    for line in shown:
        err.print(line, markup=False)
    if shown:
        return EXIT_INVALID
    patches = [*config.patches, *added.values()]
    checked = sum(len(p.sites) + len(p.relies_on) for p in patches)
    reads = sum(len(p.reads) for p in patches)
    more = f", {len(added)} more in profiles" if added else ""
    out.print(f"{config.path}: OK for {config.stack.describe()} ({len(config.patches)} patches"
              f"{more}, {checked} targets and interfaces checked, {reads} attributes read, "
              f"sha256 {config.digest[:12]})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from ascend_patch.core import effective
    from ascend_patch.core.live import live_problems
    from ascend_patch.core.settings import DISABLE, Settings

    stack = _stack(args)
    # Every ASCEND_PATCH_* variable, checked and applied as the loader applies them.
    values = Settings.from_environ(os.environ)
    config = _load(args.config, stack)
    decided = effective.resolve(config, values)
    disabled = decided.disabled
    profile, setting = _plan_profile(args, config, decided, stack)
    changes = effective.changes(config, profile, setting, values.override, disabled)
    base = config
    config = effective.variant(config, profile, values.override)
    quant = _model_quantization(args)
    checker = _checker(args, stack)
    check = args.check and checker.importable
    problems = live_problems(config, checker) if check else {}
    rows = []
    for patch in config.patches:
        if not patch.enabled:
            status = "off (enabled: false)"
        elif patch.name in disabled or "*" in disabled:
            status = f"off ({DISABLE})"
        elif patch.provided:
            status = f"nothing to patch: {patch.provided}"
        elif patch.unsupported and not check:
            status = ("SKIP: " if patch.on_error == "skip" else "FAIL: ") + patch.unsupported
        elif problems.get(patch.name):
            status = ("SKIP: " if patch.on_error == "skip" else "FAIL: ") + "; ".join(problems[patch.name])
        else:
            status = "apply" if check else "apply (targets not checked)"
        rows.append({
            "name": patch.name,
            "impl": patch.impl.name,
            "targets": {s.role: str(s.target) for s in patch.sites},
            "options": patch.options.model_dump(mode="json"),
            "on_error": patch.on_error,
            "status": status,
            "quantized_layers": _quantized_layers(patch, stack, quant),
        })
    if args.model is not None:
        chosen = f"profile {profile!r}" if profile else "no profile matches: base patches"
        headline = f"model {args.model}: {chosen}" + (f" ({setting})" if profile else "")
    elif profile:
        headline = f"profile {profile!r} ({setting})"
    else:
        names = ", ".join(base.profiles) if decided.per_model else ""
        headline = "base patches" + (f"; profiles: {names} (chosen per model)" if names else "")
    if args.json:
        out.print_json(json.dumps({"config": config.path, "digest": config.digest,
                                   "vllm_line": stack.line, "platform": stack.platform,
                                   "profile": profile, "quantization": _quant_json(quant),
                                   "patches": rows,
                                   "changes": [c.as_json() for c in changes]}))
    else:
        out.print(f"{config.stack.describe()}: {headline}")
        for change in changes:
            out.print(f"changed by {change}", markup=False)
        if quant is not None:
            schemes = ", ".join(quant.moe_schemes) or "not named"
            out.print(f"quantization: {quant.method or 'unknown method'}, MoE scheme "
                      f"{schemes} (from {quant.source})", markup=False)
        out.print(f"{config.path} (sha256 {config.digest[:12]})", markup=False)
        for text in render.plan_lines(rows, out.size.width):
            out.print(text)
    return EXIT_INVALID if any(r["status"].startswith("FAIL") for r in rows) else EXIT_OK


def _plan_profile(args: argparse.Namespace, config, decided, stack) -> tuple[str | None, str | None]:
    """The profile `plan` shows and what chose it: --profile over the environment's pin, as
    the loader chooses (effective.resolve); with --model, the profile matched to the model
    (a pinned one must match it)."""
    from ascend_patch.core.profiles import ModelInfo, select

    profile, setting = decided.profile, decided.profile_setting
    if args.profile is not None:
        if args.profile not in config.profiles:
            raise ConfigError.single(config.path, None, "profiles", f"no profile named "
                                     f"{args.profile!r} (profiles: "
                                     f"{', '.join(config.profiles) or 'none'})")
        profile, setting = args.profile, "--profile"
    if args.model is None:
        return profile, setting
    model = ModelInfo.from_name_or_path(args.model)
    if args.profile is None and not decided.per_model and setting != f"${PROFILE}":
        return profile, setting  # a child's choice, or no profiles to choose among
    pinned = profile if setting is not None else None
    # Planning another line than the installed one: match profiles against that line.
    chosen = select(config, model, pinned, stack.line if args.vllm_line else None)
    return chosen, setting if pinned is not None else ("--model" if chosen else None)


def _model_quantization(args: argparse.Namespace):
    """The model's quantization from --quantization and --model; a scheme name given to
    --quantization must be one some implementation declares."""
    from ascend_patch.core import catalog
    from ascend_patch.core.model_quant import model_quantization

    given = args.quantization
    if given is not None and given.isupper():
        known = sorted({name for impl in map(catalog.lookup, catalog.builtin_names())
                        for site_set in impl.site_sets for name in site_set.quantized_layers or ()})
        if given not in known:
            raise ConfigError.single("--quantization", None, "", (
                f"{given!r} is no quantization scheme the catalog knows (schemes: "
                f"{', '.join(known)}; or give vLLM's method name, e.g. ascend)"))
    return model_quantization(args.model, given)


def _quantized_layers(patch, stack, quant) -> str | None:
    """What the patch does with the model's quantized layers on the planned stack; None when
    nothing is known of them or the implementation does not take layers over."""
    site_set = patch.impl.site_set(stack.line, stack.platform)
    if quant is None or site_set is None or site_set.quantized_layers is None:
        return None
    taken = site_set.quantized_layers
    takes = "takes over unquantized layers " + (f"and {', '.join(taken)}" if taken else "only")
    if not quant.moe_schemes:
        if quant.method in taken:
            return f"{quant.method}: taken over"
        return f"scheme not named ({quant.method}): this stack {takes}"
    return "; ".join(
        f"{scheme}: taken over" if scheme in taken
        else f"{scheme}: NOT taken over, runs unchanged (this stack {takes})"
        for scheme in quant.moe_schemes)


def _quant_json(quant) -> dict | None:
    if quant is None:
        return None
    return {"method": quant.method, "moe_schemes": list(quant.moe_schemes),
            "source": quant.source}


def cmd_doctor(args: argparse.Namespace) -> int:
    from ascend_patch.core import catalog
    from ascend_patch.core.stacks import STACKS
    from ascend_patch.core.versions import (
        UnsupportedVllmError,
        detect_platform,
        detect_stack,
        installed_vllm,
    )

    facts: dict[str, str] = {"python": sys.version.split()[0], "machine": platform.machine()}
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda"] = "available" if torch.cuda.is_available() else "not available"
    except ImportError as exc:
        facts["torch"] = f"not importable: {exc}"
    vllm = installed_vllm()
    facts["vllm"] = str(vllm) if vllm else "not installed"
    try:
        stack = detect_stack()
        facts["vllm line"] = stack.line or "-"
    except UnsupportedVllmError as exc:
        stack = None
        facts["vllm line"] = f"UNSUPPORTED: {exc}"
    platform_name, why = detect_platform()
    facts["platform"] = f"{platform_name} ({why})"
    try:
        import torch_npu

        facts["torch_npu"] = f"importable ({torch_npu.__version__})"
    except Exception as exc:  # noqa: BLE001 - torch_npu fails in many ways without CANN
        facts["torch_npu"] = f"not importable: {type(exc).__name__}: {exc}"
    if facts.get("cuda") == "available":
        facts["cuda note"] = ("moe.capacity on CUDA is UNVERIFIED: it has never run on a GPU "
                              "(vLLM's Triton experts are handed dropped rows to skip; "
                              "scripts/gpu_check.py measures it on a GPU)")
    table = Table(title="ascend-patch doctor", show_header=False)
    for key, value in facts.items():
        table.add_row(key, value)
    out.print(table)
    for warning in plugin_filter_warnings(os.environ, installed_plugins()):
        out.print(f"WARNING: {warning}", markup=False)
    # One row per implementation, the stacks listed by what it does there: the table keeps
    # its width whatever the number of declared stacks.
    entries = Table(title="catalog: what each implementation does on each stack "
                    "(vLLM line/platform)")
    entries.add_column("implementation", no_wrap=True)
    for column in ("patches", "provided by the platform", "unsupported"):
        entries.add_column(column, overflow="fold")
    for name in catalog.builtin_names():
        impl = catalog.lookup(name)
        does: dict[str, list[str]] = {"patch": [], "provided": [], "unsupported": []}
        for declared in STACKS:
            site_set = impl.site_set(declared.line, declared.catalog_platform)
            kind = ("unsupported" if site_set is None or site_set.unsupported
                    else "patch" if site_set.sites else "provided")
            does[kind].append(declared.key)
        entries.add_row(name, *(" ".join(keys) or "-" for keys in does.values()))
    out.print(entries)
    if stack is not None and stack.line is not None:
        out.print(f"here ({stack.line}/{stack.platform}):", markup=False)
        for name in catalog.builtin_names():
            site_set = catalog.lookup(name).site_set(stack.line, stack.platform)
            here = ("not declared" if site_set is None else "patches" if site_set.sites
                    else f"nothing to do: {site_set.provided}" if site_set.provided
                    else f"unsupported: {site_set.unsupported}")
            for line in render.labelled(name, here, out.size.width):
                out.print(line, markup=False)
    else:
        out.print("here: nothing applies (no supported vLLM installed)", markup=False)
    return EXIT_OK


# The entry points whose loading VLLM_PLUGINS decides: this package's general plugin, and the
# platform plugin of vllm-ascend (without it vLLM does not see the NPUs at all).
OUR_PLUGIN = ("vllm.general_plugins", "ascend_patch")
PLATFORM_PLUGINS = {("vllm.platform_plugins", "ascend"): "vllm-ascend's platform plugin"}


def installed_plugins() -> set[tuple[str, str]]:
    """(group, name) of every installed vLLM general and platform plugin entry point."""
    from importlib.metadata import entry_points

    return {(group, ep.name) for group in ("vllm.general_plugins", "vllm.platform_plugins")
            for ep in entry_points(group=group)}


def plugin_filter_warnings(environ, installed: set[tuple[str, str]]) -> list[str]:
    """What VLLM_PLUGINS would keep vLLM from loading among the plugins this package needs.

    vLLM splits VLLM_PLUGINS on commas without trimming and loads, in every group, only the
    entry points named exactly (vllm/plugins/__init__.py, load_plugins_by_group); unset loads
    all. Our plugin is checked whether or not it is installed (a missing entry point is its own
    problem, and doctor runs from the package); platform plugins only when installed."""
    value = environ.get("VLLM_PLUGINS")
    if value is None:
        return []
    allowed = value.split(",")
    wanted = {OUR_PLUGIN: "this plugin (ASCEND_PATCH_CONFIG would be ignored: nothing is "
                          "patched)"}
    wanted.update({key: f"{what} (vLLM would run without the NPUs)"
                   for key, what in PLATFORM_PLUGINS.items() if key in installed})
    warnings = []
    for (group, name), what in wanted.items():
        if name in allowed:
            continue
        near = [a for a in allowed if a.strip() == name]
        hint = (f"{near[0]!r} has spaces around it, which vLLM does not strip" if near
                else f"add {name} to the list")
        warnings.append(f"VLLM_PLUGINS={value!r} filters out the {group} entry point {name!r}: "
                        f"vLLM will not load {what}; {hint}")
    return warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-patch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a config: schema, catalog, options, live targets")
    validate.add_argument("config", help="the config file (YAML)")
    _stack_arguments(validate)
    validate.add_argument("--source", action="append", type=_source_arg, default=[],
                          metavar="PACKAGE=DIR",
                          help="check targets under PACKAGE by reading DIR, without importing it "
                          "(e.g. vllm_ascend=vllm-ascend-0.23.0.post1/)")
    validate.set_defaults(func=cmd_validate)
    plan = sub.add_parser("plan", help="show what a config would patch")
    plan.add_argument("config", help="the config file (YAML)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--model", help="model directory or name: show the profile chosen for it")
    plan.add_argument("--profile", help="pin a profile, as ASCEND_PATCH_PROFILE does")
    plan.add_argument("--quantization", metavar="METHOD|SCHEME",
                      help="the model's quantization, when --model is not a directory that "
                      "says it: vLLM's --quantization name (e.g. ascend) or a scheme (e.g. "
                      "W8A8_DYNAMIC): shows whether its quantized layers are taken over")
    plan.add_argument("--no-check", dest="check", action="store_false",
                      help="do not import vLLM to check targets")
    _stack_arguments(plan)
    plan.set_defaults(func=cmd_plan)
    doctor = sub.add_parser("doctor", help="what this machine can run")
    doctor.set_defaults(func=cmd_doctor)
    schema = sub.add_parser("schema", help="print the JSON Schema of the config file (for "
                            "editors: yaml-language-server's $schema modeline)")
    schema.set_defaults(func=cmd_schema)
    tiny = sub.add_parser("tiny-model", help="write a tiny MoE model directory (dummy weights)")
    tiny.add_argument("out_dir", help="the folder to write the model into")
    tiny.add_argument("--arch", choices=["deepseek_v3", "mixtral", "qwen2_moe"], default="deepseek_v3")
    tiny.add_argument("--force", action="store_true",
                      help="write into OUT_DIR even if it is not empty (replacing the model files)")
    tiny.set_defaults(func=cmd_tiny_model)
    from ascend_patch.cli import ab, tune

    ab.add_parser(sub)
    tune.add_parser(sub)
    return parser


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    from ascend_patch.core.versions import LINE_NAMES, PLATFORM_ALIASES

    parser.add_argument("--vllm-line", choices=LINE_NAMES,
                        help="plan for this vLLM line instead of the installed one")
    parser.add_argument("--platform", choices=sorted(PLATFORM_ALIASES),
                        help="plan for this platform (cpu/cuda: vLLM's own layers; ascend: "
                        "vllm-ascend's) instead of the detected one")


def cmd_schema(args: argparse.Namespace) -> int:
    from ascend_patch.core.schema import schema_text

    # Plain stdout: rich would wrap or colour what is meant to be redirected into a file.
    sys.stdout.write(schema_text())
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ascend_patch.harness.tiny_model import check_out_dir, make_tiny_model

    problem = check_out_dir(args.out_dir, args.force)
    if problem:
        err.print(f"ascend-patch tiny-model: error: argument OUT_DIR: {problem}", markup=False)
        return EXIT_INVALID
    out.print(str(make_tiny_model(args.out_dir, args.arch)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        err.print(str(exc), markup=False)
        return EXIT_INVALID
    except AscendPatchError as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
