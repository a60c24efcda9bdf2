"""Step time of the DP=2 + EP server in vLLM's default compiled mode against --enforce-eager.

    .venvs/vllm-0.32/bin/python scripts/bench_compiled.py [--rounds 5] [--max-tokens 32]

One run, same machine, same workload, one server per mode (eager first, then vLLM's default:
torch.compile, which on CPU captures no graphs): configs/cpu-dp-ep.yaml (moe.capacity with
`dispatch: all_to_all`, drop ratio 0.1) on the tiny DeepseekV3 (random weights), `-dp 2
--enable-expert-parallel`. After a warm-up request, `--rounds` rounds of 4 concurrent
300-word prompts (so both DP ranks prefill and decode together). Step times come from vLLM's
own histograms on /metrics, as deltas over the measured rounds:

* decode step: vllm:inter_token_latency_seconds, sum / count (the time between two tokens of
  a request: one engine step);
* prefill: vllm:request_prefill_time_seconds, sum / count;

plus the wall time of the rounds and the start-up time of each server. Prints a table and the
ratios compiled / eager (below 1: compiled is faster), writes bench-results/compiled.json.
Timings share the 2-core machine with whatever else runs (the load is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ascend_patch.harness.procs import vllm_env  # noqa: E402
from ascend_patch.harness.server import ManagedServer  # noqa: E402
from ascend_patch.harness.tiny_model import make_tiny_model  # noqa: E402

HISTOGRAMS = {"decode_step_s": "vllm:inter_token_latency_seconds",
              "prefill_s": "vllm:request_prefill_time_seconds"}


def prompt(seed: int, words: int = 300) -> str:
    return " ".join(f"w{(7 * seed + j) % 500}" for j in range(words))


def histogram_totals(server: ManagedServer) -> dict[str, tuple[float, float]]:
    """{histogram: (sum, count)} over all label sets (both DP engines)."""
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    totals = {}
    for key, name in HISTOGRAMS.items():
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
        totals[key] = (total, count)
    return totals


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(model: Path, work: Path, *, eager: bool, rounds: int, max_tokens: int,
            timeout: float) -> dict:
    mode = "eager" if eager else "compiled"
    env = vllm_env(workers=2, ASCEND_PATCH_CONFIG=str(REPO / "configs" / "cpu-dp-ep.yaml"))
    server = ManagedServer(model, args=["--data-parallel-size", "2", "--enable-expert-parallel"],
                           env=env, log_path=work / f"{mode}.log", startup_timeout=timeout,
                           enforce_eager=eager)
    began = time.monotonic()
    with server:
        startup = time.monotonic() - began
        server.complete(prompt(99), max_tokens=4)  # first requests after start-up: warm-up
        before = histogram_totals(server)
        load_before = load_average()
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            for r in range(rounds):
                list(pool.map(lambda i, r=r: server.complete(
                    prompt(4 * r + i), max_tokens=max_tokens, ignore_eos=True), range(4)))
        wall = time.monotonic() - t0
        after = histogram_totals(server)
    result = {"mode": mode, "startup_s": startup, "rounds_wall_s": wall,
              "load_average": [load_before, load_average()]}
    for key in HISTOGRAMS:
        total = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        result[key] = total / count if count else None
        result[key + "_samples"] = count
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="start-up seconds per mode")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-compiled-"))
    model = make_tiny_model(work / "tiny-deepseek-v3", "deepseek_v3")
    runs = [measure(model, work, eager=eager, rounds=args.rounds, max_tokens=args.max_tokens,
                    timeout=args.timeout) for eager in (True, False)]
    eager, compiled = runs
    ratios = {key: (compiled[key] / eager[key]) if eager[key] and compiled[key] else None
              for key in ("decode_step_s", "prefill_s", "rounds_wall_s")}
    print(f"\nDP=2 + EP, configs/cpu-dp-ep.yaml, tiny DeepseekV3; {args.rounds} rounds x 4 "
          f"prompts x {args.max_tokens} tokens; logs in {work}")
    print(f"{'mode':<10}{'start-up s':>12}{'decode step ms':>16}{'prefill ms':>12}"
          f"{'rounds wall s':>15}  load (before, after)")
    for run in runs:
        print(f"{run['mode']:<10}{run['startup_s']:>12.1f}{1000 * run['decode_step_s']:>16.1f}"
              f"{1000 * run['prefill_s']:>12.1f}{run['rounds_wall_s']:>15.1f}  "
              f"{run['load_average']}")
    print("compiled / eager: " + ", ".join(
        f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in ratios.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled.json").write_text(json.dumps(
        {"runs": runs, "compiled_over_eager": ratios, "rounds": args.rounds,
         "max_tokens": args.max_tokens}, indent=2))
    print(f"wrote {out / 'compiled.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
