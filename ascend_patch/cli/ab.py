"""`ascend-patch ab`: the same workload through the real vLLM engine, per arm, repeated.

Arms are config files, drop ratios applied to one config's `moe.capacity` patch through
ASCEND_PATCH_OVERRIDE, and (with --stock) vLLM with no patch at all. Each arm gets one
engine process, started once and kept up (offline_run.py --driver); the arms then run the
workload in randomised blocks (every arm once per block, a fresh order per block, drawn from
--seed) after a warm-up block that is not counted. The first arm is the reference for
ratios and agreement: --stock puts the unpatched engine first; otherwise make it the
dropless one.

With --servers or --launch the arms are OpenAI-compatible servers instead (ab_server.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_patch.cli import ab_output, ab_stats, offline_run
from ascend_patch.cli.ab_engine import EngineFailed, EngineProcess
from ascend_patch.cli.procs import vllm_env
from ascend_patch.core.report import read_reports

STOCK = "stock"
# vLLM's TP workers poll their message queue busily for 1 s after each step before they fall
# back to sleeping (shm_broadcast.py: busy_loop_s=1 in vLLM 0.23 and 0.32). Started side by
# side, an arm that just ran would take CPU from the next one: wait that second out.
TP_SETTLE_S = 1.2
DEFAULT_REPEATS = 9
# How often an arm's processes rewrite their reports: ab reads them while the engines are up
# (vLLM's workers are killed, not asked, at the end, so a report written at exit may be lost).
REPORT_INTERVAL_S = 0.5


@dataclass
class Arm:
    label: str
    config: Path | None  # None: stock vLLM, ASCEND_PATCH_CONFIG unset
    override: dict[str, dict[str, Any]] | None = None
    ratio: float | None = None

    def describe(self) -> str:
        if self.config is None:
            return "vLLM with no patch (ASCEND_PATCH_CONFIG unset)"
        text = str(self.config)
        if self.override:
            text += " with ASCEND_PATCH_OVERRIDE=" + json.dumps(self.override)
        return text


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
            raise ConfigError.single("--patch", None, "", f"{config_path} has no moe.capacity "
                                     f"patch named {wanted!r} (have: {', '.join(ordered) or 'none'})")
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
        if arm.config is None:
            continue  # stock: nothing to check
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


def arm_env(arm: Arm, report_dir: Path | None, workers: int) -> dict[str, str]:
    """The arm's environment: vllm_env drops every inherited ASCEND_PATCH_* variable, so the
    stock arm runs with no config at all."""
    env: dict[str, str] = {}
    if arm.config is not None:
        env["ASCEND_PATCH_CONFIG"] = str(arm.config)
        if report_dir is not None:
            env["ASCEND_PATCH_REPORT_DIR"] = str(report_dir)
            env["ASCEND_PATCH_REPORT_INTERVAL"] = str(REPORT_INTERVAL_S)
        if arm.override:
            env["ASCEND_PATCH_OVERRIDE"] = json.dumps(arm.override)
    return vllm_env(workers=workers, **env)


# ---------------------------------------------------------------- what an arm ran


def summarize_reports(report_dir: Path | None) -> dict[str, Any]:
    """What the arm's processes said they run: config, digest, each patch's status and
    options, and moe.capacity's counters (of the first worker: counts are global over EP)."""
    reports = read_reports(report_dir) if report_dir is not None and report_dir.is_dir() else []
    if not reports:
        return {}
    first = reports[0]
    patches: dict[str, dict[str, Any]] = {}
    # Workers first: they build the model, so they are where a lazy patch is applied.
    ranked = sorted(reports, key=lambda r: (r["role"] != "worker", r["role"] != "engine_core",
                                            r["label"]))
    for report in ranked:
        for patch in report.get("patches", []):
            entry = patches.setdefault(patch["name"], {
                "impl": patch["impl"], "options": patch.get("options"), "status": {}})
            entry["status"][report["label"]] = patch["status"]
    moe_stats: dict[str, Any] = {}
    for report in ranked:
        for patch in report.get("patches", []):
            if patch["impl"] == "moe.capacity" and patch["status"] == "applied" and not moe_stats:
                moe_stats = patch.get("stats", {})
    return {"config": first.get("config"), "digest": first.get("digest"),
            "profile": first.get("profile"), "vllm": first.get("vllm"),
            "ascend_patch": first.get("ascend_patch"),
            "roles": [r["label"] for r in reports], "patches": patches, "moe_stats": moe_stats}


_KEY_OPTIONS = ("drop_token_ratio", "granularity", "drop_policy", "keep_top1", "min_tokens",
                "dispatch")


def describe_patches(summary: dict[str, Any]) -> str:
    """One line per arm for the legend: which patches ran, with moe.capacity's key options."""
    if not summary:
        return "no report"
    parts = []
    for name, patch in summary["patches"].items():
        statuses = set(patch["status"].values())
        status = "applied" if "applied" in statuses else "/".join(sorted(statuses))
        text = f"{name} ({patch['impl']}) {status}"
        options = patch.get("options") or {}
        if patch["impl"] == "moe.capacity":
            text += " " + " ".join(f"{k}={options[k]}" for k in _KEY_OPTIONS if k in options)
        parts.append(text)
    digest = (summary.get("digest") or "")[:12]
    head = f"{Path(summary['config']).name} sha256 {digest}" if summary.get("config") else ""
    return "; ".join([head, *parts]) if head else "; ".join(parts)


# ---------------------------------------------------------------- accuracy


def compare(ref_outs: list[dict[str, Any]], outs: list[dict[str, Any]],
            first_tokens: int) -> dict[str, Any]:
    """Agreement of one arm's greedy outputs with the reference's, prompt by prompt."""
    exact = sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref_outs, outs))
    same_tokens = total_tokens = 0
    diffs: list[float] = []
    missing = 0
    for ref, out in zip(ref_outs, outs):
        for a, b in zip(ref["token_ids"], out["token_ids"]):
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
    return ab_stats.block_order(arms, warmup + repeats, seed)


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
            "cpu_share": None if None in cpu else sum(cpu) / (wall * _cpus()),
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
    settle = TP_SETTLE_S if args.tensor_parallel_size > 1 else 0.0
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
            for block, members in enumerate(order):
                counted = block >= args.warmup
                for position, index in enumerate(members):
                    run = runs[index]
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
                    if settle:
                        time.sleep(settle)
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


def perplexity(data: dict[str, Any] | None) -> float | None:
    if not data or "error" in data or not data.get("tokens"):
        return None
    return math.exp(-data["logprob_sum"] / data["tokens"])


def offline_metrics(runs: list[ArmRun], first_tokens: int) -> list[dict[str, Any]]:
    reference = runs[0]
    ref_prefill = [s["prefill_s"] for s in reference.samples]
    ref_tps = [s["tokens_per_s"] for s in reference.samples]
    rows = []
    for run in runs:
        prefill = [s["prefill_s"] for s in run.samples]
        tps = [s["tokens_per_s"] for s in run.samples]
        stats = run.summary.get("moe_stats", {})
        row: dict[str, Any] = {
            "label": run.arm.label,
            "arm": run.arm.describe(),
            "config": str(run.arm.config) if run.arm.config else None,
            "stock": run.arm.config is None,
            "drop_token_ratio": run.arm.ratio,
            "startup_s": run.startup_s,
            "cpu_share": (ab_stats.estimate(shares) if (shares := [
                s["cpu_share"] for s in run.samples if s["cpu_share"] is not None]) else None),
            "prefill_s": ab_stats.estimate(prefill),
            "tokens_per_s": ab_stats.estimate(tps),
            # Reference over arm for a time, arm over reference for a rate: > 1 is better.
            "prefill_speedup": ab_stats.estimate(ab_stats.paired_ratios(ref_prefill, prefill)),
            "tokens_per_s_ratio": ab_stats.estimate(ab_stats.paired_ratios(tps, ref_tps)),
            "repeats_identical": len({s["outputs_digest"] for s in run.samples}) == 1,
            "perplexity": perplexity(run.perplexity),
            "perplexity_tokens": (run.perplexity or {}).get("tokens"),
            "perplexity_error": (run.perplexity or {}).get("error"),
            "rows_routed": stats.get("rows_routed"),
            "rows_dropped": stats.get("rows_dropped"),
            "rows_dropped_pct": (100.0 * stats["drop_fraction"]
                                 if "drop_fraction" in stats else None),
            "layers": {
                name: {"max_over_mean_before": layer["max_over_mean_before"],
                       "max_over_mean_after": layer["max_over_mean_after"],
                       "drop_fraction": layer["drop_fraction"]}
                for name, layer in stats.get("layers", {}).items()
            },
            "report": run.summary,
            "samples": run.samples,
            "warmup_samples": run.warmup,
            "outputs": run.outputs,
        }
        row["prefill_verdict"] = ab_stats.verdict(row["prefill_speedup"])
        row["tokens_per_s_verdict"] = ab_stats.verdict(row["tokens_per_s_ratio"])
        row.update(compare(reference.outputs or [], run.outputs or [], first_tokens))
        rows.append(row)
    return rows


def print_offline(console, rows: list[dict[str, Any]], heading: str) -> None:
    labels = ab_output.short_labels([r["label"] for r in rows])
    d_ms = ab_output.digits_for([r["prefill_s"] for r in rows], 1000)
    d_tps = ab_output.digits_for([r["tokens_per_s"] for r in rows])
    ab_output.say(console, heading, "")
    per_arm = ab_output.table(
        "Per arm: median [95% interval] over the repeats",
        ["arm", "prefill ms", "tokens/s", "CPU %", "drop %", "ppl"],
        [[label, ab_output.fmt(r["prefill_s"], 1000, d_ms),
          ab_output.fmt(r["tokens_per_s"], 1, d_tps),
          "-" if r["cpu_share"] is None else f"{100 * r['cpu_share'].median:.0f}",
          "-" if r["rows_dropped_pct"] is None else f"{r['rows_dropped_pct']:.2f}",
          "-" if r["perplexity"] is None else f"{r['perplexity']:.4g}"]
         for label, r in zip(labels, rows)])
    console.print(per_arm)
    reference = labels[0]
    against = ab_output.table(
        f"Against the reference {reference}: median of per-repeat ratios [95% interval]",
        ["arm", "prefill x", "tokens/s x", "agree", "|dlogp|"],
        [[label, ab_output.fmt(r["prefill_speedup"], 1, 3),
          ab_output.fmt(r["tokens_per_s_ratio"], 1, 3), ab_output.percent(r["token_agreement"], 1),
          ab_output.dlogp(r)]
         for label, r in list(zip(labels, rows))[1:]])
    console.print(against)
    for label, row in list(zip(labels, rows))[1:]:
        ab_output.say(console,
            f"{label} vs {reference}: prefill "
            f"{_say(row['prefill_speedup'], row['prefill_verdict'])}"
            f"; tokens/s {_say(row['tokens_per_s_ratio'], row['tokens_per_s_verdict'])}; "
            f"greedy outputs identical for {ab_output.percent(row['exact_match_rate'])} of the "
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
        ab_output.say(console, "  " + text, "    ")
    ab_output.say(console,
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


def _say(ratio: ab_stats.Estimate, verdict: str) -> str:
    figure = ab_output.fmt(ratio, 1, 3)
    if verdict in ("better", "worse"):
        return f"{verdict} ({figure})"
    if verdict == "no measurable difference":
        return f"no measurable difference ({figure})"
    return f"{figure}: {verdict}"


def run_ab(args) -> int:
    from rich.console import Console

    from ascend_patch.cli.tiny_model import make_tiny_model

    console = Console(highlight=False)
    arms = build_arms(args)
    check_arms(arms)  # before any engine starts (and before anything is written)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=out_dir))
    model = Path(args.model) if args.model else make_tiny_model(work / "tiny-deepseek-v3")
    args.load_format = resolve_load_format(args.load_format, model)
    prompts = args.prompts if args.prompts is not None else make_prompts(
        args.num_prompts, args.prompt_len, args.seed)
    load_before = _load_average()
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
               + f". {_describe_load(load_before, _load_average())}")
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
        "load_average_before": load_before, "load_average_after": _load_average(),
        "cpus": _cpus(), "work_dir": str(work), "arms": ab_output.as_json(rows),
    }
    json_path = out_dir / "ab.json"
    json_path.write_text(json.dumps(summary, indent=2))
    labels = ab_output.short_labels([r["label"] for r in rows])
    png, message = ab_output.plot(
        out_dir / "ab.png", f"A/B on {model.name}: against {labels[0]}", labels[1:],
        {"prefill speed-up": [r["prefill_speedup"] for r in rows[1:]],
         "tokens/s ratio": [r["tokens_per_s_ratio"] for r in rows[1:]]},
        {"exact match": [r["exact_match_rate"] for r in rows[1:]],
         "token agreement": [r["token_agreement"] for r in rows[1:]]})
    console.print(f"wrote {json_path}", markup=False)
    console.print(message, markup=False)
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


def resolve_load_format(choice: str, model: Path) -> str:
    """'auto' loads real weights when the folder has any; a model folder without weights
    (`ascend-patch tiny-model`) can only run on vLLM's random dummy weights."""
    if choice != "auto":
        return choice
    weights = any(model.glob("*.safetensors")) or any(model.glob("*.bin"))
    return "auto" if weights else "dummy"


def _describe_load(before: list[float] | None, after: list[float] | None) -> str:
    if before is None or after is None:
        return ""
    return (f"Load average (1 min) {before[0]:.1f} before, {after[0]:.1f} after, on {_cpus()} "
            "CPUs.")


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# Bounds of the numeric arguments: beyond them a run would exhaust memory or never end.
_LIMITS = {
    "num_prompts": (1, 10_000), "prompt_len": (1, 100_000), "max_tokens": (1, 100_000),
    "repeats": (1, 1000), "warmup": (0, 100), "requests": (1, 10_000), "concurrency": (1, 1024),
    "max_model_len": (16, 1 << 20),
    "first_tokens": (0, 100_000), "seed": (0, 2**32 - 1), "tensor_parallel_size": (1, 64),
    "tokens": (1, 1 << 20), "experts": (1, 4096), "top_k": (1, 64), "ep_size": (1, 1024),
    "hidden": (1, 65536), "intermediate": (1, 65536), "reps": (1, 1000), "threads": (1, 256),
}
MAX_RATIO = 0.5  # moe.capacity's drop_token_ratio range is [0, 0.5]
MAX_PROMPTS_BYTES = 64 << 20  # a prompts file is read whole, before anything starts


def _prompts_file(text: str) -> tuple[str, list[str]]:
    """A prompts file: a JSON list of strings, or one prompt per line (blank lines skipped)."""
    path = Path(text)
    try:
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            raise argparse.ArgumentTypeError(f"{text}: larger than {MAX_PROMPTS_BYTES >> 20} MiB")
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc}") from None
    if body.lstrip().startswith("["):
        try:
            prompts = json.loads(body)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text}: starts with '[' but is not valid JSON "
                                             f"({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise argparse.ArgumentTypeError(f"{text}: a JSON prompts file must be a list of "
                                             "non-empty strings")
    else:
        prompts = [line for line in body.splitlines() if line.strip()]
    if not prompts:
        raise argparse.ArgumentTypeError(f"{text}: no prompts in it")
    return text, prompts


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
    from ascend_patch.cli.ab_server import parse_url

    ab = sub.add_parser(
        "ab", help="A/B drop ratios, configs or stock vLLM through the real vLLM engine, or live "
                   "servers (or, with --layer, the MoE layer alone)")
    n = {name: _int_in(*bounds) for name, bounds in _LIMITS.items()}
    ab.add_argument("config", nargs="?", help="config whose moe.capacity patch is varied by --ratios")
    ab.add_argument("--arms", nargs="+", help="config files, one arm each (instead of --ratios)")
    ab.add_argument("--ratios", type=_ratios, default=_ratios("0,0.05,0.1"),
                    help="drop ratios, comma separated; first is the reference")
    ab.add_argument("--stock", action="store_true",
                    help="add vLLM with no patch at all (ASCEND_PATCH_CONFIG unset) as the first "
                         "arm, the reference")
    ab.add_argument("--patch", help="name of the moe.capacity patch to vary (default: the first)")
    ab.add_argument("--model", help="model directory (default: a generated tiny DeepseekV3); "
                                    "with --servers: the served model name to request")
    ab.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                    help="auto: the model's weight files, or vLLM's random dummy weights for a "
                         "folder without any (the tiny models)")
    ab.add_argument("--prompts", type=_prompts_file, metavar="FILE",
                    help="prompts (held-out text): a JSON list of strings or one per line; "
                         "also the text whose perplexity is measured")
    ab.add_argument("--num-prompts", type=n["num_prompts"], default=8,
                    help="generated prompts when no --prompts file is given")
    ab.add_argument("--prompt-len", type=n["prompt_len"], default=200,
                    help="words per generated prompt (--servers/--launch: the longest of a mix)")
    ab.add_argument("--max-tokens", type=n["max_tokens"], default=16,
                    help="new tokens per prompt (--servers/--launch: the most of a mix)")
    ab.add_argument("--max-model-len", type=n["max_model_len"], default=1024)
    ab.add_argument("--first-tokens", type=n["first_tokens"], default=4,
                    help="positions compared by logprob")
    ab.add_argument("--repeats", type=n["repeats"], default=DEFAULT_REPEATS,
                    help="measured repeats per arm (rounds per server). Default 9: the fewest "
                         "for which the exact 95%% interval of a median leaves out the single "
                         "slowest and fastest run ([2nd, 8th] of 9, 96.1%%); with 6-8 it is "
                         "min..max, which one disturbed run on a shared machine stretches, and "
                         "below 6 there is no 95%% interval. A repeat of the default workload "
                         "takes about 1 s per arm here, once the engine is up")
    ab.add_argument("--warmup", type=n["warmup"], default=1,
                    help="uncounted blocks first (a fresh engine's first generation took "
                         "3.2-5.7 s here, later ones 0.24-0.37 s)")
    ab.add_argument("--seed", type=n["seed"], default=0,
                    help="prompts, sampling seed and the order of the arms in each block")
    ab.add_argument("--tensor-parallel-size", type=n["tensor_parallel_size"], default=1)
    ab.add_argument("--enable-expert-parallel", action="store_true")
    ab.add_argument("--timeout", type=_seconds, default=600.0,
                    help="seconds for an engine or server to start, and for each repeat")
    ab.add_argument("--out", default="ab-out", help="directory for ab.json, ab.png and logs")
    live = ab.add_argument_group("live servers (OpenAI-compatible /v1/completions, streaming)")
    live.add_argument("--servers", nargs="+", type=parse_url, metavar="URL",
                      help="running servers to compare (the first is the reference); nothing "
                           "but these is contacted")
    live.add_argument("--server-reports", nargs="+", metavar="DIR",
                      help="per server, its ASCEND_PATCH_REPORT_DIR if readable here ('-': none): "
                           "shows which patches it runs")
    live.add_argument("--launch", nargs="+", metavar="CONFIG",
                      help="start one server per config with --model ('stock': no patch), "
                           "compare them, stop them")
    live.add_argument("--one-at-a-time", action="store_true",
                      help="--launch: never run two servers at once (default: side by side, "
                           "interleaved, when memory allows)")
    live.add_argument("--requests", type=n["requests"], default=8, help="requests per round")
    live.add_argument("--concurrency", type=n["concurrency"], default=4,
                      help="requests in flight at once")
    ab.add_argument("--layer", action="store_true", help="MoE layer alone on synthetic routing")
    g = ab.add_argument_group("--layer (MoE layer alone on synthetic DeepSeek-V3 routing)")
    g.add_argument("--skews", type=_skews, default=_skews("balanced,moderate,r1"),
                   help="target per-rank max/mean at --ep-size: names (balanced=1.0, "
                        "moderate=1.5, r1=2.5) or numbers, comma separated")
    g.add_argument("--tokens", type=n["tokens"], default=4096)
    g.add_argument("--experts", type=n["experts"], default=256)
    g.add_argument("--top-k", type=n["top_k"], default=8)
    g.add_argument("--ep-size", type=n["ep_size"], default=16, help="simulated EP size")
    g.add_argument("--hidden", type=n["hidden"], default=1024, help="hidden size (DeepSeek-V3: 7168)")
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
    modes = [name for name, given in (("CONFIG", args.config), ("--arms", args.arms),
                                      ("--servers", args.servers), ("--launch", args.launch))
             if given]
    if len(modes) > 1:
        return ("give one of CONFIG (with --ratios), --arms, --servers or --launch, not "
                + " and ".join(modes))
    if not modes:
        return ("give a CONFIG (with --ratios), --arms FILE ..., --servers URL ... or --launch "
                "CONFIG ...")
    if args.server_reports and not args.servers:
        return "argument --server-reports: goes with --servers"
    if args.one_at_a_time and not args.launch:
        return "argument --one-at-a-time: goes with --launch"
    if args.servers or args.launch:
        if args.stock:
            return ("argument --stock: with --launch name 'stock' as a config; with --servers "
                    "start it yourself")
        given = args.servers or args.launch
        which = "--servers" if args.servers else "--launch"
        if len(given) < 2:
            return f"argument {which}: give at least two servers to compare"
        if args.server_reports and len(args.server_reports) != len(args.servers):
            return (f"argument --server-reports: {len(args.server_reports)} folders for "
                    f"{len(args.servers)} servers (use '-' for a server without one)")
        for folder in args.server_reports or ():
            if folder != "-" and not Path(folder).is_dir():
                return f"argument --server-reports: {folder} is not a folder"
        if args.launch:
            if args.model is None:
                return "argument --model: --launch needs the model to serve"
            for path in args.launch:
                if path != STOCK and not Path(path).is_file():
                    return f"argument --launch: {path} is neither a file nor 'stock'"
    else:
        for path in [*(args.arms or ()), *([args.config] if args.config else [])]:
            if not Path(path).is_file():
                which = "--arms" if args.arms else "CONFIG"
                return f"argument {which}: {path} is not a file"
        if len(args.arms or args.ratios) + args.stock < 2:
            which = "--arms" if args.arms else "--ratios"
            return f"argument {which}: give at least two arms to compare (or --stock and one)"
    if (args.model is not None and not args.servers
            and not (Path(args.model) / "config.json").is_file()):
        return f"argument --model: {args.model} is not a model directory (no config.json)"
    return None


def _dispatch(args) -> int:
    problem = check_args(args)
    if problem:
        args.ab_parser.error(problem)
    args.prompts_file, args.prompts = args.prompts or (None, None)
    if args.layer:
        from ascend_patch.cli.ab_layer import run_layer_ab

        return run_layer_ab(args)
    with _sigterm_as_exit():
        if args.servers or args.launch:
            from ascend_patch.cli.ab_server import run_server_ab

            check_arms([Arm(Path(c).stem, None if c == STOCK else Path(c))
                        for c in args.launch or ()])
            args.served_model = args.model if args.servers else None
            return run_server_ab(args)
        return run_ab(args)


@contextmanager
def _sigterm_as_exit():
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the `finally` blocks stop every
    engine and server this run started instead of leaving them behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
