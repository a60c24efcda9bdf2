"""`ascend-patch ab`: its arguments, checked before anything starts, and the dispatch to
the offline A/B (ascend_patch.ab.offline), the live-server A/B (ascend_patch.ab.servers) or
the MoE layer study (ascend_patch.lab.layer, with --layer).

Building this parser imports neither torch nor vLLM: `ascend-patch validate` and `plan` build
it too, on machines that have neither.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

DEFAULT_REPEATS = 9
DEFAULT_REQUESTS = 8  # per round of the live A/B
DEFAULT_CONCURRENCY = 4

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


def _items(text: str) -> list[str]:
    """A comma-separated list; what each item may be is checked with the rest of --layer's
    arguments (lab/layer.py), so that building this parser imports nothing of the lab."""
    return [t.strip() for t in text.split(",")]


def parse_url(text: str) -> str:
    """An http(s) base URL, without a trailing '/' or '/v1' (both are accepted)."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port  # raises ValueError for a port out of range
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: give the server's base URL, without "
                                         "?query or #fragment")
    del port
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def add_parser(sub) -> None:
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
    live.add_argument("--requests", type=n["requests"], default=DEFAULT_REQUESTS,
                      help="requests per round")
    live.add_argument("--concurrency", type=n["concurrency"], default=DEFAULT_CONCURRENCY,
                      help="requests in flight at once")
    ab.add_argument("--layer", action="store_true", help="MoE layer alone on synthetic routing")
    g = ab.add_argument_group("--layer (MoE layer alone on synthetic DeepSeek-V3 routing)")
    g.add_argument("--skews", type=_items, default=_items("balanced,moderate,r1"),
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
    g.add_argument("--policies", type=_items, default=_items("probs,position,seed"))
    g.add_argument("--reps", type=n["reps"], default=9, help="timing repetitions (medians)")
    g.add_argument("--threads", type=n["threads"], default=1, help="torch threads while timing")
    g.add_argument("--no-keep-top1", action="store_true")
    g.add_argument("--no-timing", action="store_true", help="skip the bottleneck-rank timing")
    ab.set_defaults(func=_dispatch, ab_parser=ab)


def check_args(args) -> str | None:
    """What is wrong with a combination of arguments (each alone was checked by its type)."""
    from ascend_patch.ab.common import STOCK

    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"argument --out: {args.out} exists and is not a folder"
    if args.layer:
        from ascend_patch.lab.layer import args_problem

        return args_problem(args)
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
        from ascend_patch.lab.layer import run_layer_ab

        return run_layer_ab(args)
    with _sigterm_as_exit():
        if args.servers or args.launch:
            from ascend_patch.ab.common import STOCK, Arm, check_arms
            from ascend_patch.ab.servers import run_server_ab

            check_arms([Arm(Path(c).stem, None if c == STOCK else Path(c))
                        for c in args.launch or ()])
            args.served_model = args.model if args.servers else None
            return run_server_ab(args)
        from ascend_patch.ab.offline import run_ab

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
