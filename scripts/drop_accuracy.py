"""Drop accuracy of moe.capacity in the real vLLM engine, on a model whose router learned.

    python scripts/drop_accuracy.py [--model tests/data/tiny-moe-stdlib] [--grid full]

vLLM's offline engine with the real weights, the same held-out prompts (heldout.txt,
consecutive chunks of --length tokens) in one prefill step of all prompts, experts spread
over --sim-ep simulated EP ranks. Arms: r = 0 (the reference), the stock engine, and for
every ratio the seed PR's fixed buffer (lab rule) and each drop_policy with keep_top1 x
renormalize ('main' grid: keep_top1 on, renormalize off only).

Options are fixed per process, and one vLLM process costs 80-130 s here (imports and
start-up under load) against a few seconds for the arm itself, so every patched arm runs in
ONE engine process whose planner takes each arm's options in turn (lab/rules.py: the
options the study varies are read by the planner alone). The --check arms also run each in
its own process configured by its own file, and their per-token log-probabilities must equal
the sweep's exactly: the script stops otherwise. The stock arm always runs on its own.

Per arm: held-out perplexity from prompt log-probabilities, the mean increase of the
negative log-likelihood per token against r = 0 (with the standard error over prompts),
the share of positions whose argmax token equals r = 0's (teacher forced), the share of the
greedy continuation equal to r = 0's before the first difference, and from the process
report the rows dropped and each layer's per-rank max/mean load before and after.
Writes OUT/results.json, OUT/table.md and the plot (--plot).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ascend_patch.lab.arms import (
    SEED,
    Arm,
    compare,
    heldout_prompts,
    prefill_loads,
    run_arm,
    run_sweep,
    seed_arm,
    stdlib_heldout_text,
)

POLICIES = ("probs", "position")


def arms_for(ratios: list[float], grid: str, policies: tuple[str, ...],
             stock: bool, overflows: tuple[str, ...] = ("drop",), seed: bool = True,
             ) -> list[Arm]:
    arms = [Arm(0.0)] + ([Arm(stock=True)] if stock else [])
    flags = {"main": [(True, False)], "renorm": [(True, False), (True, True)],
             "full": [(True, False), (False, False), (True, True), (False, True)]}[grid]
    for ratio in ratios:
        if ratio == 0:
            continue
        if seed:
            arms.append(seed_arm(ratio))
        for policy in policies:
            if policy.startswith("key:"):  # lab candidates: the default flags only
                arms.append(Arm(ratio, policy, True, False))
                continue
            for keep_top1, renormalize in flags:
                arms.extend(Arm(ratio, policy, keep_top1, renormalize, overflow=overflow)
                            for overflow in overflows)
    return arms


def row(arm: Arm, result: dict, reference: dict, min_rows: int) -> dict:
    loads = prefill_loads(result.get("calls", []), min_rows)
    return {"arm": arm.name, "ratio": arm.ratio, "policy": "stock" if arm.stock else arm.policy,
            "keep_top1": arm.keep_top1, "renormalize": arm.renormalize,
            "overflow": arm.overflow,
            **compare(result, reference), **loads}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def markdown(rows: list[dict]) -> str:
    lines = [
        ("| r | policy | overflow | keep_top1 | renorm | rows dropped | rows rerouted "
         "| rows computed | bottleneck rows | rank max/mean before -> after "
         "| perplexity | NLL increase (± s.e.) | mean abs logprob change | argmax agreement "
         "| greedy prefix agreement |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before, after = r.get("max_over_mean_before"), r.get("max_over_mean_after")
        loads = f"{mean(before):.3f} -> {mean(after):.3f}" if before else "-"
        dropped = f"{100 * r['drop_fraction']:.2f}%" if "drop_fraction" in r else "-"
        flags = (("-", "-") if r["policy"] in ("stock", SEED) or r["ratio"] == 0
                 else (str(r["keep_top1"]).lower(), str(r["renormalize"]).lower()))
        rerouted = (f"{100 * r['rows_rerouted'] / r['rows_routed']:.2f}%"
                    if r.get("rows_routed") else "-")
        lines.append(
            f"| {r['ratio']:g} | {r['policy']} | {r.get('overflow', 'drop')} | {flags[0]} "
            f"| {flags[1]} | {dropped} | {rerouted} | {r.get('rows_computed', '-')} "
            f"| {r.get('bottleneck_rows', '-')} | {loads} "
            f"| {r['perplexity']:.3f} | {r['delta_nll']:.4f} ± {r['delta_nll_stderr']:.4f} "
            f"| {r['abs_delta_logprob']:.4f} | {r['argmax_agreement']:.4f} "
            f"| {r['generated_prefix_agreement']:.3f} |"
        )
    return "\n".join(lines)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error over prompts of a - b/2 (per-prompt NLL increases): below
    zero by more than two standard errors means a's increase is under half of b's."""
    d = [x - y / 2 for x, y in zip(a, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    se = (sum((x - m) ** 2 for x in d) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else 0.0
    return m, se


def verdict(rows: list[dict]) -> str:
    """Each policy against position at each ratio, on every error measure."""
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b else "-"

    lines = [("| r | policy | NLL increase / position's | NLL increase - half position's "
              "(± s.e.) | abs logprob change / position's | argmax changes / position's |"),
             "|---|---|---|---|---|---|"]
    for r_value in sorted({r["ratio"] for r in rows if r["ratio"] > 0}):
        at = [r for r in rows if r["ratio"] == r_value]
        position = next((r for r in at if r["policy"] == "position" and r["keep_top1"]
                         and not r["renormalize"]), None)
        if position is None:
            continue
        for r in at:
            default = r["policy"] == SEED or (r["keep_top1"] and not r["renormalize"])
            if r is position or not default:
                continue
            m, se = paired(r["per_prompt_delta_nll"], position["per_prompt_delta_nll"])
            lines.append(
                f"| {r_value:g} | {r['policy']} | {ratio(r['delta_nll'], position['delta_nll'])} "
                f"| {m:+.4f} ± {se:.4f} "
                f"| {ratio(r['abs_delta_logprob'], position['abs_delta_logprob'])} "
                f"| {ratio(1 - r['argmax_agreement'], 1 - position['argmax_agreement'])} |")
    return "\n".join(lines)


def reroute_verdict(rows: list[dict]) -> str:
    """Reroute against probs-drop at the same ratio and flags: the issue's goal is a loss at
    most half of drop's at an equal bottleneck load."""
    lines = [("| r | renorm | drop NLL increase | reroute NLL increase | reroute / drop "
              "| reroute - half drop (± s.e.) | bottleneck rows drop / reroute |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("overflow") != "reroute":
            continue
        drop = next((d for d in rows if d.get("overflow", "drop") == "drop"
                     and d["ratio"] == r["ratio"] and d["policy"] == r["policy"]
                     and d["keep_top1"] == r["keep_top1"]
                     and d["renormalize"] == r["renormalize"]), None)
        if drop is None:
            continue
        m, se = paired(r["per_prompt_delta_nll"], drop["per_prompt_delta_nll"])
        share = f"{r['delta_nll'] / drop['delta_nll']:.3f}" if drop["delta_nll"] else "-"
        lines.append(
            f"| {r['ratio']:g} | {str(r['renormalize']).lower()} "
            f"| {drop['delta_nll']:.4f} ± {drop['delta_nll_stderr']:.4f} "
            f"| {r['delta_nll']:.4f} ± {r['delta_nll_stderr']:.4f} | {share} "
            f"| {m:+.4f} ± {se:.4f} "
            f"| {drop.get('bottleneck_rows', '-')} / {r.get('bottleneck_rows', '-')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {}
    for r in rows:
        if r["policy"] == "stock" or r["ratio"] == 0:
            continue
        key = (r["policy"] + ("+reroute" if r.get("overflow") == "reroute" else ""),
               r["keep_top1"], r["renormalize"])
        styles.setdefault(key, []).append(r)
    colours = {"probs": "tab:blue", "probs+reroute": "tab:cyan", "position": "tab:orange",
               SEED: "tab:red",
               "key:tail": "tab:green", "key:rank": "tab:purple", "key:relative": "tab:brown"}
    for (policy, top1, renorm), series in sorted(styles.items(), key=str):
        series.sort(key=lambda r: r["ratio"])
        xs = [0] + [r["ratio"] for r in series]
        label = policy if policy == SEED else f"{policy}, keep_top1={top1}, renorm={renorm}"
        default = policy == SEED or (top1 and not renorm)
        style = {"color": colours.get(policy, "grey"), "marker": "o" if default else ".",
                 "linestyle": "-" if default else (":" if renorm else "--"),
                 "linewidth": 2 if default else 1, "label": label}
        axes[0].errorbar(xs, [0] + [r["delta_nll"] for r in series],
                         yerr=[0] + [r["delta_nll_stderr"] for r in series], capsize=2,
                         **style)
        axes[1].plot(xs, [0] + [1 - r["argmax_agreement"] for r in series], **style)
    if max((r["delta_nll"] for r in rows), default=0) > 0.05:
        # One rule far above the rest (the seed's at large r): keep the others readable.
        axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("held-out NLL increase vs r = 0 (nats/token, ± s.e.)")
    axes[1].set_ylabel("share of argmax tokens differing from r = 0")
    for ax in axes:
        ax.set_xlabel("drop_token_ratio r")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "tests/data/tiny-moe-stdlib")
    parser.add_argument("--out", type=Path, default=REPO / "lab-out/drop-accuracy")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default OUT/drop_accuracy.png)")
    parser.add_argument("--ratios", default="0,0.01,0.02,0.05,0.1")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--grid", choices=("main", "renorm", "full"), default="full",
                        help="keep_top1 x renormalize flags: main (on, off), renorm (on, "
                        "both), full (all four)")
    parser.add_argument("--overflow", default="drop",
                        help="comma list of moe.capacity overflow modes (drop, reroute)")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed-rule arms")
    parser.add_argument("--text", choices=("heldout", "stdlib"), default="heldout",
                        help="heldout: the model's heldout.txt; stdlib: every held-out file "
                        "of the training split, read from this interpreter's stdlib")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock arm")
    parser.add_argument("--scales", type=Path, default=None,
                        help="expert scales for the key:scaled lab rule "
                        "(scripts/router_margins.py --scales-out)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--sim-ep", type=int, default=4)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--check", default="r0,r0.05-probs-top11-renorm0,r0.05-seed",
                        help="arms also run in their own process, which must match the sweep")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: tables and plot again from OUT/results.json")
    parser.add_argument("--probe", action="store_true",
                        help="save every dropping call's router output (OUT/sweep/plans-*.pt)")
    args = parser.parse_args()

    ratios = [float(r) for r in args.ratios.split(",")]
    overflows = tuple(args.overflow.split(","))
    if set(overflows) - {"drop", "reroute"}:
        parser.error(f"--overflow: drop or reroute, not {args.overflow!r}")
    arms = arms_for(ratios, args.grid, tuple(args.policies.split(",")), not args.no_stock,
                    overflows, seed=not args.no_seed)
    by_name = {arm.name: arm for arm in arms}
    checks = [name for name in args.check.split(",") if name]
    unknown = [name for name in checks if name not in by_name]
    if unknown:
        parser.error(f"--check: no arm named {', '.join(unknown)} (arms: {', '.join(by_name)})")
    args.out.mkdir(parents=True, exist_ok=True)
    text = stdlib_heldout_text() if args.text == "stdlib" else None
    prompts = heldout_prompts(args.model, args.prompts, args.length, text)
    prompts_file = args.out / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    kwargs = {"simulate_ep_size": args.sim_ep, "min_tokens": args.min_tokens,
              "gen_tokens": args.gen_tokens}
    started = time.perf_counter()
    own_names = ([] if args.no_stock else ["stock"]) + checks
    if args.render:
        results = json.loads((args.out / "results.json").read_text())
        own = {name[4:]: r for name, r in results.items() if name.startswith("own:")}
        sweep = {name: r for name, r in results.items()
                 if name != "stock" and not name.startswith("own:")}
        report(args, arms, prompts, results, sweep, own, checks, started)
        return
    print(f"{len(arms)} arms, {args.prompts} prompts x {args.length} tokens, "
          f"simulated EP{args.sim_ep}; own processes: {', '.join(own_names)}", flush=True)
    probe = tuple(name for name in by_name if args.probe and not by_name[name].stock)
    sweep = run_sweep(arms, args.model, prompts_file, args.out, probe=probe,
                      scales=args.scales and args.scales.resolve(), **kwargs)
    print(f"sweep: {len(sweep)} arms in one process, {time.perf_counter() - started:.0f} s",
          flush=True)
    own = {}
    for name in own_names:
        t0 = time.perf_counter()
        own[name] = run_arm(by_name[name], args.model, prompts_file, args.out, **kwargs)
        print(f"{name} in its own process: {time.perf_counter() - t0:.0f} s", flush=True)
    mismatched = [name for name in checks
                  if [p["logprobs"] for p in own[name]["prompts"]]
                  != [p["logprobs"] for p in sweep[name]["prompts"]]]
    if mismatched:
        raise SystemExit(f"arms {mismatched}: own process and sweep differ; sweep not valid")
    results = {**sweep, **({} if args.no_stock else {"stock": own["stock"]})}
    # The own-process arms too, so that --render finds the r = 0 process report's figures.
    (args.out / "results.json").write_text(json.dumps(
        {**results, **{f"own:{name}": r for name, r in own.items()}}))
    report(args, arms, prompts, results, sweep, own, checks, started)


def report(args, arms, prompts, results, sweep, own, checks, started) -> None:
    reference = results["r0"]
    # The prefill calls (one per layer) route every prompt token; decode calls a few rows.
    min_rows = args.prompts * args.length
    rows = [row(arm, results[arm.name], reference, min_rows) for arm in arms]
    table = markdown(rows)
    policy_table = verdict(rows)
    if any(r.get("overflow") == "reroute" for r in rows):
        policy_table += "\n\n" + reroute_verdict(rows)
    wall = time.perf_counter() - started
    # The router's load as the patch itself reports it (r = 0 arm's own process report).
    router = own.get("r0", {}).get("moe_stats")
    previous_path = args.out / "summary.json"
    previous = (json.loads(previous_path.read_text())
                if args.render and previous_path.exists() else {})
    summary = {
        "command": previous.get("command", " ".join(["python", *sys.argv])),
        "wall_s": previous.get("wall_s", round(wall, 1)),
        "prompt_tokens_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "load_average": previous.get("load_average",
                                     [round(v, 2) for v in os.getloadavg()]),
        "process_s": {name: round(r["process_s"], 1) for name, r in own.items()}
        or previous.get("process_s"),
        "sweep_arm_s": {name: round(r["eval_s"], 1) for name, r in sweep.items()},
        "checked_identical": checks,
        "router_report": router and {name: {k: layer[k] for k in (
            "max_over_mean_before", "max_bin_load_before_peak", "rows_routed", "calls")}
            for name, layer in router["layers"].items()} or previous.get("router_report"),
        "rows": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table.md").write_text(table + "\n\n" + policy_table + "\n")
    print(table)
    print()
    print(policy_table)
    plot_path = args.plot or args.out / "drop_accuracy.png"
    plot(rows, plot_path, f"{args.model.name}: {args.prompts} held-out prompts x {args.length} "
         f"tokens ({args.text}), one prefill step, simulated EP{args.sim_ep}")
    print(f"\n{len(arms)} arms in {summary['wall_s'] / 60:.1f} min; plot {plot_path}")


if __name__ == "__main__":
    main()
