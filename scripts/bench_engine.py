"""The seed's effect end to end: prefill time of a MoE-dominated model in the real vLLM
engine at drop ratios 0, 0.05, 0.1, DP=2 + EP and TP=2 + EP, against the ideal.

    python scripts/bench_engine.py [--out bench-results] [--topologies dp2-ep,tp2-ep]
        [--ratios 0,0.05,0.1] [--repeats 15] [--prompts 8] [--length 256] [--seed 0]

The model (lab/skewed_moe.py): Mixtral-shaped, random weights, small attention (hidden 128)
and large experts (16 x intermediate 1024, top-2, 2 layers), whose router is constructed (set,
not learned) so that the per-EP-rank max/mean of its routing is the DeepSeek-R1 imbalance
carried to EP2 (1.449: the hottest rank carries 2.63x the others' mean, as R1's 2.5 at EP32).
The achieved max/mean is read from the engine's own moe.capacity reports and printed.

Per topology, one OpenAI server (the configuration of configs/cpu-dp-ep.yaml, dispatch auto:
all-to-all for DP, vLLM's path for TP) serves every ratio: lab/worker_hooks.py makes its
drop steps plan with the product planner at the ratio the benchmark sets between rounds (on
CPU the ratio reaches nothing but the planner, so this is the product at that ratio, while
the arms share processes, placement and warm-up). After --warmup uncounted rounds per ratio,
the ratios take turns in randomised blocks (ab's stats.block_order); one round = the same
--prompts concurrent prefill-only requests (token ids, max_tokens 1). The speed-up of ratio
r is the median of per-block (round at r = 0) / (round at r) with ab's exact 95% interval of
the median (ab/stats.py).

MoE share: every server process times moe.capacity's expert op (lab/worker_hooks.py); per
round, the bottleneck worker's (the process longest in the experts) expert seconds / the
round's wall time, median over the r = 0 rounds. Ideal speed-up = 1 / (1 - share * (1 -
after / before)), with after / before the bottleneck-rank rows (sum over layers and calls of
that ratio's plans). achieved = speed-up / ideal; gain = (speed-up - 1) / (ideal - 1). Goal:
achieved >= 0.8.

The same in CPU seconds, beside it: the bottleneck worker's CPU time per round (/proc), its
expert op's CPU time, and their share, ideal and paired speed-up. On a 2-core machine that
other work loads, a round's wall time mostly measures the other work (the engine had a
quarter of the CPUs in some runs); the worker's CPU time is what dropping rows shortens, and
the other load distorts it far less (engine_prefill.py reads its servers the same way).
Where the time goes (per arm: experts, planner, the rest of the round) is printed too.

Writes OUT/engine.json. Took 6 minutes on the 2-core machine at a load average of 6-11
(--repeats 15), 10-14 minutes at 20-30 (--repeats 9); the two server start-ups are most of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine_prefill import group_cpu_seconds, report_stats, timed_round  # noqa: E402

from ascend_patch.ab import stats  # noqa: E402
from ascend_patch.ab.common import REPORT_INTERVAL_S, WORKER_SETTLE_S  # noqa: E402
from ascend_patch.harness.procs import vllm_env  # noqa: E402
from ascend_patch.harness.server import ManagedServer, free_port  # noqa: E402
from ascend_patch.lab import skewed_moe  # noqa: E402
from ascend_patch.lab.worker_hooks import RATIO_ENV, TIMERS_ENV, read_dumps  # noqa: E402

CONFIG = """version: 1
patches:
  - name: cpu-collectives
    impl: distributed.cpu_collectives
    options: {{fuse_lists: true, reduce_scatter_mode: reduce_scatter}}
  - name: moe-capacity
    impl: moe.capacity
    options:
      drop_token_ratio: {ratio!r}
      granularity: rank
      drop_policy: probs
      keep_top1: true
      min_tokens: 128
      dispatch: auto
      log_interval: 1
"""

TOPOLOGIES = {
    "dp2-ep": lambda: ["--data-parallel-size", "2", "--enable-expert-parallel",
                       # Servers side by side: their DP RPC ports must differ.
                       "--data-parallel-rpc-port", str(free_port())],
    "tp2-ep": lambda: ["--tensor-parallel-size", "2", "--enable-expert-parallel"],
}
GOAL = 0.8
WORKER_SITE = REPO / "ascend_patch" / "lab" / "worker_site"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class Server:
    """One server of a topology; every ratio's rounds run on it (lab/worker_hooks.py)."""

    def __init__(self, model: Path, topology: str, prompts: list[list[int]], work: Path) -> None:
        self.out = work / topology
        # A previous run's timers, counts and reports must not mix with this one's.
        shutil.rmtree(self.out, ignore_errors=True)
        self.timers = self.out / "timers"
        self.timers.mkdir(parents=True, exist_ok=True)
        self.control = self.out / "ratio"
        self.control.write_text("0")
        config = self.out / "config.yaml"
        config.write_text(CONFIG.format(ratio=0.0))
        path = os.pathsep.join(filter(None, [str(WORKER_SITE), str(REPO),
                                             os.environ.get("PYTHONPATH")]))
        env = vllm_env(workers=2, ASCEND_PATCH_CONFIG=str(config),
                       ASCEND_PATCH_REPORT_DIR=str(self.out / "reports"),
                       ASCEND_PATCH_REPORT_INTERVAL=str(REPORT_INTERVAL_S),
                       PYTHONPATH=path, **{TIMERS_ENV: str(self.timers),
                                           RATIO_ENV: str(self.control)})
        tokens = sum(map(len, prompts))
        args = [*TOPOLOGIES[topology](), "--max-num-batched-tokens", str(tokens),
                "--max-num-seqs", str(len(prompts)), "--no-enable-prefix-caching"]
        self.managed = ManagedServer(model, args=args, env=env, log_path=self.out / "server.log",
                                     startup_timeout=600, load_format="safetensors",
                                     enforce_eager=True)

    def round(self, ratio: float, pool: ThreadPoolExecutor, prompts: list[list[int]]) -> dict:
        """One timed round at `ratio`, set while the engine is idle."""
        self.control.write_text(repr(ratio))
        # Workers poll busily for 1 s after a step: the previous round must not overlap.
        time.sleep(WORKER_SETTLE_S)
        before, cpu_before = read_dumps(self.timers), group_cpu_seconds(self.managed.proc.pid)
        wall, busiest_cpu = timed_round(self.managed, pool, prompts)
        after, cpu_after = read_dumps(self.timers), group_cpu_seconds(self.managed.proc.pid)

        def delta(pid: int, key: str, op: str) -> float:
            return after[pid][key].get(op, 0.0) - before.get(pid, {key: {}})[key].get(op, 0.0)

        # The bottleneck rank's worker: the process that spent longest in the experts.
        worker = max(after, key=lambda pid: delta(pid, "seconds", "experts"), default=None)
        if worker is None:
            raise RuntimeError(f"no op timings in {self.timers}: the hooks did not load")
        return {"wall_s": wall, "busiest_cpu_s": busiest_cpu,
                "experts_s": delta(worker, "seconds", "experts"),
                "plan_s": delta(worker, "seconds", "plan"),
                "worker_cpu_s": cpu_after.get(worker, 0.0) - cpu_before.get(worker, 0.0),
                "experts_cpu_s": delta(worker, "cpu_seconds", "experts"),
                "plan_cpu_s": delta(worker, "cpu_seconds", "plan")}

    def plan_counts(self) -> dict[str, dict[str, float]]:
        """Per ratio, summed over the processes (each rank plans the same global bins)."""
        total: dict[str, dict[str, float]] = {}
        for dump in read_dumps(self.timers).values():
            for ratio, counts in dump["plans"].items():
                row = total.setdefault(ratio, dict.fromkeys(counts, 0))
                for key, value in counts.items():
                    row[key] += value
        return total


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def run_topology(args, model: Path, topology: str, prompts: list[list[int]]) -> dict:
    server = Server(model, topology, prompts, args.out / "engine-work")
    started = time.perf_counter()
    load_before = os.getloadavg()
    rounds: dict[float, list[dict]] = {ratio: [] for ratio in args.ratios}
    try:
        server.managed.start()
        print(f"{topology}: server up in {time.perf_counter() - started:.0f} s", flush=True)
        with ThreadPoolExecutor(len(prompts)) as pool:
            for _ in range(args.warmup):
                for ratio in args.ratios:
                    server.round(ratio, pool, prompts)
            for block in stats.block_order(len(args.ratios), args.repeats, args.seed):
                for index in block:
                    ratio = args.ratios[index]
                    rounds[ratio].append(server.round(ratio, pool, prompts))
        time.sleep(REPORT_INTERVAL_S + 0.5)  # one report rewrite after the last call
        report = report_stats(server.out)
        counts = server.plan_counts()
    finally:
        server.managed.stop(grace=10.0)
    return summarise(topology, rounds, counts, report, load_before,
                     time.perf_counter() - started)


def summarise(topology: str, rounds: dict[float, list[dict]], counts: dict, report: dict,
              load_before, seconds: float) -> dict:
    ratios = list(rounds)
    base = rounds[ratios[0]]
    share = statistics.median(r["experts_s"] / r["wall_s"] for r in base)
    # The same within the bottleneck worker's CPU time (what a shared machine distorts least).
    cpu_share = statistics.median(r["experts_cpu_s"] / r["worker_cpu_s"] for r in base)
    rows = []
    for ratio in ratios:
        arm = rounds[ratio]
        plans = counts.get(repr(ratio), {})
        bottleneck = plans.get("max_after", 0) / max(plans.get("max_before", 0), 1)
        ideal = 1.0 / (1.0 - share * (1.0 - bottleneck))
        speedup = stats.estimate(stats.paired_ratios([r["wall_s"] for r in base],
                                                     [r["wall_s"] for r in arm]))
        experts = stats.estimate(stats.paired_ratios([r["experts_s"] for r in base],
                                                     [r["experts_s"] for r in arm]))
        cpu_ideal = 1.0 / (1.0 - cpu_share * (1.0 - bottleneck))
        cpu = stats.estimate(stats.paired_ratios([r["worker_cpu_s"] for r in base],
                                                 [r["worker_cpu_s"] for r in arm]))
        rows.append({
            "ratio": ratio, "speedup": speedup.as_json(), "verdict": stats.verdict(speedup),
            "ideal": ideal, "achieved": speedup.median / ideal,
            "achieved_interval": [None if v is None else v / ideal
                                  for v in (speedup.lo, speedup.hi)],
            "gain": (speedup.median - 1) / (ideal - 1) if ideal > 1 + 1e-9 else None,
            "worker_cpu_speedup": cpu.as_json(), "worker_cpu_ideal": cpu_ideal,
            "worker_cpu_achieved": cpu.median / cpu_ideal,
            "worker_cpu_achieved_interval": [None if v is None else v / cpu_ideal
                                             for v in (cpu.lo, cpu.hi)],
            "bottleneck_after_over_before": bottleneck,
            "max_over_mean_before": (plans.get("max_before", 0)
                                     / max(plans.get("mean_before", 0.0), 1e-9)),
            # What dropping buys where it acts: the bottleneck rank's expert time, r = 0 / r.
            "experts_speedup": experts.as_json(), "experts_ideal": 1.0 / max(bottleneck, 1e-9),
            "median_round_s": median(arm, "wall_s"),
            "median_experts_s": median(arm, "experts_s"),
            "median_plan_s": median(arm, "plan_s"),
            "median_busiest_cpu_s": median(arm, "busiest_cpu_s"),
            "median_worker_cpu_s": median(arm, "worker_cpu_s"),
            "median_experts_cpu_s": median(arm, "experts_cpu_s"),
            "plans": plans, "rounds": arm,
        })
    return {"topology": topology, "moe_share": share, "moe_share_worker_cpu": cpu_share,
            "plan_share": statistics.median(r["plan_s"] / r["wall_s"] for r in base),
            "max_over_mean_before_per_layer": report["max_over_mean_before"],
            "arms": rows, "seconds": seconds,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def print_topology(result: dict) -> None:
    layers = ", ".join(f"{v:.3f}" for v in result["max_over_mean_before_per_layer"].values())
    print(f"\n{result['topology']}: experts {result['moe_share']:.1%} of a prefill round's wall "
          f"time on the bottleneck worker, {result['moe_share_worker_cpu']:.1%} of its CPU time "
          f"(planner op {result['plan_share']:.2%} of wall, its count all-gather "
          f"included); max/mean per EP rank by layer over the whole run (reports): {layers}; "
          f"load average {result['load_average_before']} -> {result['load_average_after']}")
    print("| r | wall speed-up r0/r [95%] | ideal | achieved/ideal [95%] | gain | worker CPU "
          "r0/r [95%] | CPU ideal | CPU achieved/ideal [95%] | bottleneck rows after/before | "
          "experts speed-up [95%] (ideal) | max/mean per EP rank | round s: total = experts + "
          "planner + rest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["arms"]:
        print(table_row(row))
    for row in result["arms"][1:]:
        if min(row["achieved"], row["worker_cpu_achieved"]) < GOAL:
            print(f"  r={row['ratio']:g}: achieved {row['achieved']:.3f} (wall), "
                  f"{row['worker_cpu_achieved']:.3f} (worker CPU) against a goal of {GOAL}. "
                  f"Bottleneck expert time fell {row['experts_speedup']['median']:.3f}x (rows "
                  f"predict {row['experts_ideal']:.3f}x); the rest of the round (attention, "
                  "dispatch, scheduling, HTTP) is untouched by drops.")


def _interval(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def table_row(row: dict) -> str:
    s, e, c = row["speedup"], row["experts_speedup"], row["worker_cpu_speedup"]
    rest = row["median_round_s"] - row["median_experts_s"] - row["median_plan_s"]
    gain = "-" if row["gain"] is None else f"{row['gain']:.2f}"
    return (f"| {row['ratio']:g} | {s['median']:.3f}{_interval(s['lo'], s['hi'])} "
            f"| {row['ideal']:.3f} | {row['achieved']:.3f}{_interval(*row['achieved_interval'])} "
            f"| {gain} | {c['median']:.3f}{_interval(c['lo'], c['hi'])} "
            f"| {row['worker_cpu_ideal']:.3f} | {row['worker_cpu_achieved']:.3f}"
            f"{_interval(*row['worker_cpu_achieved_interval'])} "
            f"| {row['bottleneck_after_over_before']:.3f} "
            f"| {e['median']:.3f}{_interval(e['lo'], e['hi'])} ({row['experts_ideal']:.3f}) "
            f"| {row['max_over_mean_before']:.3f} | {row['median_round_s']:.3f} = "
            f"{row['median_experts_s']:.3f} + {row['median_plan_s']:.4f} + {rest:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--topologies", default="dp2-ep,tp2-ep")
    parser.add_argument("--ratios", default="0,0.05,0.1")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="concurrent requests a round")
    parser.add_argument("--length", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    topologies = args.topologies.split(",")
    unknown = [t for t in topologies if t not in TOPOLOGIES]
    if unknown:
        parser.error(f"argument --topologies: unknown {', '.join(unknown)} "
                     f"(have {', '.join(TOPOLOGIES)})")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.ratios[0] != 0:
        parser.error("argument --ratios: the first ratio is the reference and must be 0")
    if args.repeats < stats.MIN_SAMPLES:
        parser.error(f"argument --repeats: at least {stats.MIN_SAMPLES} for a 95% interval")

    started = time.perf_counter()
    up_start = uptime()
    print(up_start, flush=True)
    target = skewed_moe.equivalent_skew(skewed_moe.R1_MAX_OVER_MEAN, skewed_moe.R1_EP_SIZE, 2)
    shape = skewed_moe.ModelShape()
    model = args.out / "engine-work" / "model"
    built = skewed_moe.write_model(model, shape, target, ep_size=2, seed=args.seed)
    print(f"model: {built}", flush=True)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, shape.vocab) for _ in range(args.length)]
               for _ in range(args.prompts)]
    summary = {"command": " ".join(["python", *sys.argv]),
               "model": {**built, "config": shape.config()},
               "prompts": args.prompts, "prompt_tokens": args.length,
               "repeats": args.repeats, "warmup": args.warmup, "goal_achieved_over_ideal": GOAL,
               "interval": "exact order-statistic (binomial) 95% interval of the median of "
                           "per-block paired ratios (ab/stats.py)",
               "cpu": os.cpu_count(), "uptime_start": up_start, "topologies": []}
    for topology in topologies:
        summary["topologies"].append(run_topology(args, model, topology, prompts))
        # Saved before anything is printed: a later failure keeps what was measured.
        summary.update(uptime_end=uptime(), wall_s=round(time.perf_counter() - started, 1))
        (args.out / "engine.json").write_text(json.dumps(summary, indent=1))
        print_topology(summary["topologies"][-1])
    print(f"\nwrote {args.out / 'engine.json'} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
