"""Issue item 1: the MoE layer alone, DeepSeek-V3 routing shape, simulated EP16.

    .venvs/vllm-0.32/bin/python scripts/bench_moe_layer.py [--tokens 8192] [--reps 9] [--out bench-results]

8192 tokens per call by default: the seed PR's setting (batch 8 x 3.5K-token prompts over
AttnDP=2) gives ~14K prefill tokens per MoE call; fewer tokens leave each expert's fixed cost
(streaming its weights, ~90 us per matmul here) a larger share of the bottleneck rank's time.

256 experts, top-8, grouped sigmoid routing (routing_sim), hidden/intermediate scaled for CPU
(1024/256 by default; DeepSeek-V3 has 7168/2048), skews balanced / moderate (1.5) / R1 (2.5),
ratios 0, 0.01, 0.02, 0.05, 0.1, policies probs / position / seed fixed capacity. Per cell:
bottleneck-rank compute time ratio vs r=0 (medians of interleaved reps), the analytic ideal,
achieved fraction, relative output error. Prints a table, writes moe_layer.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ascend_patch.lab.layer import (
    LayerSetup,
    check_cells,
    layer_ab,
    machine_info,
    plot,
    print_table,
    targets,
    write_json,
)


def run(setup: LayerSetup, out_dir: Path | None = None, quiet: bool = False) -> dict:
    result = layer_ab(setup, progress=None if quiet else (lambda m: print(m, file=sys.stderr)))
    result["machine"] = machine_info()
    result["checks"] = check_cells(result, setup.keep_top1)
    result["targets"] = targets(result)
    if out_dir is not None:
        write_json(out_dir / "moe_layer.json", result)
        plot(result, out_dir / "moe_layer.png")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--ep-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratios", default="0,0.01,0.02,0.05,0.1")
    p.add_argument("--skews", default="balanced,moderate,r1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    setup = LayerSetup(tokens=a.tokens, hidden=a.hidden, intermediate=a.intermediate,
                       ep_size=a.ep_size, reps=a.reps, threads=a.threads, seed=a.seed,
                       ratios=[float(r) for r in a.ratios.split(",")],
                       skews=[s if s in ("balanced", "moderate", "r1") else float(s)
                              for s in a.skews.split(",")])
    out = Path(a.out)
    result = run(setup, out)
    print_table(result)
    for name, t in result["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({t['cells']} cells)"
              + ("; " + "; ".join(t["failures"]) if t["failures"] else ""))
    if result["checks"]:
        print("honesty checks FAILED:\n  " + "\n  ".join(result["checks"]))
    print(f"machine: {result['machine']['uptime']}")
    print(f"wrote {out / 'moe_layer.json'} and {out / 'moe_layer.png'}")
    return 1 if result["checks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
