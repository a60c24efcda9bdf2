"""`ascend-patch tune CONFIG --model M --max-loss X`: its arguments, checked before anything
starts (one line, exit 2, for each mistake), and the dispatch to ascend_patch.ab.tune.

Building this parser imports neither torch nor vLLM.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from ascend_patch.cli.ab import (
    _LIMITS,
    DEFAULT_CONCURRENCY,
    DEFAULT_REPEATS,
    DEFAULT_REQUESTS,
    _int_in,
    _prompts_file,
    _ratios,
    _seconds,
    _sigterm_as_exit,
)

DEFAULT_RATIOS = "0.05,0.1,0.2,0.3"

OVERFLOWS = ("drop", "reroute")


def _loss(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (nats per token)") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a loss >= 0 in nats per token")
    return value


def _candidate_ratios(text: str) -> list[float]:
    ratios = _ratios(text)
    if 0.0 in ratios:
        raise argparse.ArgumentTypeError("r=0 is always run as the reference: give candidate "
                                         "ratios above 0")
    if len(set(ratios)) != len(ratios):
        raise argparse.ArgumentTypeError(f"{text!r} names a ratio twice")
    return ratios


def _overflows(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    unknown = [t for t in items if t not in OVERFLOWS]
    if unknown or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give drop, reroute or both, comma separated, each once")
    return items


def add_parser(sub) -> None:
    tune = sub.add_parser(
        "tune", help="choose the largest drop ratio (and overflow mode) within a loss budget "
                     "by the repeated A/B, and pin it as a per-model profile")
    n = {name: _int_in(*bounds) for name, bounds in _LIMITS.items()}
    tune.add_argument("config", help="config with the moe.capacity patch to tune")
    tune.add_argument("--model", required=True, help="model directory (with config.json)")
    tune.add_argument("--max-loss", type=_loss, required=True, metavar="NATS",
                      help="budget: held-out NLL increase per token against r=0; a setting "
                           "qualifies when its 95%% interval's upper bound is within it")
    tune.add_argument("--ratios", type=_candidate_ratios, default=_candidate_ratios(DEFAULT_RATIOS),
                      help=f"candidate drop ratios, comma separated (default {DEFAULT_RATIOS})")
    tune.add_argument("--overflow", type=_overflows, default=list(OVERFLOWS),
                      help="overflow modes to try: drop, reroute or both (default both)")
    tune.add_argument("--patch", help="name of the moe.capacity patch (default: the first)")
    tune.add_argument("--write", metavar="FILE",
                      help="write a config that extends CONFIG with the profile to FILE "
                           "(replaced whole, atomically); default: print the YAML fragment")
    tune.add_argument("--profile", help="name of the profile (default tuned-<arch>-vllm<line>)")
    tune.add_argument("--prompts", type=_prompts_file, metavar="FILE",
                      help="held-out prompts: a JSON list of strings or one per line")
    tune.add_argument("--num-prompts", type=n["num_prompts"], default=8)
    tune.add_argument("--prompt-len", type=n["prompt_len"], default=200)
    tune.add_argument("--max-tokens", type=n["max_tokens"], default=16)
    tune.add_argument("--max-model-len", type=n["max_model_len"], default=1024)
    tune.add_argument("--first-tokens", type=n["first_tokens"], default=4)
    tune.add_argument("--repeats", type=n["repeats"], default=DEFAULT_REPEATS,
                      help="measured repeats per arm (9: the fewest with a 95%% interval that "
                           "leaves out the slowest and fastest run)")
    tune.add_argument("--warmup", type=n["warmup"], default=1)
    tune.add_argument("--seed", type=n["seed"], default=0)
    tune.add_argument("--tensor-parallel-size", type=n["tensor_parallel_size"], default=1)
    tune.add_argument("--enable-expert-parallel", action="store_true")
    tune.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    tune.add_argument("--timeout", type=_seconds, default=600.0)
    tune.add_argument("--out", default="tune-out", help="folder for the engines' or servers' logs")
    live = tune.add_argument_group(
        "live servers (--launch: one OpenAI server per arm, as `ab --launch` starts them)")
    live.add_argument("--launch", action="store_true",
                      help="run the arms as servers of --model (r=0 and each candidate through "
                           "ASCEND_PATCH_OVERRIDE); speed is the paired TTFT speed-up per round, "
                           "loss the held-out NLL from echoed prompt log-probabilities")
    live.add_argument("--one-at-a-time", action="store_true",
                      help="never run two servers at once (default: side by side, interleaved, "
                           "when memory allows)")
    live.add_argument("--requests", type=n["requests"],
                      help=f"requests per round (default {DEFAULT_REQUESTS})")
    live.add_argument("--concurrency", type=n["concurrency"],
                      help=f"requests in flight at once (default {DEFAULT_CONCURRENCY})")
    tune.set_defaults(func=_dispatch)
    tune.error = _one_line_error  # type: ignore[method-assign]


def _one_line_error(message: str) -> None:
    sys.stderr.write(f"ascend-patch tune: error: {message}\n")
    sys.exit(2)


def check_args(args) -> str | None:
    """What is wrong with the arguments together (each alone was checked by its type)."""
    if not Path(args.config).is_file():
        return f"argument CONFIG: {args.config} is not a file"
    if not (Path(args.model) / "config.json").is_file():
        return f"argument --model: {args.model} is not a model directory (no config.json)"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"argument --out: {args.out} exists and is not a folder"
    from ascend_patch.core.spec import PATCH_NAME_PATTERN

    if args.profile is not None and not re.fullmatch(PATCH_NAME_PATTERN, args.profile):
        return (f"argument --profile: {args.profile!r} is not a profile name (1-64 letters, "
                f"digits, '_', '.', '-', starting with a letter or digit)")
    if args.write is not None:
        target = Path(args.write)
        if target.is_dir():
            return f"argument --write: {args.write} is a folder"
        if not target.resolve().parent.is_dir():
            return f"argument --write: the folder of {args.write} does not exist"
        if target.resolve() == Path(args.config).resolve():
            return (f"argument --write: {args.write} is CONFIG itself; the profile goes in a "
                    f"config that extends it")
    if not args.launch:
        for flag, given in (("--requests", args.requests is not None),
                            ("--concurrency", args.concurrency is not None),
                            ("--one-at-a-time", args.one_at_a_time)):
            if given:
                return f"argument {flag}: goes with --launch (the live servers' rounds)"
    if "reroute" in args.overflow:
        from ascend_patch.core.versions import detect_stack
        from ascend_patch.impls.moe.options import REROUTE_STACKS

        stack = detect_stack()
        if (stack.line, stack.platform) not in REROUTE_STACKS:
            return (f"argument --overflow: reroute needs the router scores, which vLLM "
                    f"{stack.line} ({stack.platform}) does not bring to the drop step; "
                    f"give --overflow drop")
    return None


def _dispatch(args) -> int:
    problem = check_args(args)
    if problem:
        _one_line_error(problem)
    args.prompts_file, args.prompts = args.prompts or (None, None)
    if args.launch:
        args.requests = args.requests or DEFAULT_REQUESTS
        args.concurrency = args.concurrency or DEFAULT_CONCURRENCY
    from ascend_patch.ab.tune import run_tune

    with _sigterm_as_exit():
        return run_tune(args)
