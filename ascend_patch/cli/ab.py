"""`ascend-patch ab`: the same workload through the real vLLM engine once per arm.

Arms are config files, or drop ratios applied to one config's `moe.capacity` patch through
ASCEND_PATCH_OVERRIDE. Each arm runs in its own process (a fresh vLLM with its own patches);
the first arm is the reference for agreement, so make it the dropless one.
"""

from __future__ import annotations

import json
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
    return [
        Arm(f"r={ratio:g}", config, {patch_name: {"drop_token_ratio": ratio}}, ratio)
        for ratio in ratios
    ]


def capacity_patch_name(config_path: Path, wanted: str | None) -> str:
    from ascend_patch.core.config import load_config

    config = load_config(config_path)
    names = [p.name for p in config.patches if p.impl.name == "moe.capacity"]
    if wanted is not None:
        if wanted not in names:
            raise SystemExit(f"{config_path}: no moe.capacity patch named {wanted!r} (have: {names})")
        return wanted
    if not names:
        raise SystemExit(f"{config_path}: has no moe.capacity patch to vary the drop ratio of")
    return names[0]


def run_arm(arm: Arm, model: Path, prompts_file: Path, work: Path, *, max_tokens: int,
            logprobs: int, tensor_parallel: int, expert_parallel: bool, timeout: float) -> ArmResult:
    report_dir = work / f"reports-{arm.label}"
    env = {"ASCEND_PATCH_CONFIG": str(arm.config), "ASCEND_PATCH_REPORT_DIR": str(report_dir)}
    if arm.override:
        env["ASCEND_PATCH_OVERRIDE"] = json.dumps(arm.override)
    cmd = offline_run.command(
        model, prompts_file, max_tokens=max_tokens, logprobs=logprobs,
        tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
        extra=("--measure-prefill", "--max-num-batched-tokens", "8192"))
    code, log = run_in_group(cmd, vllm_env(workers=tensor_parallel, **env), timeout)
    log_path = work / f"arm-{arm.label}.log"
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


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    points = [r for r in rows if r["drop_token_ratio"] is not None]
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    from rich.table import Table

    from ascend_patch.cli.tiny_model import make_tiny_model

    console = Console(highlight=False, soft_wrap=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=out_dir))
    model = Path(args.model) if args.model else make_tiny_model(work / "tiny-deepseek-v3")
    if args.arms:
        arms = [Arm(Path(p).stem, Path(p).resolve()) for p in args.arms]
    else:
        config = Path(args.config).resolve()
        ratios = [float(r) for r in args.ratios.split(",")]
        arms = arms_from_ratios(config, capacity_patch_name(config, args.patch), ratios)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(make_prompts(args.prompts, args.prompt_len, args.seed)))

    results: list[ArmResult] = []
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("A/B arms", total=len(arms))
        for arm in arms:
            progress.update(task, description=f"arm {arm.label}")
            try:
                results.append(run_arm(
                    arm, model, prompts_file, work, max_tokens=args.max_tokens, logprobs=5,
                    tensor_parallel=args.tensor_parallel_size, expert_parallel=args.enable_expert_parallel,
                    timeout=args.timeout))
            except ArmFailed as exc:
                console.print(str(exc), markup=False)
                return 1
            progress.advance(task)

    rows = [arm_metrics(r, results[0], args.first_tokens) for r in results]
    table = Table(title=f"A/B on {model.name}: {args.prompts} prompts x {args.prompt_len} words, "
                        f"{args.max_tokens} new tokens (reference: {rows[0]['label']})")
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
    summary = {"model": str(model), "prompts": args.prompts, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "seed": args.seed, "arms": rows}
    json_path = out_dir / "ab.json"
    json_path.write_text(json.dumps(summary, indent=2))
    png = plot(rows, out_dir / "ab.png")
    console.print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


def add_parser(sub) -> None:
    ab = sub.add_parser("ab", help="A/B drop ratios or configs through the real vLLM engine "
                                   "(or, with --layer, on the MoE layer alone)")
    ab.add_argument("config", nargs="?", help="config whose moe.capacity patch is varied by --ratios")
    ab.add_argument("--arms", nargs="+", help="config files, one arm each (instead of --ratios)")
    ab.add_argument("--ratios", default="0,0.05,0.1", help="drop ratios, comma separated; first is the reference")
    ab.add_argument("--patch", help="name of the moe.capacity patch to vary (default: the first)")
    ab.add_argument("--model", help="model directory (default: a generated tiny DeepseekV3)")
    ab.add_argument("--prompts", type=int, default=8)
    ab.add_argument("--prompt-len", type=int, default=200, help="words per prompt")
    ab.add_argument("--max-tokens", type=int, default=16)
    ab.add_argument("--first-tokens", type=int, default=4, help="positions compared by logprob")
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--tensor-parallel-size", type=int, default=1)
    ab.add_argument("--enable-expert-parallel", action="store_true")
    ab.add_argument("--timeout", type=float, default=600.0, help="seconds per arm")
    ab.add_argument("--out", default="ab-out", help="directory for ab.json, ab.png and logs")
    ab.add_argument("--layer", action="store_true", help="MoE layer alone on synthetic routing")
    g = ab.add_argument_group("--layer (MoE layer alone on synthetic DeepSeek-V3 routing)")
    g.add_argument("--skews", default="balanced,moderate,r1",
                   help="target per-rank max/mean at --ep-size: names (balanced=1.0, "
                        "moderate=1.5, r1=2.5) or numbers, comma separated")
    g.add_argument("--tokens", type=int, default=4096)
    g.add_argument("--experts", type=int, default=256)
    g.add_argument("--top-k", type=int, default=8)
    g.add_argument("--ep-size", type=int, default=16, help="simulated EP size")
    g.add_argument("--hidden", type=int, default=1024, help="hidden size (DeepSeek-V3: 7168)")
    g.add_argument("--intermediate", type=int, default=256,
                   help="expert intermediate size (DeepSeek-V3: 2048)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--policies", default="probs,position,seed")
    g.add_argument("--reps", type=int, default=9, help="timing repetitions (medians)")
    g.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    g.add_argument("--no-keep-top1", action="store_true")
    g.add_argument("--no-timing", action="store_true", help="skip the bottleneck-rank timing")
    ab.set_defaults(func=_dispatch)


def _dispatch(args) -> int:
    if args.layer:
        from ascend_patch.cli.ab_layer import run_layer_ab

        return run_layer_ab(args)
    if not args.arms and not args.config:
        raise SystemExit("ascend-patch ab: give a CONFIG (with --ratios) or --arms FILE ...")
    return run_ab(args)
