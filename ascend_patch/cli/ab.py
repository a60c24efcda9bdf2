"""`ascend-patch ab`: the same workload through the real vLLM engine once per arm.

Arms are config files, or drop ratios applied to one config's `moe.capacity` patch through
ASCEND_PATCH_OVERRIDE. Each arm runs in its own process (a fresh vLLM with its own patches);
the first arm is the reference for agreement, so make it the dropless one.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_patch.cli import offline_run
from ascend_patch.cli.procs import run_in_group, vllm_env
from ascend_patch.core.report import read_reports


@dataclass
class Arm:
    label: str
    config: Path
    override: dict[str, dict[str, Any]] | None = None
    ratio: float | None = None


@dataclass
class ArmResult:
    arm: Arm
    result: dict[str, Any]
    moe_stats: dict[str, Any]
    log_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class ArmFailed(RuntimeError):
    pass


def make_prompts(count: int, length: int, seed: int, vocab: int = 500) -> list[str]:
    """Deterministic prompts of `length` words of the tiny model's WordLevel vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(length)) for _ in range(count)]


def arms_from_ratios(config: Path, patch_name: str, ratios: list[float]) -> list[Arm]:
    return unique_labels([
        Arm(f"r={ratio:g}", config, {patch_name: {"drop_token_ratio": ratio}}, ratio)
        for ratio in ratios
    ])


def unique_labels(arms: list[Arm]) -> list[Arm]:
    """Arms labelled apart ('r=0', 'r=0#2'): labels name logs and rows; folders use indexes."""
    seen: dict[str, int] = {}
    for arm in arms:
        count = seen[arm.label] = seen.get(arm.label, 0) + 1
        if count > 1:
            arm.label = f"{arm.label}#{count}"
    return arms


def capacity_patch_name(config_path: Path, wanted: str | None) -> str:
    from ascend_patch.core.config import load_config
    from ascend_patch.core.errors import ConfigError

    config = load_config(config_path)
    names = set()
    for variant in [None, *config.profiles]:
        names |= {p.name for p in config.with_profile(variant).patches
                  if p.impl.name == "moe.capacity"}
    ordered = [p.name for p in config.patches if p.name in names] + sorted(
        names - {p.name for p in config.patches})
    if wanted is not None:
        if wanted not in names:
            have = ", ".join(ordered) or "none"
            raise ConfigError.single("--patch", None, "", f"{config_path} has no moe.capacity "
                                     f"patch named {wanted!r} (have: {have})")
        return wanted
    if not ordered:
        raise ConfigError.single("CONFIG", None, "", f"{config_path} has no moe.capacity patch "
                                 "to vary the drop ratio of")
    return ordered[0]


def check_arms(arms: list[Arm]) -> None:
    """Everything an arm needs, checked before any engine starts: its config loads, its
    override validates (for the base patches and every profile), and its environment is
    accepted by the loader. Raises ConfigError naming the arm."""
    from ascend_patch.core import runtime
    from ascend_patch.core.config import load_config
    from ascend_patch.core.errors import ConfigError
    from ascend_patch.core.settings import Settings

    problems = []
    for arm in arms:
        try:
            config = load_config(arm.config)
            env = {runtime.CONFIG_ENV: str(arm.config)}
            if arm.override:
                env[runtime.OVERRIDE_ENV] = json.dumps(arm.override)
            values = Settings.from_environ(env)
            if values.override is not None:
                runtime._check_override(config, values.override)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)


def run_arm(arm: Arm, model: Path, prompts_file: Path, work: Path, *, max_tokens: int,
            logprobs: int, tensor_parallel: int, expert_parallel: bool, timeout: float,
            index: int = 0) -> ArmResult:
    # One folder per arm, by position: two arms never read each other's reports.
    report_dir = work / f"arm{index}-reports"
    env = {"ASCEND_PATCH_CONFIG": str(arm.config), "ASCEND_PATCH_REPORT_DIR": str(report_dir)}
    if arm.override:
        env["ASCEND_PATCH_OVERRIDE"] = json.dumps(arm.override)
    cmd = offline_run.command(
        model, prompts_file, max_tokens=max_tokens, logprobs=logprobs,
        tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
        extra=("--measure-prefill", "--max-num-batched-tokens", "8192"))
    code, log = run_in_group(cmd, vllm_env(workers=tensor_parallel, **env), timeout)
    log_path = work / f"arm{index}.log"
    log_path.write_text(log)
    result = offline_run.parse_result(log)
    if code != 0 or result is None:
        raise ArmFailed(f"arm {arm.label} failed (exit {code}); log {log_path}:\n{log[-3000:]}")
    return ArmResult(arm, result, _moe_stats(report_dir), log_path)


def _moe_stats(report_dir: Path) -> dict[str, Any]:
    """moe.capacity counters of the first worker (counts are global over the EP group)."""
    workers = sorted((r for r in read_reports(report_dir) if "Worker" in r["role"]),
                     key=lambda r: r["role"])
    for report in workers:
        for patch in report["patches"]:
            if patch["impl"] == "moe.capacity" and patch["status"] == "applied":
                return patch["stats"]
    return {}


def compare(reference: ArmResult, arm: ArmResult, first_tokens: int) -> dict[str, Any]:
    ref_outs, outs = reference.result["outputs"], arm.result["outputs"]
    exact = sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref_outs, outs))
    same_tokens = total_tokens = 0
    diffs: list[float] = []
    missing = 0
    for ref, out in zip(ref_outs, outs):
        for i, (a, b) in enumerate(zip(ref["token_ids"], out["token_ids"])):
            total_tokens += 1
            same_tokens += a == b
        # Logprob of the reference's token under each arm, over the first positions where the
        # two arms still saw the same text (after a divergence the contexts differ).
        for i in range(min(first_tokens, len(ref["top_logprobs"]), len(out["top_logprobs"]))):
            token = str(ref["token_ids"][i])
            if token not in out["top_logprobs"][i]:
                missing += 1
                break
            diffs.append(abs(out["top_logprobs"][i][token] - ref["top_logprobs"][i][token]))
            if ref["token_ids"][i] != out["token_ids"][i]:
                break
    return {
        "exact_match_rate": exact / len(ref_outs) if ref_outs else 1.0,
        "token_agreement": same_tokens / total_tokens if total_tokens else 1.0,
        "first_logprob_mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
        "first_logprob_positions": len(diffs),
        "first_logprob_missing": missing,
    }


def arm_metrics(arm: ArmResult, reference: ArmResult, first_tokens: int) -> dict[str, Any]:
    result = arm.result
    prompt_tokens = sum(o["prompt_tokens"] for o in result["outputs"])
    generated = sum(len(o["token_ids"]) for o in result["outputs"])
    stats = arm.moe_stats
    layers = stats.get("layers", {})
    metrics = {
        "label": arm.arm.label,
        "config": str(arm.arm.config),
        "drop_token_ratio": arm.arm.ratio,
        "tokens_per_s": (prompt_tokens + generated) / result["generate_s"],
        "prefill_s": result["prefill_s"],
        "speedup_vs_reference": reference.result["prefill_s"] / result["prefill_s"],
        "rows_routed": stats.get("rows_routed", 0),
        "rows_dropped": stats.get("rows_dropped", 0),
        "rows_dropped_pct": 100.0 * stats.get("drop_fraction", 0.0),
        "layers": {
            name: {"max_over_mean_before": layer["max_over_mean_before"],
                   "max_over_mean_after": layer["max_over_mean_after"],
                   "drop_fraction": layer["drop_fraction"]}
            for name, layer in layers.items()
        },
    }
    metrics.update(compare(reference, arm, first_tokens))
    return metrics


# matplotlib is an optional extra: the JSON and the table are the results, the PNG a view.
PLOT_HINT = "pip install 'ascend-patch[tools]'"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_skipped_line(name: str) -> str:
    return f"{name} skipped: matplotlib is not installed (to get it: {PLOT_HINT})"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The speed-up / agreement chart; None when there is nothing to draw (fewer than two
    ratio arms) or no matplotlib."""
    points = [r for r in rows if r["drop_token_ratio"] is not None]
    plt = pyplot() if len(points) >= 2 else None
    if plt is None:
        return None
    ratios = [r["drop_token_ratio"] for r in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ratios, [r["speedup_vs_reference"] for r in points], "o-", label="prefill speed-up")
    ax.set_xlabel("drop_token_ratio")
    ax.set_ylabel("prefill speed-up vs reference arm")
    ax2 = ax.twinx()
    ax2.plot(ratios, [100 * r["token_agreement"] for r in points], "s--", color="tab:red",
             label="token agreement %")
    ax2.set_ylabel("generated-token agreement with reference (%)")
    fig.legend(loc="lower left")
    ax.set_title("A/B: speed-up and agreement against drop ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_ab(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ascend_patch.cli.tiny_model import make_tiny_model

    console = Console(highlight=False, soft_wrap=True)
    if args.arms:
        arms = unique_labels([Arm(Path(p).stem, Path(p).resolve()) for p in args.arms])
    else:
        config = Path(args.config).resolve()
        arms = arms_from_ratios(config, capacity_patch_name(config, args.patch), args.ratios)
    check_arms(arms)  # before any engine starts (and before anything is written)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=out_dir))
    model = Path(args.model) if args.model else make_tiny_model(work / "tiny-deepseek-v3")
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(make_prompts(args.prompts, args.prompt_len, args.seed)))

    results: list[ArmResult] = []
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("A/B arms", total=len(arms))
        for index, arm in enumerate(arms):
            progress.update(task, description=f"arm {arm.label}")
            try:
                results.append(run_arm(
                    arm, model, prompts_file, work, max_tokens=args.max_tokens, logprobs=5,
                    tensor_parallel=args.tensor_parallel_size, expert_parallel=args.enable_expert_parallel,
                    timeout=args.timeout, index=index))
            except ArmFailed as exc:
                console.print(str(exc), markup=False)
                return 1
            progress.advance(task)

    rows = [arm_metrics(r, results[0], args.first_tokens) for r in results]
    summary = {"model": str(model), "prompts": args.prompts, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "seed": args.seed, "arms": rows}
    write_results(summary, out_dir, console)
    return 0


def write_results(summary: dict[str, Any], out_dir: Path, console: Any) -> None:
    """The table, ab.json, and ab.png when matplotlib is there (one line saying how to get it
    when it is not)."""
    from rich.table import Table

    rows = summary["arms"]
    table = Table(title=f"A/B on {Path(summary['model']).name}: {summary['prompts']} prompts x "
                        f"{summary['prompt_len']} words, {summary['max_tokens']} new tokens "
                        f"(reference: {rows[0]['label']})")
    for column in ("arm", "tokens/s", "prefill s", "speed-up", "rows dropped %", "max/mean before->after",
                   "exact match", "token agree", "|dlogprob| first"):
        table.add_column(column, justify="right")
    for row in rows:
        layer_text = "; ".join(f"{v['max_over_mean_before']:.2f}->{v['max_over_mean_after']:.2f}"
                               for v in row["layers"].values()) or "-"
        table.add_row(row["label"], f"{row['tokens_per_s']:.0f}", f"{row['prefill_s']:.3f}",
                      f"{row['speedup_vs_reference']:.3f}", f"{row['rows_dropped_pct']:.2f}", layer_text,
                      f"{100 * row['exact_match_rate']:.0f}%", f"{100 * row['token_agreement']:.1f}%",
                      f"{row['first_logprob_mean_abs_diff']:.4f}")
    console.print(table)
    json_path = out_dir / "ab.json"
    json_path.write_text(json.dumps(summary, indent=2))
    png = plot(rows, out_dir / "ab.png")
    console.print(f"wrote {json_path}" + (f" and {png}" if png else ""), markup=False)
    if png is None and pyplot() is None:
        console.print(plot_skipped_line("ab.png"), markup=False)


# Bounds of the numeric arguments: beyond them a run would exhaust memory or never end.
_LIMITS = {
    "prompts": (1, 10_000), "prompt_len": (1, 100_000), "max_tokens": (1, 100_000),
    "first_tokens": (0, 100_000), "seed": (0, 2**32 - 1), "tensor_parallel_size": (1, 64),
    "tokens": (1, 1 << 20), "experts": (1, 4096), "top_k": (1, 64), "ep_size": (1, 1024),
    "hidden": (1, 65536), "intermediate": (1, 65536), "reps": (1, 1000), "threads": (1, 256),
}
MAX_RATIO = 0.5  # moe.capacity's drop_token_ratio range is [0, 0.5]


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= 7 * 86400):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (more than 0, at most a week)")
    return value


def _ratios(text: str) -> list[float]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r}: give drop ratios separated by commas, "
                                         "e.g. 0,0.02,0.05")
    ratios = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if not (math.isfinite(value) and 0 <= value <= MAX_RATIO):
            raise argparse.ArgumentTypeError(f"{item!r} is out of range (drop_token_ratio is in "
                                             f"[0, {MAX_RATIO}])")
        ratios.append(value)
    return ratios


def _skews(text: str) -> list[float | str]:
    from ascend_patch.impls.moe.routing_sim import SKEWS

    skews: list[float | str] = []
    for item in (t.strip() for t in text.split(",")):
        if item in SKEWS:
            skews.append(item)
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is neither a number nor one of {', '.join(SKEWS)}") from None
        if not (math.isfinite(value) and value >= 1.0):
            raise argparse.ArgumentTypeError(f"{item!r}: a max/mean load is a number >= 1")
        skews.append(value)
    return skews


def _policies(text: str) -> list[str]:
    from ascend_patch.cli.ab_layer import POLICIES

    policies = [t.strip() for t in text.split(",")]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: policies are "
                                         f"{', '.join(POLICIES)}")
    return policies


def add_parser(sub) -> None:
    ab = sub.add_parser("ab", help="A/B drop ratios or configs through the real vLLM engine "
                                   "(or, with --layer, on the MoE layer alone)")
    n = {name: _int_in(*bounds) for name, bounds in _LIMITS.items()}
    ab.add_argument("config", nargs="?", help="config whose moe.capacity patch is varied by --ratios")
    ab.add_argument("--arms", nargs="+", help="config files, one arm each (instead of --ratios)")
    ab.add_argument("--ratios", type=_ratios, default=_ratios("0,0.05,0.1"),
                    help="drop ratios, comma separated; first is the reference")
    ab.add_argument("--patch", help="name of the moe.capacity patch to vary (default: the first)")
    ab.add_argument("--model", help="model directory (default: a generated tiny DeepseekV3)")
    ab.add_argument("--prompts", type=n["prompts"], default=8)
    ab.add_argument("--prompt-len", type=n["prompt_len"], default=200, help="words per prompt")
    ab.add_argument("--max-tokens", type=n["max_tokens"], default=16)
    ab.add_argument("--first-tokens", type=n["first_tokens"], default=4,
                    help="positions compared by logprob")
    ab.add_argument("--seed", type=n["seed"], default=0)
    ab.add_argument("--tensor-parallel-size", type=n["tensor_parallel_size"], default=1)
    ab.add_argument("--enable-expert-parallel", action="store_true")
    ab.add_argument("--timeout", type=_seconds, default=600.0, help="seconds per arm")
    ab.add_argument("--out", default="ab-out", help="directory for ab.json, ab.png and logs")
    ab.add_argument("--layer", action="store_true", help="MoE layer alone on synthetic routing")
    g = ab.add_argument_group("--layer (MoE layer alone on synthetic DeepSeek-V3 routing)")
    g.add_argument("--skews", type=_skews, default=_skews("balanced,moderate,r1"),
                   help="target per-rank max/mean at --ep-size: names (balanced=1.0, "
                        "moderate=1.5, r1=2.5) or numbers, comma separated")
    g.add_argument("--tokens", type=n["tokens"], default=4096)
    g.add_argument("--experts", type=n["experts"], default=256)
    g.add_argument("--top-k", type=n["top_k"], default=8)
    g.add_argument("--ep-size", type=n["ep_size"], default=16, help="simulated EP size")
    g.add_argument("--hidden", type=n["hidden"], default=1024,
                   help="hidden size (DeepSeek-V3: 7168)")
    g.add_argument("--intermediate", type=n["intermediate"], default=256,
                   help="expert intermediate size (DeepSeek-V3: 2048)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--policies", type=_policies, default=_policies("probs,position,seed"))
    g.add_argument("--reps", type=n["reps"], default=9, help="timing repetitions (medians)")
    g.add_argument("--threads", type=n["threads"], default=1, help="torch threads while timing")
    g.add_argument("--no-keep-top1", action="store_true")
    g.add_argument("--no-timing", action="store_true", help="skip the bottleneck-rank timing")
    ab.set_defaults(func=_dispatch, ab_parser=ab)


def check_args(args) -> str | None:
    """What is wrong with a combination of arguments (each alone was checked by its type)."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"argument --out: {args.out} exists and is not a folder"
    if args.layer:
        from ascend_patch.impls.moe.routing_sim import NUM_GROUPS, TOPK_GROUPS

        if args.experts % args.ep_size:
            return (f"argument --experts: {args.experts} experts do not split evenly over "
                    f"--ep-size {args.ep_size}")
        groups = NUM_GROUPS if args.experts % NUM_GROUPS == 0 else 1
        reachable = min(TOPK_GROUPS, groups) * (args.experts // groups)
        if args.top_k > reachable:
            return (f"argument --top-k: {args.top_k} is more than the {reachable} experts the "
                    f"grouped router can choose among {args.experts}")
        for skew in args.skews:
            if not isinstance(skew, str) and skew > args.ep_size:
                return (f"argument --skews: {skew:g} is above {args.ep_size}, the largest "
                        f"max/mean load over --ep-size {args.ep_size} ranks")
        return None
    if args.arms and args.config:
        return "give a CONFIG (with --ratios) or --arms FILE ..., not both"
    if not args.arms and not args.config:
        return "give a CONFIG (with --ratios) or --arms FILE ..."
    for path in [*(args.arms or ()), *([args.config] if args.config else [])]:
        if not Path(path).is_file():
            which = "--arms" if args.arms else "CONFIG"
            return f"argument {which}: {path} is not a file"
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        return f"argument --model: {args.model} is not a model directory (no config.json)"
    return None


def _dispatch(args) -> int:
    problem = check_args(args)
    if problem:
        args.ab_parser.error(problem)
    if args.layer:
        from ascend_patch.cli.ab_layer import run_layer_ab

        return run_layer_ab(args)
    return run_ab(args)
