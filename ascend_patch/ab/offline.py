"""`ascend-patch ab`: the same workload through the real vLLM engine, per arm, repeated.

Arms are config files, drop ratios applied to one config's `moe.capacity` patch through
ASCEND_PATCH_OVERRIDE, and (with --stock) vLLM with no patch at all. Each arm gets one
engine process, started once and kept up (harness/offline_run.py --driver); the arms then
run the workload in randomised blocks (every arm once per block, a fresh order per block,
drawn from --seed) after a warm-up block that is not counted. The first arm is the reference
for ratios and agreement: --stock puts the unpatched engine first; otherwise make it the
dropless one.

With --servers or --launch the arms are OpenAI-compatible servers instead (servers.py).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_patch.ab import output, stats
from ascend_patch.ab.common import (
    REPORT_INTERVAL_S,
    STOCK,
    Arm,
    arm_env,
    check_arms,
    compare,
    cpus,
    describe_load,
    describe_patches,
    load_average,
    held_out_prompts,
    perplexity,
    resolve_load_format,
    summarize_reports,
)
from ascend_patch.ab.engine import EngineFailed, EngineProcess
from ascend_patch.harness import offline_run


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
            raise ConfigError.single("--patch", None, "", f"{config_path} has no moe.capacity "
                                     f"patch named {wanted!r} (have: {', '.join(ordered) or 'none'})")
        return wanted
    if not ordered:
        raise ConfigError.single("CONFIG", None, "", f"{config_path} has no moe.capacity patch "
                                 "to vary the drop ratio of")
    return ordered[0]


def outputs_digest(outputs: list[dict[str, Any]]) -> str:
    """Fingerprint of a repeat's greedy tokens: equal across repeats iff the arm repeats itself."""
    return hashlib.sha256(json.dumps([o["token_ids"] for o in outputs]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- offline run


@dataclass
class ArmRun:
    arm: Arm
    engine: EngineProcess
    report_dir: Path
    startup_s: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)  # measured repeats
    warmup: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] | None = None  # of the first measured repeat
    perplexity: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def offline_order(arms: int, repeats: int, warmup: int, seed: int) -> list[list[int]]:
    """The blocks in run order: `warmup` uncounted blocks, then `repeats` counted ones."""
    return stats.block_order(arms, warmup + repeats, seed)


def _sample(result: dict[str, Any], block: int, position: int) -> dict[str, Any]:
    outputs = result["outputs"]
    tokens = sum(o["prompt_tokens"] + len(o["token_ids"]) for o in outputs)
    wall = result["prefill_s"] + result["generate_s"]
    cpu = [result.get("prefill_cpu_s"), result.get("generate_cpu_s")]
    return {"block": block, "position": position, "prefill_s": result["prefill_s"],
            "generate_s": result["generate_s"], "tokens": tokens,
            "tokens_per_s": tokens / result["generate_s"],
            "prefill_cpu_s": cpu[0], "generate_cpu_s": cpu[1],
            # How much of the machine the engine had during the repeat: far below 1, other
            # work took the CPUs and the repeat measured the machine, not the arm.
            "cpu_share": None if None in cpu else sum(cpu) / (wall * cpus()),
            "outputs_digest": outputs_digest(outputs)}


def run_offline(args, arms: list[Arm], model: Path, prompts: list[str], work: Path,
                console) -> list[ArmRun]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    extra = ["--max-num-batched-tokens", str(max(8192, args.max_model_len)),
             "--max-model-len", str(args.max_model_len), "--seed", str(args.seed), "--driver"]
    runs = []
    for index, arm in enumerate(arms):
        cmd = offline_run.command(
            model, prompts_file, max_tokens=args.max_tokens, logprobs=5,
            tensor_parallel=args.tensor_parallel_size,
            expert_parallel=args.enable_expert_parallel, extra=tuple(extra))
        if args.load_format != "dummy":
            cmd += ["--load-format", args.load_format]
        # One folder per arm, by position: two arms never read each other's reports.
        report_dir = work / f"arm{index}-reports"
        engine = EngineProcess(arm.label, cmd, arm_env(arm, report_dir, args.tensor_parallel_size),
                               work / f"arm{index}.log")
        runs.append(ArmRun(arm, engine, report_dir))
    order = offline_order(len(arms), args.repeats, args.warmup, args.seed)
    total = len(arms) * (1 + len(order) + 1)  # start, blocks, perplexity
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("A/B", total=total)
            # Engines start one after the other: on a small machine concurrent start-ups only
            # slow each other down, and a failing one is reported before the next begins.
            for run in runs:
                progress.update(task, description=f"start {run.arm.label}")
                run.engine.start()
                run.startup_s = run.engine.wait_ready(args.timeout)
                progress.advance(task)
            last: ArmRun | None = None
            for block, members in enumerate(order):
                counted = block >= args.warmup
                for position, index in enumerate(members):
                    run = runs[index]
                    if last is not None and last is not run:
                        time.sleep(last.engine.settle_s)
                    last = run
                    what = f"block {block - args.warmup + 1}/{args.repeats}" if counted else (
                        f"warm-up {block + 1}/{args.warmup}")
                    progress.update(task, description=f"{what}: {run.arm.label}")
                    out = work / f"arm{index}-block{block}.json"
                    result = run.engine.request("run", out, args.timeout)
                    sample = _sample(result, block, position)
                    if counted:
                        run.samples.append(sample)
                        if run.outputs is None:
                            run.outputs = result["outputs"]
                    else:
                        run.warmup.append(sample)
                    out.unlink(missing_ok=True)  # the sample keeps what is needed
                    progress.advance(task)
            for index, run in enumerate(runs):
                progress.update(task, description=f"perplexity {run.arm.label}")
                try:
                    run.perplexity = run.engine.request(
                        "perplexity", work / f"arm{index}-perplexity.json", args.timeout)
                except EngineFailed as exc:
                    # Prompt logprobs are optional for the comparison: say why they are missing.
                    run.perplexity = {"error": str(exc).splitlines()[0]}
                progress.advance(task)
            # Every process rewrites its report each REPORT_INTERVAL_S: wait for one
            # rewrite after the last call, then read them while the engines are still up.
            time.sleep(REPORT_INTERVAL_S + 0.5)
            for run in runs:
                run.summary = summarize_reports(run.report_dir if run.arm.config else None)
    finally:
        for run in runs:
            run.engine.stop()
    return runs


def offline_metrics(runs: list[ArmRun], first_tokens: int) -> list[dict[str, Any]]:
    reference = runs[0]
    ref_prefill = [s["prefill_s"] for s in reference.samples]
    ref_tps = [s["tokens_per_s"] for s in reference.samples]
    rows = []
    for run in runs:
        prefill = [s["prefill_s"] for s in run.samples]
        tps = [s["tokens_per_s"] for s in run.samples]
        moe = run.summary.get("moe_stats", {})
        row: dict[str, Any] = {
            "label": run.arm.label,
            "arm": run.arm.describe(),
            "config": str(run.arm.config) if run.arm.config else None,
            "stock": run.arm.config is None,
            "drop_token_ratio": run.arm.ratio,
            "startup_s": run.startup_s,
            "cpu_share": (stats.estimate(shares) if (shares := [
                s["cpu_share"] for s in run.samples if s["cpu_share"] is not None]) else None),
            "prefill_s": stats.estimate(prefill),
            "tokens_per_s": stats.estimate(tps),
            # Reference over arm for a time, arm over reference for a rate: > 1 is better.
            "prefill_speedup": stats.estimate(stats.paired_ratios(ref_prefill, prefill)),
            "tokens_per_s_ratio": stats.estimate(stats.paired_ratios(tps, ref_tps)),
            "repeats_identical": len({s["outputs_digest"] for s in run.samples}) == 1,
            "perplexity": perplexity(run.perplexity),
            "nll": run.perplexity,  # per prompt too: an interval can be put on a difference
            "perplexity_tokens": (run.perplexity or {}).get("tokens"),
            "perplexity_error": (run.perplexity or {}).get("error"),
            "rows_routed": moe.get("rows_routed"),
            "rows_dropped": moe.get("rows_dropped"),
            "rows_dropped_pct": (100.0 * moe["drop_fraction"]
                                 if "drop_fraction" in moe else None),
            "layers": {
                name: {"max_over_mean_before": layer["max_over_mean_before"],
                       "max_over_mean_after": layer["max_over_mean_after"],
                       "drop_fraction": layer["drop_fraction"]}
                for name, layer in moe.get("layers", {}).items()
            },
            "report": run.summary,
            "samples": run.samples,
            "warmup_samples": run.warmup,
            "outputs": run.outputs,
        }
        row["prefill_verdict"] = stats.verdict(row["prefill_speedup"])
        row["tokens_per_s_verdict"] = stats.verdict(row["tokens_per_s_ratio"])
        row.update(compare(reference.outputs or [], run.outputs or [], first_tokens))
        rows.append(row)
    return rows


def print_offline(console, rows: list[dict[str, Any]], heading: str) -> None:
    labels = output.short_labels([r["label"] for r in rows])
    d_ms = output.digits_for([r["prefill_s"] for r in rows], 1000)
    d_tps = output.digits_for([r["tokens_per_s"] for r in rows])
    output.say(console, heading, "")
    per_arm = output.table(
        "Per arm: median [95% interval] over the repeats",
        ["arm", "prefill ms", "tokens/s", "CPU %", "drop %", "ppl"],
        [[label, output.fmt(r["prefill_s"], 1000, d_ms),
          output.fmt(r["tokens_per_s"], 1, d_tps),
          "-" if r["cpu_share"] is None else f"{100 * r['cpu_share'].median:.0f}",
          "-" if r["rows_dropped_pct"] is None else f"{r['rows_dropped_pct']:.2f}",
          "-" if r["perplexity"] is None else f"{r['perplexity']:.4g}"]
         for label, r in zip(labels, rows)])
    console.print(per_arm)
    reference = labels[0]
    against = output.table(
        f"Against the reference {reference}: median of per-repeat ratios [95% interval]",
        ["arm", "prefill x", "tokens/s x", "agree", "|dlogp|"],
        [[label, output.fmt(r["prefill_speedup"], 1, 3),
          output.fmt(r["tokens_per_s_ratio"], 1, 3), output.percent(r["token_agreement"], 1),
          output.dlogp(r)]
         for label, r in list(zip(labels, rows))[1:]])
    console.print(against)
    for label, row in list(zip(labels, rows))[1:]:
        output.say(console,
            f"{label} vs {reference}: prefill "
            f"{output.ratio_phrase(row['prefill_speedup'], row['prefill_verdict'])}"
            f"; tokens/s {output.ratio_phrase(row['tokens_per_s_ratio'], row['tokens_per_s_verdict'])}; "
            f"greedy outputs identical for {output.percent(row['exact_match_rate'])} of the "
            "prompts.")
    console.print("What was compared:", markup=False)
    for label, row in zip(labels, rows):
        text = f"{label}{' = ' + row['label'] if label != row['label'] else ''}: {row['arm']}"
        if row["report"]:
            text += "; reported: " + describe_patches(row["report"])
        if row["layers"]:
            text += "; max/mean load before->after " + ", ".join(
                f"{v['max_over_mean_before']:.2f}->{v['max_over_mean_after']:.2f}"
                for v in row["layers"].values())
        if not row["repeats_identical"]:
            text += "; NOTE its greedy tokens differed between repeats"
        output.say(console, "  " + text, "    ")
    output.say(console,
        "Legend: prefill ms = one batch of every prompt with 1 new token; tokens/s = (prompt + "
        "generated) tokens per second of the greedy generation; x = reference/arm time or "
        "arm/reference rate per repeat pair (>1: arm faster); brackets = exact "
        "order-statistic 95% interval of the median (none below 6 repeats); agree = greedy "
        "tokens equal to the reference's, by position; |dlogp| = mean "
        "abs logprob difference of the reference's tokens over the first positions; CPU % = "
        "median CPU time of the arm's engine processes / (wall time x CPUs) per repeat (far "
        "below 100: other work had the machine); drop % = "
        "routed rows dropped (moe.capacity report); ppl = perplexity of the prompts from "
        "prompt logprobs.", "")


def run_ab(args) -> int:
    from rich.console import Console

    from ascend_patch.harness.tiny_model import make_tiny_model

    console = Console(highlight=False)
    arms = build_arms(args)
    check_arms(arms)  # before any engine starts (and before anything is written)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=out_dir))
    model = Path(args.model) if args.model else make_tiny_model(work / "tiny-deepseek-v3")
    args.load_format = resolve_load_format(args.load_format, model)
    prompts = held_out_prompts(args)
    load_before = load_average()
    try:
        runs = run_offline(args, arms, model, prompts, work, console)
    except EngineFailed as exc:
        console.print(str(exc), markup=False)
        return 1
    rows = offline_metrics(runs, args.first_tokens)
    source = (f"{len(prompts)} prompts from {args.prompts_file}" if args.prompts is not None
              else f"{len(prompts)} generated prompts x {args.prompt_len} words")
    heading = (f"A/B on {model.name} ({args.load_format} weights): {source}, {args.max_tokens} "
               f"new tokens, {args.repeats} repeats after {args.warmup} warm-up block(s), "
               f"randomised blocks (seed {args.seed}); one engine per arm, started in "
               + ", ".join(f"{r['startup_s']:.0f} s" for r in rows)
               + f". {describe_load(load_before, load_average())}")
    print_offline(console, rows, heading)
    summary = {
        "mode": "offline", "model": str(model), "load_format": args.load_format,
        "prompts": prompts, "prompts_file": args.prompts_file, "max_tokens": args.max_tokens,
        "seed": args.seed, "repeats": args.repeats, "warmup": args.warmup,
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel": args.enable_expert_parallel,
        "order": [[rows[i]["label"] for i in block] for block in
                  offline_order(len(arms), args.repeats, args.warmup, args.seed)],
        "interval": "exact order-statistic (binomial) 95% interval of the median",
        "load_average_before": load_before, "load_average_after": load_average(),
        "cpus": cpus(), "work_dir": str(work), "arms": output.as_json(rows),
    }
    output.save(console, out_dir, summary, rows, f"A/B on {model.name}",
                {"prefill speed-up": "prefill_speedup", "tokens/s ratio": "tokens_per_s_ratio"})
    return 0


def build_arms(args) -> list[Arm]:
    if args.arms:
        arms = [Arm(Path(p).stem, Path(p).resolve()) for p in args.arms]
    else:
        config = Path(args.config).resolve()
        arms = arms_from_ratios(config, capacity_patch_name(config, args.patch), args.ratios)
    if args.stock:
        arms.insert(0, Arm(STOCK, None))
    return unique_labels(arms)
