"""Run prompts through vLLM's offline engine and print the result as one JSON line.

    python -m ascend_patch.cli.offline_run MODEL_DIR --prompts-json FILE [--max-tokens N] ...

Its own process, so each run (an A/B arm, a test) gets a fresh vLLM with the patches that
ASCEND_PATCH_CONFIG names. The output line starts with RESULT_PREFIX.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULT_PREFIX = "ASCEND_PATCH_RESULT "


def command(model, prompts_file, *, max_tokens: int, logprobs: int = 0, tensor_parallel: int = 1,
            expert_parallel: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs this module on `model` with the prompts in `prompts_file`."""
    cmd = [sys.executable, "-m", "ascend_patch.cli.offline_run", str(model), "--prompts-json",
           str(prompts_file), "--max-tokens", str(max_tokens), "--logprobs", str(logprobs),
           "--tensor-parallel-size", str(tensor_parallel), *extra]
    if expert_parallel:
        cmd.append("--enable-expert-parallel")
    return cmd


def parse_result(log: str) -> dict | None:
    """The result a run printed (its last result line), or None if it printed none."""
    lines = [line for line in log.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


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
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help="vLLM's speculative_config as JSON, e.g. '{\"method\": \"mtp\", "
                        "\"num_speculative_tokens\": 1}'")
    parser.add_argument("--measure-prefill", action="store_true",
                        help="time a separate prefill-only pass (max_tokens=1) after a warm-up")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts_json).read_text())
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        enforce_eager=True,
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        speculative_config=args.speculative_config,
    )
    ready = time.perf_counter()
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
        "outputs": [
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
        ],
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
