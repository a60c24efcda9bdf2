"""Does `ascend-patch tune`'s evidence hold up in a separate `ascend-patch ab` run?

    python scripts/tune_vs_ab.py CONFIG --model tests/data/tiny-moe-stdlib --max-loss X \
        [--ratios 0.1,0.2] [--launch] [--prompts 12] [--length 256] [--repeats 9] --out DIR

1. held-out prompts: --prompts consecutive chunks of --length tokens of the model's
   heldout.txt, decoded to text (DIR/prompts.json); with --skewed, the model is instead
   lab/skewed_moe.py's (built in DIR/model: experts are most of its prefill, and its router
   loads one of two simulated EP ranks as DeepSeek-R1's hottest rank at EP32, as
   scripts/bench_engine.py builds it), whose random weights have no held-out text: the
   prompts are `ab`'s generated ones (--prompts of --length words);
2. `ascend-patch tune CONFIG ... --overflow drop --write DIR/tuned.yaml` (offline engine, or
   live servers with --launch);
3. `ascend-patch ab --arms CONFIG DIR/tuned.yaml` (with --launch: `ab --launch CONFIG
   DIR/tuned.yaml`) on the same prompts: the reference is CONFIG as it is (it must be
   dropless), the other arm the tuned config, whose profile the engine or server picks by
   the model's architecture, as in production;
4. the check: ab's NLL increase (over the same prompts, the same Student-t interval, tune's
   loss_interval) and its speed-up (offline prefill, live TTFT, with ab's order-statistic
   interval) against tune's recorded figures for the chosen arm: each median inside the
   other run's 95% interval, and the intervals overlap.

Each of the two runs is skipped when its output is already in DIR (tuned.yaml, ab/ab.json),
so they can run as two commands (each under `flock /tmp/heavy.lock`). Exit 0 when every
check holds, 1 when one fails, 2 when tune chose r = 0 and no --compare names a candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ascend_patch.ab.tune import loss_interval


def held_out_texts(model: Path, count: int, length: int) -> list[str]:
    """The drop-accuracy study's held-out chunks (lab/arms.py), as text for the CLI."""
    from tokenizers import Tokenizer

    from ascend_patch.lab.arms import heldout_prompts

    try:
        chunks = heldout_prompts(model, count, length)
    except ValueError as exc:
        raise SystemExit(f"{model / 'heldout.txt'}: {exc}") from None
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [tokenizer.decode(chunk) for chunk in chunks]


def ascend_patch(*args: str) -> None:
    cmd = [sys.executable, "-m", "ascend_patch", *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def dropless(config: Path) -> bool:
    from ascend_patch.ab.offline import capacity_patch_name
    from ascend_patch.core.config import load_config

    name = capacity_patch_name(config, None)
    (patch,) = [p for p in load_config(config).patches if p.name == name]
    return patch.options.drop_token_ratio == 0.0


def inside(value: float, lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and lo <= value <= hi


def overlap(a: tuple, b: tuple) -> bool:
    return None not in (*a, *b) and a[0] <= b[1] and b[0] <= a[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="dropless config with a moe.capacity patch")
    parser.add_argument("--model", type=Path, default=REPO / "tests/data/tiny-moe-stdlib")
    parser.add_argument("--max-loss", required=True)
    parser.add_argument("--ratios", default="0.1,0.2")
    parser.add_argument("--launch", action="store_true", help="live servers instead of engines")
    parser.add_argument("--skewed", action="store_true",
                        help="lab/skewed_moe.py's model (built in OUT/model) instead of --model")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--length", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="--launch: per round")
    parser.add_argument("--concurrency", type=int, default=4, help="--launch")
    parser.add_argument("--compare", metavar="LABEL",
                        help="when tune chooses r=0, compare this candidate (e.g. 'r=0.3 drop')")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.skewed:
        args.model = args.out / "model"
        if not (args.model / "config.json").exists():
            from ascend_patch.lab import skewed_moe

            target = skewed_moe.equivalent_skew(skewed_moe.R1_MAX_OVER_MEAN,
                                                skewed_moe.R1_EP_SIZE, 2)
            print(f"model: {skewed_moe.write_model(args.model, skewed_moe.ModelShape(), target)}")
    if not dropless(args.config):
        raise SystemExit(f"{args.config}: its moe.capacity patch drops (drop_token_ratio > 0); "
                         "the reference arm must be dropless")
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.json"
    if not prompts.exists():
        from ascend_patch.ab.common import make_prompts

        texts = (make_prompts(args.prompts, args.length, seed=0) if args.skewed
                 else held_out_texts(args.model, args.prompts, args.length))
        prompts.write_text(json.dumps(texts))
    common = ["--model", str(args.model), "--prompts", str(prompts), "--repeats",
              str(args.repeats), "--max-tokens", str(args.max_tokens)]
    live = ["--requests", str(args.requests), "--concurrency", str(args.concurrency),
            "--one-at-a-time"] if args.launch else []
    tuned = args.out / "tuned.yaml"
    if not tuned.exists():
        ascend_patch("tune", str(args.config), *common, "--max-loss", args.max_loss,
                     "--ratios", args.ratios, "--overflow", "drop", "--write", str(tuned),
                     "--out", str(args.out / "tune-out"), *(["--launch"] if args.launch else []),
                     *live)
    body = yaml.safe_load(tuned.read_text())
    (profile,) = body["profiles"].values()
    evidence = profile["evidence"]
    print(f"tune chose {evidence['chosen']}: {profile['description']}")
    label = evidence["chosen"]
    if label == "r=0":
        if args.compare is None:
            return 2
        # Nothing chosen: check the evidence of the candidate named instead, run by ab
        # through a config that pins it (the tuned file's profile pins r = 0).
        label = args.compare
        ratio, overflow = label.removeprefix("r=").split()
        profile["patches"] = {name: {"options": {"drop_token_ratio": float(ratio),
                                                 "overflow": overflow}}
                              for name in profile["patches"]}
        pinned = args.out / "compare.yaml"
        pinned.write_text(yaml.safe_dump(body, sort_keys=False))
        tuned = pinned
        print(f"comparing {label} instead, pinned in {pinned}")
    (arm,) = [a for a in evidence["arms"] if a["label"] == label]
    ab_json = args.out / "ab" / "ab.json"
    if not ab_json.exists():
        arms = (["--launch", str(args.config), str(tuned)] if args.launch
                else ["--arms", str(args.config), str(tuned)])
        ascend_patch("ab", *arms, *common, "--out", str(args.out / "ab"), *live)
    summary = json.loads(ab_json.read_text())
    reference, other = summary["servers" if args.launch else "arms"]
    applied = (other["info"]["report"] if args.launch else other["report"]).get("profile")
    ab_loss = loss_interval(reference["nll"]["per_prompt"], other["nll"]["per_prompt"])
    speed = other["ttft_speedup" if args.launch else "prefill_speedup"]
    t_loss, t_speed = arm["nll_increase"], arm["speedup"]
    checks = {
        f"ab ran the tuned profile (reported: {applied})": applied is not None,
        "ab's NLL increase inside tune's interval": inside(ab_loss.mean, t_loss["lo"],
                                                           t_loss["hi"]),
        "tune's NLL increase inside ab's interval": inside(t_loss["mean"], ab_loss.lo,
                                                           ab_loss.hi),
        "ab's speed-up inside tune's interval": inside(speed["median"], t_speed["lo"],
                                                       t_speed["hi"]),
        "tune's speed-up inside ab's interval": inside(t_speed["median"], speed["lo"],
                                                       speed["hi"]),
        "speed-up intervals overlap": overlap((t_speed["lo"], t_speed["hi"]),
                                              (speed["lo"], speed["hi"])),
    }
    what = "TTFT" if args.launch else "prefill"
    print(f"| run | NLL increase [95%] (nats/token) | {what} speed-up [95%] |")
    print("|---|---|---|")
    print(f"| tune, {arm['label']} | {t_loss['mean']:+.4f} [{t_loss['lo']:.4f}, "
          f"{t_loss['hi']:.4f}] | {t_speed['median']:.3f} [{t_speed['lo']:.3f}, "
          f"{t_speed['hi']:.3f}] |")
    print(f"| ab, {other['label']} | {ab_loss.mean:+.4f} [{ab_loss.lo:.4f}, {ab_loss.hi:.4f}] "
          f"| {speed['median']:.3f} [{speed['lo']:.3f}, {speed['hi']:.3f}] |")
    for text, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
