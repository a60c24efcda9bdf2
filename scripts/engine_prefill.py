"""Engine-level prefill time of the DP=2 + EP OpenAI server at each drop ratio, vs r = 0.

    python scripts/engine_prefill.py [--model tests/data/tiny-moe-stdlib] [--ratios 0,0.05,0.1]

Does the layer-level speed-up of dropping survive the whole engine? For each ratio one
server (`--data-parallel-size 2 --enable-expert-parallel`, real weights, the configuration
of configs/cpu-dp-ep.yaml with the ratio replaced: all-to-all dispatch, probs policy,
keep_top1) serves rounds of concurrent prefill-only requests (held-out prompts as token
ids, max_tokens 1) so that both DP ranks prefill at once; a round's time is from the first
request sent to the last answer. The r = 0 server runs the whole time and each other
ratio's server beside it, rounds alternating between the two (so both see the same load on
a shared machine); the figure is the median over rounds of (round at r) / (round at r = 0
next to it), and the same for the CPU seconds of the server's busiest process (a worker),
which the load of a shared machine distorts far less than wall time. From each server's
reports: rows dropped and, per MoE layer, the load of the most loaded EP rank before and
after (the rows whose compute sets the step).

First, how much of a prefill the experts are: one offline engine process (r = 0, all experts
in one process) times --rounds prefill passes of the same prompts and the time spent inside
moe.capacity's expert op (and its planner) during them.

Writes OUT/engine_prefill.json and prints a table (medians of the timed rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ascend_patch.core.report import read_reports
from ascend_patch.harness.procs import vllm_env
from ascend_patch.harness.server import ManagedServer, free_port
from ascend_patch.lab.arms import Arm, heldout_prompts, run_arm

CONFIG = """version: 1
patches:
  - name: cpu-collectives
    impl: distributed.cpu_collectives
  - name: moe-capacity
    impl: moe.capacity
    options:
      drop_token_ratio: {ratio!r}
      granularity: rank
      drop_policy: {policy}
      keep_top1: true
      min_tokens: 128
      dispatch: all_to_all
      log_interval: 1
"""


def start_server(model: Path, ratio: float, policy: str, prompts: list[list[int]],
                 work: Path, tag: str = "base") -> tuple[ManagedServer, Path]:
    out = work / f"r{ratio:g}-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(CONFIG.format(ratio=ratio, policy=policy))
    env = vllm_env(workers=2, ASCEND_PATCH_CONFIG=str(config),
                   ASCEND_PATCH_REPORT_DIR=str(out / "reports"))
    args = ["--data-parallel-size", "2", "--enable-expert-parallel",
            "--max-num-batched-tokens", str(sum(map(len, prompts))),
            "--max-num-seqs", str(len(prompts)), "--no-enable-prefix-caching",
            # Two DP servers run side by side: their DP RPC ports must differ.
            "--data-parallel-rpc-port", str(free_port())]
    server = ManagedServer(model, args=args, env=env, log_path=out / "server.log",
                           startup_timeout=600, load_format="safetensors",
                           # The figures in the README were measured eager (compiled mode
                           # had not landed): keep it so that a rerun compares like with like.
                           enforce_eager=True)
    server.start()
    return server, out


def group_cpu_seconds(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each live process of a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def timed_round(server: ManagedServer, pool: ThreadPoolExecutor,
                prompts: list[list[int]]) -> tuple[float, float]:
    """(seconds from the first request sent to the last answer, CPU seconds of the busiest
    process of the server meanwhile). The busiest process is a DP rank's worker: the one
    the other waits for at every all-to-all. Its CPU time is what contention distorts
    least (a process waiting for the machine accrues none)."""
    pgid = server.proc.pid
    before = group_cpu_seconds(pgid)
    t0 = time.perf_counter()
    answers = list(pool.map(lambda p: server.complete(p, max_tokens=1, timeout=600), prompts))
    elapsed = time.perf_counter() - t0
    after = group_cpu_seconds(pgid)
    assert all(a["usage"]["prompt_tokens"] == len(p) for a, p in zip(answers, prompts))
    busiest = max(after[pid] - before.get(pid, 0.0) for pid in after)
    return elapsed, busiest


def report_stats(out: Path) -> dict:
    """Drops and per-layer loads from the DP workers' reports (global over the EP group)."""
    stats = []
    for report in read_reports(out / "reports"):
        for patch in report["patches"]:
            if patch["name"] == "moe-capacity" and (patch.get("stats") or {}).get("layers"):
                stats.append(patch["stats"])
    layers = {}
    for s in stats:
        for name, layer in s["layers"].items():
            layers.setdefault(name, layer)
    return {
        "rows_dropped": max((s["rows_dropped"] for s in stats), default=0),
        "rows_routed": max((s["rows_routed"] for s in stats), default=0),
        "bottleneck_rows_before": sum(v["max_bin_load_before_sum"] for v in layers.values()),
        "bottleneck_rows_after": sum(v["max_bin_load_after_sum"] for v in layers.values()),
        "max_over_mean_before": {n: round(v["max_over_mean_before"], 4)
                                 for n, v in layers.items()},
        "all_to_all": [s.get("all_to_all") for s in stats],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "tests/data/tiny-moe-stdlib")
    parser.add_argument("--out", type=Path, default=REPO / "lab-out/engine-prefill")
    parser.add_argument("--ratios", default="0,0.01,0.02,0.05,0.1")
    parser.add_argument("--policy", default="probs")
    parser.add_argument("--prompts", type=int, default=8, help="concurrent requests a round")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--control", action="store_true",
                        help="also pair the r = 0 server with a second r = 0 server")
    args = parser.parse_args()

    ratios = [float(r) for r in args.ratios.split(",")]
    prompts = heldout_prompts(args.model, args.prompts, args.length)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts_file = args.out / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    offline = run_arm(Arm(0.0), args.model, prompts_file, args.out / "offline",
                      gen_tokens=1, time_prefill=args.rounds)["prefill_runs"]
    share = {key: statistics.median(r[f"{key}_s"] / r["wall_s"] for r in offline)
             for key in ("experts", "plan")}
    print(f"offline prefill of {sum(map(len, prompts))} tokens: median "
          f"{statistics.median(r['wall_s'] for r in offline):.3f} s, experts "
          f"{share['experts']:.1%} of it, planner {share['plan']:.1%}", flush=True)
    # The r = 0 server stays up; each other ratio's server runs beside it and the rounds
    # alternate between the two (order flipped every round), so both see the same load.
    baseline, base_out = start_server(args.model, 0.0, args.policy, prompts, args.out)
    runs = []
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            for _ in range(args.warmup):
                timed_round(baseline, pool, prompts)
            # A second r = 0 server first (--control): what the method reads when nothing
            # differs but the server (start order, warm-up, placement on the cores).
            others = ([0.0] if args.control else []) + [r for r in ratios if r != 0]
            for index, ratio in enumerate(others):
                server, out = start_server(args.model, ratio, args.policy, prompts, args.out,
                                           tag=f"{index}")
                try:
                    for _ in range(args.warmup):
                        timed_round(server, pool, prompts)
                    pairs = []
                    for i in range(args.rounds):
                        first, second = (baseline, server) if i % 2 == 0 else (server, baseline)
                        a, b = timed_round(first, pool, prompts), timed_round(second, pool, prompts)
                        pairs.append((a, b) if first is baseline else (b, a))
                finally:
                    server.stop()
                run = {"ratio": ratio, "control": index == 0 and args.control,
                       "r0_round_s": [p[0][0] for p in pairs],
                       "round_s": [p[1][0] for p in pairs],
                       "paired_ratio": statistics.median(b[0] / a[0] for a, b in pairs),
                       "r0_busiest_cpu_s": [p[0][1] for p in pairs],
                       "busiest_cpu_s": [p[1][1] for p in pairs],
                       "paired_cpu_ratio": statistics.median(b[1] / a[1] for a, b in pairs),
                       "load_average": [round(v, 2) for v in os.getloadavg()],
                       **report_stats(out)}
                runs.append(run)
                print(f"r={ratio:g}: median round {statistics.median(run['round_s']):.3f} s, "
                      f"r=0 beside it {statistics.median(run['r0_round_s']):.3f} s, paired "
                      f"ratio {run['paired_ratio']:.3f}, busiest-process CPU ratio "
                      f"{run['paired_cpu_ratio']:.3f}; rows dropped {run['rows_dropped']}/"
                      f"{run['rows_routed']}", flush=True)
    finally:
        baseline.stop()
    base_stats = report_stats(base_out)
    print("\n| r | prefill round r / r = 0 (median of paired rounds) | rounds, median s (r; r = 0) "
          "| busiest process CPU r / r = 0 | rows dropped | bottleneck-rank rows after / before |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        rows = r["bottleneck_rows_after"] / max(r["bottleneck_rows_before"], 1)
        name = "0 (control)" if r["control"] else f"{r['ratio']:g}"
        print(f"| {name} | {r['paired_ratio']:.3f} | {statistics.median(r['round_s']):.3f}"
              f"; {statistics.median(r['r0_round_s']):.3f} | {r['paired_cpu_ratio']:.3f} "
              f"| {r['rows_dropped'] / max(r['rows_routed'], 1):.2%} | {rows:.3f} |")
    summary = {"command": " ".join(["python", *sys.argv]), "offline_prefill": offline,
               "offline_share": share, "r0_stats": base_stats,
               "wall_s": round(time.perf_counter() - started, 1), "runs": runs}
    (args.out / "engine_prefill.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
