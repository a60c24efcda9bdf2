"""Run prompts through vLLM's offline engine and print the result as one JSON line.

    python -m ascend_patch.harness.offline_run MODEL_DIR --prompts-json FILE [--max-tokens N] ...

Its own process, so each run (an A/B arm, a test) gets a fresh vLLM with the patches that
ASCEND_PATCH_CONFIG names. The output line starts with RESULT_PREFIX.

With --driver the engine stays up and runs the workload on request, which is how
`ascend-patch ab` keeps one engine per arm across its repeats (an engine start costs far more
than a repeat). The protocol, one JSON object per line:

    child -> stdout   ASCEND_PATCH_READY {"startup_s": ...}
    parent -> stdin   {"id": 3, "op": "run" | "perplexity", "out": "/path/result.json"}
    child -> stdout   ASCEND_PATCH_DONE {"id": 3}          (the result is in "out")
                      ASCEND_PATCH_FAILED {"id": 3, "error": "..."}
    parent -> stdin   {"op": "quit"}  or end of file: the child exits

Results go to files, not to stdout, because vLLM's own processes write to the same stdout and
a long line could be interleaved with theirs; the short status lines are written whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULT_PREFIX = "ASCEND_PATCH_RESULT "
READY_PREFIX = "ASCEND_PATCH_READY "
DONE_PREFIX = "ASCEND_PATCH_DONE "
FAILED_PREFIX = "ASCEND_PATCH_FAILED "


def command(model, prompts_file, *, max_tokens: int, logprobs: int = 0, tensor_parallel: int = 1,
            expert_parallel: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs this module on `model` with the prompts in `prompts_file`."""
    cmd = [sys.executable, "-m", "ascend_patch.harness.offline_run", str(model), "--prompts-json",
           str(prompts_file), "--max-tokens", str(max_tokens), "--logprobs", str(logprobs),
           "--tensor-parallel-size", str(tensor_parallel), *extra]
    if expert_parallel:
        cmd.append("--enable-expert-parallel")
    return cmd


def parse_result(log: str) -> dict | None:
    """The result a run printed (its last result line), or None if it printed none."""
    lines = [line for line in log.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def _outputs(outputs) -> list[dict]:
    return [
        {
            "prompt_tokens": len(o.prompt_token_ids or []),
            "token_ids": list(o.outputs[0].token_ids),
            # Per generated position: {token id: logprob} of the top candidates.
            "top_logprobs": [
                {str(tid): lp.logprob for tid, lp in position.items()}
                for position in (o.outputs[0].logprobs or [])
            ],
        }
        for o in outputs
    ]


def group_cpu_s() -> float | None:
    """CPU seconds used so far by the live processes of this process group (the engine core
    and workers vLLM started): against the wall time of a pass it shows how much of the
    machine the engine had, i.e. whether other work slowed a repeat down."""
    import os

    try:
        group = os.getpgid(0)
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return total / tick


def _timed(fn):
    cpu0, t0 = group_cpu_s(), time.perf_counter()
    result = fn()
    wall, cpu1 = time.perf_counter() - t0, group_cpu_s()
    return result, wall, (cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)


def run_workload(llm, prompts: list[str], args) -> dict:
    """One repeat: a timed prefill-only pass, then the timed greedy generation."""
    from vllm import SamplingParams

    # One generated token per prompt: the batch's prefill, timed on its own. Prefix caching
    # is off in the driver, so a repeat computes the prefill again instead of reading it back.
    _, prefill_s, prefill_cpu_s = _timed(lambda: llm.generate(
        prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, seed=args.seed,
                            logprobs=args.logprobs or None, ignore_eos=True)
    outputs, generate_s, generate_cpu_s = _timed(
        lambda: llm.generate(prompts, params, use_tqdm=False))
    return {"prefill_s": prefill_s, "generate_s": generate_s, "prefill_cpu_s": prefill_cpu_s,
            "generate_cpu_s": generate_cpu_s, "outputs": _outputs(outputs)}


def prompt_logprob_sum(llm, texts: list[str]) -> dict:
    """Sum of log p(token | text before it) over every text's tokens after its first: what a
    perplexity is computed from (exp(-sum / tokens)). Untimed; one prefill per text."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    per_prompt = []
    for output in llm.generate(texts, params, use_tqdm=False):
        ids = output.prompt_token_ids or []
        # Position 0 has no logprob (nothing before it); each entry holds the actual token.
        logprobs = [position[token].logprob
                    for position, token in zip(output.prompt_logprobs[1:], ids[1:])]
        per_prompt.append({"logprob_sum": sum(logprobs), "tokens": len(logprobs)})
    # Per prompt too: `tune` puts an interval over prompts on the NLL increase.
    return {"logprob_sum": sum(p["logprob_sum"] for p in per_prompt),
            "tokens": sum(p["tokens"] for p in per_prompt), "per_prompt": per_prompt}


def _status(prefix: str, data: dict) -> None:
    # One write of a short line: never split by the other processes writing to this stdout.
    sys.stdout.write(prefix + json.dumps(data) + "\n")
    sys.stdout.flush()


def _write_json(path: str, data: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def drive(llm, prompts: list[str], args, commands=None) -> None:
    """Serve run/perplexity commands from stdin until "quit" or end of file."""
    for line in commands if commands is not None else sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("op") == "quit":
            return
        try:
            if command["op"] == "run":
                data = run_workload(llm, prompts, args)
            elif command["op"] == "perplexity":
                data = prompt_logprob_sum(llm, prompts)
            else:
                raise ValueError(f"unknown op {command['op']!r}")
            _write_json(command["out"], data)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            _status(FAILED_PREFIX, {"id": command.get("id"),
                                    "error": f"{type(exc).__name__}: {exc}"})
            continue
        _status(DONE_PREFIX, {"id": command.get("id")})


def _exit_with_parent(parent: int) -> None:
    """End this process group when the parent is gone (killed, even with SIGKILL).

    The driver leads its own process group (ab starts it in a new session) and vLLM's engine
    core and workers belong to it: without this an A/B killed mid-run would leave engines
    loading models until they next read stdin."""
    import os
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="ab-driver-parent-watch", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompts-json", required=True, help="file with a JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--logprobs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--load-format", default="dummy",
                        help="dummy: random weights (the tiny models have none); auto: the files")
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help="vLLM's speculative_config as JSON, e.g. '{\"method\": \"mtp\", "
                        "\"num_speculative_tokens\": 1}'")
    parser.add_argument("--compilation-config", type=json.loads, default=None,
                        help="vLLM's compilation_config as JSON: runs compiled (not eager), "
                        "with vLLM's start-up warm-up, e.g. '{\"mode\": 1, \"backend\": "
                        "\"eager\"}'")
    parser.add_argument("--measure-prefill", action="store_true",
                        help="time a separate prefill-only pass (max_tokens=1) after a warm-up")
    parser.add_argument("--driver", action="store_true",
                        help="keep the engine up and run the workload on each stdin command")
    args = parser.parse_args()
    if args.driver:
        import os

        if os.getpgid(0) == os.getpid():  # only a group leader may end the whole group
            _exit_with_parent(os.getppid())

    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts_json).read_text())
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype="bfloat16",
        enforce_eager=args.compilation_config is None,
        **({"compilation_config": args.compilation_config} if args.compilation_config else {}),
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        speculative_config=args.speculative_config,
        # Repeats send the same prompts: a prefix cache would serve them from memory, and a
        # dropping arm would then drop nothing in its (skipped) prefill.
        **({"enable_prefix_caching": False} if args.driver else {}),
    )
    ready = time.perf_counter()
    if args.driver:
        _status(READY_PREFIX, {"startup_s": ready - started})
        drive(llm, prompts, args)
        return
    prefill_s = None
    if args.measure_prefill:
        # One generated token per prompt: the batch's prefill, timed on its own.
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        prefill_s = time.perf_counter() - t0
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, seed=args.seed,
        logprobs=args.logprobs or None, ignore_eos=True,
    )
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    result = {
        "startup_s": ready - started,
        "prefill_s": prefill_s,
        "generate_s": generate_s,
        "outputs": _outputs(outputs),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
