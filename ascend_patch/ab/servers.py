"""`ascend-patch ab --servers URL ... | --launch CONFIG ...`: A/B of live OpenAI servers.

One workload (a prompts file or a generated mix of prompt and output lengths) is replayed
against every server in rounds: the servers take turns in randomised blocks (as offline
arms do), one round of `--requests` streaming completions at most `--concurrency` at a time
per turn, after an uncounted warm-up round. Round r sends the same requests to every server,
and a fresh set each round (generated with seed + r, or the next slice of the prompts file),
so that no round is served from a prefix cache that an earlier round filled. After its
rounds, each server's held-out NLL is measured as the offline arms measure it (prompt_nll).

Only the given servers are contacted, at /v1/models, /version (vLLM's; a 404 is fine),
/v1/completions and, for launched servers, /health; redirects are refused and proxy
variables are ignored, so a request never goes anywhere else.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_patch.ab import output, stats
from ascend_patch.ab.common import (
    REPORT_INTERVAL_S,
    STOCK,
    WORKER_SETTLE_S,
    Arm,
    arm_env,
    compare,
    describe_load,
    describe_patches,
    load_average,
    held_out_prompts,
    perplexity,
    resolve_load_format,
    summarize_reports,
)


class ServerFailed(RuntimeError):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused "
                                     "(ab contacts only the given servers)", headers, fp)


# No ProxyHandler from the environment: a proxy would be another host to contact.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def get_json(url: str, timeout: float) -> Any:
    with _OPENER.open(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Request:
    prompt: str
    max_tokens: int


def make_workload(count: int, prompt_len: int, max_tokens: int, seed: int,
                  prompts: list[str] | None = None, offset: int = 0) -> list[Request]:
    """`count` requests: prompt and output lengths drawn uniformly from [len/4, len] (a mix
    of short and long), or the prompts file's lines from `offset` on, cycling."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        out = rng.randint(max(1, max_tokens // 4), max_tokens)
        if prompts:
            text = prompts[(offset + i) % len(prompts)]
        else:
            words = rng.randint(max(1, prompt_len // 4), prompt_len)
            text = " ".join(f"w{rng.randrange(500)}" for _ in range(words))
        requests.append(Request(text, out))
    return requests


@contextmanager
def _http_errors(base_url: str) -> Iterator[None]:
    """A failed request as one ServerFailed line naming the server."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500] if exc.fp else exc.reason
        raise ServerFailed(f"{base_url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServerFailed(f"{base_url}: {type(exc).__name__}: {exc}") from None


def _post(base_url: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def stream_completion(base_url: str, model: str, request: Request, seed: int,
                      timeout: float) -> dict[str, Any]:
    """One streaming completion: time to first token, per-token times, tokens and logprobs."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0.0, "seed": seed, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True},
            # vLLM's extension: every request yields exactly max_tokens tokens, so a server
            # that happens to sample end-of-text does not look faster.
            "ignore_eos": True}
    http = _post(base_url, body)
    started = time.perf_counter()
    deadline = started + timeout
    first = last = None
    text: list[str] = []
    tokens: list[str] = []
    logprobs: list[dict[str, float]] = []
    usage = None
    with _http_errors(base_url), _OPENER.open(http, timeout=timeout) as response:
        for raw in response:
            if time.perf_counter() > deadline:
                raise ServerFailed(f"{base_url}: request still streaming after {timeout:.0f} s")
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") or ""
                lp = choice.get("logprobs") or {}
                new_tokens = lp.get("tokens") or []
                if piece or new_tokens:
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                text.append(piece)
                for token, logprob in zip(new_tokens, lp.get("token_logprobs") or []):
                    tokens.append(token)
                    logprobs.append({token: logprob})
    ended = time.perf_counter()
    if first is None:
        raise ServerFailed(f"{base_url}: the stream carried no token")
    count = (usage or {}).get("completion_tokens") or len(tokens)
    return {"ttft_s": first - started, "e2e_s": ended - started, "output_tokens": count,
            "tpot_s": (last - first) / (count - 1) if count > 1 else None,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "text": "".join(text),
            "token_ids": tokens, "top_logprobs": logprobs}


def run_round(base_url: str, model: str, requests: list[Request], concurrency: int, seed: int,
              timeout: float) -> dict[str, Any]:
    """Every request of the round, at most `concurrency` in flight; wall time of the round."""
    pool = ThreadPoolExecutor(concurrency)
    started = time.perf_counter()
    futures = [pool.submit(stream_completion, base_url, model, r, seed, timeout)
               for r in requests]
    # Each request is bounded by `timeout`; queued ones start as others finish.
    done, pending = wait(futures, timeout=timeout * (len(requests) / concurrency + 1))
    wall = time.perf_counter() - started
    for future in pending:
        future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    if pending:
        raise ServerFailed(f"{base_url}: {len(pending)} requests unanswered after {wall:.0f} s")
    results = [f.result() for f in futures]  # raises the first failure
    return {"wall_s": wall, "requests": results,
            "requests_per_s": len(results) / wall,
            "output_tokens_per_s": sum(r["output_tokens"] for r in results) / wall}


def prompt_nll(base_url: str, model: str, texts: list[str], timeout: float) -> dict[str, Any]:
    """The held-out NLL the offline arms measure (harness/offline_run.py prompt_logprob_sum):
    per text, the sum of log p(token | text before it) over its tokens after the first, here
    from the prompt log-probabilities an echoed completion returns (OpenAI's `echo` with
    `logprobs`; vLLM computes them in the prefill, as its offline `prompt_logprobs`). One text
    per request, one after the other: each prefill holds that text alone, so every server is
    measured on the same batches whatever its scheduler does with concurrent requests."""
    per_prompt = []
    for text in texts:
        body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": 0}
        with _http_errors(base_url), _OPENER.open(_post(base_url, body),
                                                   timeout=timeout) as response:
            answer = json.loads(response.read())
        try:
            prompt_tokens = answer["usage"]["prompt_tokens"]
            values = answer["choices"][0]["logprobs"]["token_logprobs"][1:prompt_tokens]
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerFailed(f"{base_url}: no prompt log-probabilities in the echoed "
                               f"completion ({type(exc).__name__}: {exc})") from None
        if len(values) != prompt_tokens - 1 or any(v is None for v in values):
            raise ServerFailed(f"{base_url}: the echoed completion carries "
                               f"{len(values)} prompt log-probabilities for "
                               f"{prompt_tokens} prompt tokens")
        per_prompt.append({"logprob_sum": sum(values), "tokens": len(values)})
    return {"logprob_sum": sum(p["logprob_sum"] for p in per_prompt),
            "tokens": sum(p["tokens"] for p in per_prompt), "per_prompt": per_prompt}


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    label: str
    base_url: str
    model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    warmup: list[dict[str, Any]] = field(default_factory=list)
    managed: Any = None  # ManagedServer for --launch
    report_dir: Path | None = None
    config: Path | None = None
    nll: dict[str, Any] | None = None  # prompt_nll's, or {"error": why}


def probe(server: Server, wanted_model: str | None, timeout: float) -> None:
    """The served model (from /v1/models) and what the server says about itself."""
    try:
        models = [m["id"] for m in get_json(server.base_url + "/v1/models", timeout)["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ServerFailed(f"{server.base_url}/v1/models: {type(exc).__name__}: {exc}") from None
    if wanted_model is not None and wanted_model not in models:
        raise ServerFailed(f"{server.base_url} serves {', '.join(models) or 'no model'}, not "
                           f"{wanted_model}")
    if not models:
        raise ServerFailed(f"{server.base_url}/v1/models lists no model")
    server.model = wanted_model or models[0]
    server.info["models"] = models
    try:
        server.info["vllm"] = get_json(server.base_url + "/version", timeout).get("version")
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        server.info["vllm"] = None  # not vLLM, or an older one: unknown


def describe(server: Server) -> str:
    info = server.info
    head = f"{server.base_url}, model {server.model}" + (
        f", vLLM {info['vllm']}" if info.get("vllm") else "")
    if info.get("kind") == "launched":
        runs = info.get("runs") or "no report"
        return f"{head}; launched by ab: {info['what']}; reported: {runs}"
    if info.get("report"):
        return f"{head}; from its reports in {info['report_dir']}: {info['runs']}"
    return (f"{head}; external: its patches are unknown (a server does not report them over "
            "HTTP; give --server-reports with its ASCEND_PATCH_REPORT_DIR to show them), and "
            "so are its prefix caching and batching settings")


def round_medians(server: Server, key: str) -> list[float]:
    """Per counted round, the median of its requests' `key` (ttft_s, tpot_s)."""
    out = []
    for rnd in server.rounds:
        values = [r[key] for r in rnd["requests"] if r[key] is not None]
        out.append(statistics.median(values) if values else float("nan"))
    return out


def server_metrics(servers: list[Server], first_tokens: int) -> list[dict[str, Any]]:
    reference = servers[0]
    ref_ttft = round_medians(reference, "ttft_s")
    ref_tpot = round_medians(reference, "tpot_s")
    ref_rps = [r["requests_per_s"] for r in reference.rounds]
    ref_outs = [req for rnd in reference.rounds for req in rnd["requests"]]
    rows = []
    for server in servers:
        requests = [req for rnd in server.rounds for req in rnd["requests"]]
        ttft = [r["ttft_s"] for r in requests]
        tpot = [r["tpot_s"] for r in requests if r["tpot_s"] is not None]
        rps = [r["requests_per_s"] for r in server.rounds]
        row: dict[str, Any] = {
            "label": server.label, "base_url": server.base_url, "model": server.model,
            "info": server.info, "described": describe(server),
            "ttft_s": stats.estimate(ttft),
            "tpot_s": stats.estimate(tpot) if tpot else None,
            "requests_per_s": stats.estimate(rps),
            "output_tokens_per_s": stats.estimate(
                [r["output_tokens_per_s"] for r in server.rounds]),
            # Per round: reference over server for times, server over reference for rates.
            "ttft_speedup": stats.estimate(
                stats.paired_ratios(ref_ttft, round_medians(server, "ttft_s"))),
            "tpot_speedup": stats.estimate(
                stats.paired_ratios(ref_tpot, round_medians(server, "tpot_s"))),
            "requests_per_s_ratio": stats.estimate(stats.paired_ratios(rps, ref_rps)),
            "rounds": server.rounds, "warmup_rounds": server.warmup,
        }
        for key in ("ttft_speedup", "tpot_speedup", "requests_per_s_ratio"):
            row[key.replace("speedup", "verdict").replace("ratio", "verdict")] = (
                stats.verdict(row[key]))
        row.update(compare(ref_outs, requests, first_tokens))
        row.update(nll_columns(reference.nll, server.nll))
        row["text_exact_match_rate"] = (sum(a["text"] == b["text"] for a, b in
                                            zip(ref_outs, requests)) / len(requests))
        rows.append(row)
    return rows


def nll_columns(reference: dict[str, Any] | None, nll: dict[str, Any] | None
                ) -> dict[str, Any]:
    """Perplexity of the held-out text and the NLL increase per token against the reference
    (all tokens together: log of the perplexity ratio)."""
    ppl, ref_ppl = perplexity(nll), perplexity(reference)
    return {"nll": nll, "perplexity": ppl, "perplexity_error": (nll or {}).get("error"),
            "nll_increase": (None if ppl is None or ref_ppl is None
                             else math.log(ppl) - math.log(ref_ppl))}


def _nll_phrase(row: dict[str, Any]) -> str:
    if row["nll_increase"] is None:
        return "not measured (" + (row["perplexity_error"] or "no reference") + ")"
    return (f"{row['nll_increase']:+.4f} nats/token against the reference (perplexity "
            f"{row['perplexity']:.4g})")


def print_servers(console, rows: list[dict[str, Any]], heading: str) -> None:
    labels = output.short_labels([r["label"] for r in rows])
    output.say(console, heading, "")
    d1 = output.digits_for([r["ttft_s"] for r in rows], 1000)
    d2 = output.digits_for([r["tpot_s"] for r in rows], 1000)
    d3 = output.digits_for([r["requests_per_s"] for r in rows])
    console.print(output.table(
        "Per server: median [95% interval]",
        ["server", "TTFT ms", "TPOT ms", "req/s", "agree"],
        [[label, output.fmt(r["ttft_s"], 1000, d1), output.fmt(r["tpot_s"], 1000, d2),
          output.fmt(r["requests_per_s"], 1, d3), output.percent(r["token_agreement"], 1)]
         for label, r in zip(labels, rows)]))
    reference = labels[0]
    console.print(output.table(
        f"Against the reference {reference}: median of per-round ratios [95% interval]",
        ["server", "TTFT x", "TPOT x", "req/s x"],
        [[label, output.fmt(r["ttft_speedup"], 1, 3), output.fmt(r["tpot_speedup"], 1, 3),
          output.fmt(r["requests_per_s_ratio"], 1, 3)]
         for label, r in list(zip(labels, rows))[1:]]))
    for label, row in list(zip(labels, rows))[1:]:
        output.say(console,
            f"{label} vs {reference}: TTFT {output.ratio_phrase(row['ttft_speedup'], row['ttft_verdict'])}; "
            f"TPOT {output.ratio_phrase(row['tpot_speedup'], row['tpot_verdict'])}; requests/s "
            f"{output.ratio_phrase(row['requests_per_s_ratio'], row['requests_per_s_verdict'])}; outputs: "
            f"{output.percent(row['exact_match_rate'])} identical, "
            f"{output.percent(row['token_agreement'], 1)} of tokens, |dlogp| "
            f"{output.dlogp(row)}; held-out NLL {_nll_phrase(row)}.")
    console.print("What was compared:", markup=False)
    for label, row in zip(labels, rows):
        named = label != row["label"] and row["label"] not in row["described"]
        prefix = f"{label}{' = ' + row['label'] if named else ''}: "
        output.say(console, "  " + prefix + row["described"], "    ")
    output.say(console,
        "Legend: TTFT = time to the first streamed token; TPOT = time per output token after "
        "the first; req/s = requests of a round / its wall time; agree = output tokens equal "
        "to the reference's, by position; x = reference/server time or server/reference rate "
        "per round (>1: server faster); brackets = exact order-statistic 95% interval of the "
        "median (none below 6 samples); held-out NLL = from the prompt log-probabilities of "
        "echoed completions of the held-out text, one prompt per request.", "")


# ---------------------------------------------------------------- launching


def memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Resident memory of a CPU server with VLLM_CPU_KVCACHE_SPACE=1 without its weights: a TP=1
# tiny-model server's process group (API server, engine core, worker) held 2.97-3.02 GiB here
# (ps, summed over the group), rounded up to 1.5 GiB + 2 GiB per worker.
SERVER_BASE_BYTES = 3 << 29
WORKER_BYTES = 2 << 30


def side_by_side(count: int, tensor_parallel: int, model: Path, forced_sequential: bool
                 ) -> tuple[bool, str]:
    """Whether every launched server can be up at once, and why."""
    if forced_sequential:
        return False, "one at a time (--one-at-a-time)"
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) + sum(
        p.stat().st_size for p in model.glob("*.bin"))
    need = count * (SERVER_BASE_BYTES + tensor_parallel * WORKER_BYTES + weights)
    available = memory_available()
    if available is None or available < need:
        have = "unknown" if available is None else f"{available / 2**30:.1f} GiB"
        return False, (f"one at a time: {count} servers need about {need / 2**30:.1f} GiB, "
                       f"available {have}")
    return True, (f"side by side, interleaved: {count} servers need about "
                  f"{need / 2**30:.1f} GiB of {available / 2**30:.1f} GiB available")


def launched_servers(args, work: Path, arms: list[Arm] | None = None) -> list[Server]:
    """One server per arm, not started: by default one per --launch config ('stock': none),
    or the given arms (`tune` sets each arm's ratio through ASCEND_PATCH_OVERRIDE)."""
    from ascend_patch.harness.server import ManagedServer

    if arms is None:
        arms = [Arm(label, None if name == STOCK else Path(name).resolve())
                for name, label in zip(args.launch, _labels_for(args.launch))]
    servers = []
    for index, arm in enumerate(arms):
        report_dir = None if arm.config is None else work / f"server{index}-reports"
        # Prefix caching off: a round that repeats an earlier prompt must compute its prefill
        # (and make its drops) again, as the offline arms do.
        server_args = ["--tensor-parallel-size", str(args.tensor_parallel_size),
                       "--no-enable-prefix-caching", "--seed", str(args.seed),
                       "--max-model-len", str(args.max_model_len)]
        if args.enable_expert_parallel:
            server_args.append("--enable-expert-parallel")
        managed = ManagedServer(
            args.model, args=server_args,
            env=arm_env(arm, report_dir, args.tensor_parallel_size),
            log_path=work / f"server{index}.log", startup_timeout=args.timeout,
            # Eager, as the offline arms run (offline_run.py): arms compare patches, and
            # compiling every arm's server would double each arm's start-up.
            load_format=args.load_format, enforce_eager=True)
        what = ("vLLM with no patch (ASCEND_PATCH_CONFIG unset)" if arm.config is None
                else f"ASCEND_PATCH_CONFIG={arm.config}" + (
                    f" ASCEND_PATCH_OVERRIDE={json.dumps(arm.override)}" if arm.override else ""))
        info = {"kind": "launched", "what": what, "args": managed.cmd[1:]}
        if arm.config is None:
            info["runs"] = "nothing (no config, so ascend-patch stays out: no report)"
        servers.append(Server(arm.label, managed.base_url, info=info,
                              managed=managed, report_dir=report_dir, config=arm.config))
    return servers


def _labels_for(names: list[str]) -> list[str]:
    labels = [STOCK if n == STOCK else Path(n).stem for n in names]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _start(server: Server, args) -> None:
    from ascend_patch.harness.server import ServerError

    try:
        server.managed.start()
    except ServerError as exc:
        raise ServerFailed(f"server {server.label}: {exc}") from None
    server.base_url = server.managed.base_url
    server.info["pgid"] = server.managed.proc.pid  # its own session: group id = its pid


def _stop(server: Server) -> None:
    if server.managed is None or server.managed.proc is None:
        return
    if server.report_dir is not None:
        # Read while the server is up: its processes rewrite their reports every
        # REPORT_INTERVAL_S, and a worker killed at stop may not write one at exit.
        time.sleep(REPORT_INTERVAL_S + 0.5)
        summary = summarize_reports(server.report_dir)
        server.info["report"] = summary
        server.info["runs"] = describe_patches(summary)
    server.managed.stop(grace=10.0)


# ---------------------------------------------------------------- the A/B


def placement_of(args, servers: list[Server]) -> tuple[bool, str]:
    """Whether the servers run side by side (interleaved), and the phrase that says so."""
    if any(server.managed is not None for server in servers):
        return side_by_side(len(servers), args.tensor_parallel_size, Path(args.model),
                            args.one_at_a_time)
    return True, "already running, interleaved"


def run_servers(args, servers: list[Server], together: bool, console
                ) -> tuple[list[list[int]], list[list[Request]]]:
    """Start (launched servers), run the warm-up and counted rounds of every server, measure
    each one's held-out NLL (prompt_nll) before it stops; every launched server is stopped on
    the way out, failures included. Returns the blocks in run order and the workloads."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    blocks = stats.block_order(len(servers), args.warmup + args.repeats, args.seed)
    if not together:
        # One server up at a time: all of its rounds, then the next server. Not interleaved,
        # so drift of the machine between servers is not cancelled (the heading says so).
        blocks = [[i] for i in range(len(servers)) for _ in range(args.warmup + args.repeats)]
    workloads = [make_workload(args.requests, args.prompt_len, args.max_tokens, args.seed + b,
                               args.prompts, b * args.requests)
                 for b in range(args.warmup + args.repeats)]
    texts = held_out_prompts(args)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("A/B servers", total=len(servers) * (
                2 + args.warmup + args.repeats))
            started: set[int] = set()

            def measure_nll(index: int) -> None:
                # After the server's rounds, so that its timed rounds are not disturbed.
                server = servers[index]
                progress.update(task, description=f"held-out NLL: {server.label}")
                try:
                    server.nll = prompt_nll(server.base_url, server.model, texts, args.timeout)
                except ServerFailed as exc:
                    # Optional for `ab` (not every server echoes logprobs): say why it is missing.
                    server.nll = {"error": str(exc).splitlines()[0]}
                progress.advance(task)

            def ensure_up(index: int) -> None:
                server = servers[index]
                if index in started:
                    return
                if not together:
                    for other in list(started):
                        measure_nll(other)
                        _stop(servers[other])
                        started.discard(other)
                if server.managed is not None:
                    progress.update(task, description=f"start {server.label}")
                    _start(server, args)
                probe(server, args.served_model, min(args.timeout, 60.0))
                started.add(index)
                progress.advance(task)

            if together:
                for index in range(len(servers)):
                    ensure_up(index)
            per_server_round = [0] * len(servers)
            last: int | None = None
            for members in blocks:
                for index in members:
                    ensure_up(index)
                    server = servers[index]
                    if last not in (None, index) and last in started and \
                            servers[last].managed is not None:
                        # A server launched here and still up shares these CPUs.
                        time.sleep(WORKER_SETTLE_S)
                    last = index
                    round_index = per_server_round[index]
                    per_server_round[index] += 1
                    counted = round_index >= args.warmup
                    what = (f"round {round_index - args.warmup + 1}/{args.repeats}" if counted
                            else f"warm-up {round_index + 1}/{args.warmup}")
                    progress.update(task, description=f"{what}: {server.label}")
                    result = run_round(server.base_url, server.model, workloads[round_index],
                                       args.concurrency, args.seed, args.timeout)
                    result["round"] = round_index
                    (server.rounds if counted else server.warmup).append(result)
                    progress.advance(task)
            for index in sorted(started):
                measure_nll(index)
    finally:
        for server in servers:
            _stop(server)
    return blocks, workloads


def run_server_ab(args) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-servers-", dir=out_dir))
    if args.launch:
        args.load_format = resolve_load_format(args.load_format, Path(args.model))
        servers = launched_servers(args, work)
    else:
        servers = [Server(label, url) for label, url in zip(_url_labels(args.servers),
                                                             args.servers)]
        for server, reports in zip(servers, args.server_reports or [None] * len(servers)):
            server.info["kind"] = "external"
            if reports not in (None, "-"):
                summary = summarize_reports(Path(reports))
                server.info.update(report=summary, report_dir=reports,
                                   runs=describe_patches(summary))
    together, placement = placement_of(args, servers)
    load_before = load_average()
    try:
        blocks, workloads = run_servers(args, servers, together, console)
    except ServerFailed as exc:
        console.print(str(exc), markup=False)
        return 1
    rows = server_metrics(servers, args.first_tokens)
    source = (f"prompts from {args.prompts_file}" if args.prompts is not None
              else f"generated prompts of {max(1, args.prompt_len // 4)}-{args.prompt_len} words")
    heading = (f"Live A/B: {args.requests} requests per round ({source}, "
               f"{max(1, args.max_tokens // 4)}-{args.max_tokens} output tokens, concurrency "
               f"{args.concurrency}), {args.repeats} rounds per server after {args.warmup} "
               f"warm-up round(s); servers {placement}. "
               f"{describe_load(load_before, load_average())}")
    rounds = args.warmup + args.repeats
    if args.prompts is not None and len(args.prompts) < rounds * args.requests:
        heading += (" The prompts file has fewer prompts than rounds x requests: later rounds "
                    "repeat prompts, which a server with prefix caching serves from its cache.")
    print_servers(console, rows, heading)
    summary = {"mode": "servers", "requests": args.requests, "concurrency": args.concurrency,
               "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
               "placement": placement,
               "order": [[rows[i]["label"] for i in block] for block in blocks],
               "workloads": [[{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in w]
                             for w in workloads],
               "interval": "exact order-statistic (binomial) 95% interval of the median",
               "load_average_before": load_before, "load_average_after": load_average(),
               "work_dir": str(work),
               "servers": output.as_json(rows)}
    output.save(console, out_dir, summary, rows, "Live A/B",
                {"TTFT speed-up": "ttft_speedup", "TPOT speed-up": "tpot_speedup",
                 "requests/s ratio": "requests_per_s_ratio"}, xlabel="server", per="round")
    return 0


def _url_labels(urls: list[str]) -> list[str]:
    """host:port where that tells the servers apart, else the whole URL."""
    short = [urllib.parse.urlsplit(u).netloc + urllib.parse.urlsplit(u).path for u in urls]
    return short if len(set(short)) == len(short) else list(urls)

