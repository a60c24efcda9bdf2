"""`ascend-patch`: validate a config, show what it would patch, check this machine.

Exit codes: 0 fine, 2 the config (or a patch of it) cannot be applied here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ascend_patch.core.errors import AscendPatchError, ConfigError

EXIT_OK = 0
EXIT_INVALID = 2

# Messages are never wrapped: they carry file paths that users copy and tests compare.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _load(path: str):
    from ascend_patch.core.config import load_config

    return load_config(path)


def cmd_validate(args: argparse.Namespace) -> int:
    from ascend_patch.core.live import live_problems

    config = _load(args.config)
    problems = live_problems(config)
    failed = False
    for patch in config.patches:
        for problem in problems[patch.name]:
            failed = True
            err.print(f"{patch.file}:{patch.line}: patches.{patch.name}: {problem}", markup=False)
    if failed:
        return EXIT_INVALID
    out.print(f"{config.path}: OK ({len(config.patches)} patches, sha256 {config.digest[:12]})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    import os

    from ascend_patch.core.live import live_problems
    from ascend_patch.core.profiles import ModelInfo, select
    from ascend_patch.core.runtime import DISABLE_ENV, parse_disabled

    config = _load(args.config)
    disabled = parse_disabled(os.environ.get(DISABLE_ENV), config)
    if args.profile is not None and args.profile not in config.profiles:
        raise ConfigError.single(config.path, None, "profiles", f"no profile named {args.profile!r} "
                                 f"(profiles: {', '.join(config.profiles) or 'none'})")
    profile = args.profile
    if args.model is not None:
        profile = select(config, ModelInfo.from_name_or_path(args.model), args.profile)
    config = config.with_profile(profile)
    problems = live_problems(config) if args.check else {}
    rows = []
    for patch in config.patches:
        if not patch.enabled:
            status = "off (enabled: false)"
        elif patch.name in disabled or "*" in disabled:
            status = f"off ({DISABLE_ENV})"
        elif problems.get(patch.name):
            status = ("SKIP: " if patch.on_error == "skip" else "FAIL: ") + "; ".join(problems[patch.name])
        else:
            status = "apply" if args.check else "apply (targets not checked)"
        rows.append({
            "name": patch.name,
            "impl": patch.impl.name,
            "targets": {s.role: str(s.target) for s in patch.sites},
            "options": patch.options.model_dump(mode="json"),
            "on_error": patch.on_error,
            "status": status,
        })
    if args.model is not None:
        chosen = f"profile {profile!r}" if profile else "no profile matches: base patches"
        how = "pinned" if args.profile else "matched"
        headline = f"model {args.model}: {chosen}" + (f" ({how})" if profile else "")
    elif profile:
        headline = f"profile {profile!r} (pinned)"
    else:
        names = ", ".join(config.profiles)
        headline = "base patches" + (f"; profiles: {names} (chosen per model)" if names else "")
    if args.json:
        out.print_json(json.dumps({"config": config.path, "digest": config.digest,
                                   "profile": profile, "patches": rows}))
    else:
        out.print(headline)
        table = Table(title=f"{config.path} (sha256 {config.digest[:12]})")
        for column in ("patch", "impl", "target", "options (after defaults)", "status"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(
                row["name"], row["impl"], "\n".join(row["targets"].values()),
                "\n".join(f"{k}={v}" for k, v in row["options"].items()) or "-", row["status"],
            )
        out.print(table)
    return EXIT_INVALID if any(r["status"].startswith("FAIL") for r in rows) else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from ascend_patch.core import catalog
    from ascend_patch.core.versions import installed_vllm, version_matches

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
        import torch_npu

        facts["torch_npu"] = f"importable ({torch_npu.__version__})"
        npu = True
    except Exception as exc:  # noqa: BLE001 - torch_npu fails in many ways without CANN
        facts["torch_npu"] = f"not importable: {type(exc).__name__}: {exc}"
        npu = False
    device = "npu" if npu else ("cuda" if facts.get("cuda") == "available" else "cpu")
    facts["platform"] = device
    table = Table(title="ascend-patch doctor", show_header=False)
    for key, value in facts.items():
        table.add_row(key, value)
    out.print(table)
    entries = Table(title="catalog")
    for column in ("implementation", "vLLM versions", "platforms", "runs here"):
        entries.add_column(column)
    for name in catalog.builtin_names():
        impl = catalog.lookup(name)
        reasons = []
        if vllm is None or not version_matches(vllm.version, impl.vllm_versions):
            reasons.append(f"needs vLLM {impl.vllm_versions}")
        if device not in impl.platforms:
            reasons.append(f"not for {device}")
        entries.add_row(name, impl.vllm_versions, ", ".join(impl.platforms), "yes" if not reasons else "no: " + "; ".join(reasons))
    out.print(entries)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-patch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a config: schema, catalog, options, live targets")
    validate.add_argument("config")
    validate.set_defaults(func=cmd_validate)
    plan = sub.add_parser("plan", help="show what a config would patch")
    plan.add_argument("config")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--model", help="model directory or name: show the profile chosen for it")
    plan.add_argument("--profile", help="pin a profile, as ASCEND_PATCH_PROFILE does")
    plan.add_argument("--no-check", dest="check", action="store_false",
                      help="do not import vLLM to check targets")
    plan.set_defaults(func=cmd_plan)
    doctor = sub.add_parser("doctor", help="what this machine can run")
    doctor.set_defaults(func=cmd_doctor)
    tiny = sub.add_parser("tiny-model", help="write a tiny MoE model directory (dummy weights)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", choices=["deepseek_v3", "mixtral", "qwen2_moe"], default="deepseek_v3")
    tiny.add_argument("--force", action="store_true",
                      help="write into OUT_DIR even if it is not empty (replacing the model files)")
    tiny.set_defaults(func=cmd_tiny_model)
    from ascend_patch.cli import ab

    ab.add_parser(sub)
    return parser


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ascend_patch.cli.tiny_model import check_out_dir, make_tiny_model

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
