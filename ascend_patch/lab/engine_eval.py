"""Lab arms in vLLM's offline engine, real weights: prompt log-probabilities and greedy text.

    python -m ascend_patch.lab.engine_eval MODEL --prompts-json IDS.json --out RESULT.json
        [--gen-tokens 16] [--lab-rule seed] [--sweep ARMS.json] [--probe NAME,...]
        [--time-prefill 3]

IDS.json holds a list of prompts as token-id lists (fed as they are: no tokenizer round
trip). The engine runs in this process (the caller sets VLLM_ENABLE_V1_MULTIPROCESSING=0;
one worker: vLLM's uni executor), so the lab planner (lab/rules.py) and the op timers
installed here act on it. ASCEND_PATCH_CONFIG, if set, patches it as usual.

Without --sweep: one arm, named "arm", with the config's options (and --lab-rule). With
--sweep: ARMS.json is a list of {"name", "options", "rule"}; the model is loaded once and
each arm runs the same prompts with its options (lab/rules.py LAB.options), one after the
other. ASCEND_PATCH_CONFIG must then take the MoE layers over (any moe.capacity config).

Every prompt goes into one prefill step (max_num_batched_tokens is the sum of the prompt
lengths): each MoE layer plans its drops once over the whole batch, as a prefill node does.
Decode steps hold one token per prompt, below `min_tokens`, so they drop nothing.

RESULT.json: per arm and prompt, the log-probability of each prompt token after the first
and the argmax token at each of those positions (teacher forced), the greedy continuation
with each step's margin over the runner-up, and per planned MoE call the rows, drops and
per-rank max/mean load before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


class OpTimers:
    """Wall time spent in moe.capacity's custom ops (plan, experts) in this process."""

    def __init__(self) -> None:
        self.seconds = {"plan": 0.0, "experts": 0.0}
        self.calls = {"plan": 0, "experts": 0}

    def install(self) -> None:
        # The ops are registered from these module attributes on the first bind(), which
        # happens when vLLM loads the plugin: wrap them before the engine is built.
        from ascend_patch.impls.moe import custom_ops

        custom_ops._plan_impl = self._timed("plan", custom_ops._plan_impl)
        custom_ops.experts_impl = self._timed("experts", custom_ops.experts_impl)

    def _timed(self, name: str, fn):
        def timed(*args: Any):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def summarise(output: Any) -> dict[str, Any]:
    """Token log-probs and teacher-forced argmax ids of one RequestOutput."""
    ids = list(output.prompt_token_ids)
    logprobs, argmax = [], []
    for pos, position in enumerate(output.prompt_logprobs or []):
        entries = {} if position is None else dict(position.items())
        if pos == 0 or not entries:
            continue  # the first token has no prediction
        logprobs.append(float(entries[ids[pos]].logprob))
        best = next((tid for tid, lp in entries.items() if lp.rank == 1), ids[pos])
        argmax.append(int(best))
    # How close each greedy step was to a tie: log-prob of the chosen token minus the
    # runner-up's (numerically different kernels may flip a near tie).
    margins = []
    for position in output.outputs[0].logprobs or []:
        values = sorted((lp.logprob for lp in dict(position.items()).values()), reverse=True)
        margins.append(values[0] - values[1] if len(values) > 1 else float("inf"))
    return {
        "prompt_tokens": len(ids),
        "logprobs": logprobs,
        "argmax": argmax,
        "generated": list(output.outputs[0].token_ids),
        "generated_margins": margins,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--prompts-json", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lab-rule", default=None, help="a lab rule (lab/rules.py RULES)")
    parser.add_argument("--sweep", type=Path, default=None)
    parser.add_argument("--scales", type=Path, default=None,
                        help="per-layer per-expert output scales (JSON) for key:scaled")
    parser.add_argument("--probe", default="",
                        help="comma-separated arm names whose dropping calls are saved "
                        "(router weights, ids, keep mask) next to RESULT.json")
    parser.add_argument("--time-prefill", type=int, default=0, metavar="REPS",
                        help="also time REPS prefill-only passes (after one warm-up) and the "
                        "time spent in moe.capacity's ops during them")
    args = parser.parse_args()

    from ascend_patch.lab import rules

    sweep = (json.loads(args.sweep.read_text()) if args.sweep
             else [{"name": "arm", "options": None, "rule": args.lab_rule}])
    for arm in sweep:
        if args.sweep and arm.get("rule") and arm["rule"] not in rules.RULES:
            parser.error(f"arm {arm['name']}: unknown lab rule {arm['rule']!r}")
    with rules.installed(args.lab_rule) as lab:
        if args.scales:
            import torch

            lab.scales = [torch.tensor(layer) for layer in json.loads(args.scales.read_text())]
        result = evaluate(args, lab, sweep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))


def evaluate(args: argparse.Namespace, lab: Any, sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """Every arm of `sweep` in one engine of this process, planning through `lab`."""
    from ascend_patch.impls.moe.options import CapacityOptions

    timers = OpTimers()
    timers.install()
    probed = set(filter(None, args.probe.split(",")))

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids)
               for ids in json.loads(args.prompts_json.read_text())]
    total = sum(len(p["prompt_token_ids"]) for p in prompts)
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        seed=0,
        max_model_len=max(len(p["prompt_token_ids"]) for p in prompts) + args.gen_tokens + 8,
        max_num_batched_tokens=max(total, 256),
        max_num_seqs=max(len(prompts), 1),
        enable_prefix_caching=False,
    )
    result: dict[str, Any] = {"startup_s": time.perf_counter() - started, "arms": {}}
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, prompt_logprobs=1,
                            logprobs=2, ignore_eos=True)
    for arm in sweep:
        lab.reset()
        lab.rule = arm.get("rule")
        lab.options = CapacityOptions(**arm["options"]) if arm.get("options") else None
        lab.probe = arm["name"] in probed
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result["arms"][arm["name"]] = {
            "eval_s": time.perf_counter() - t0,
            "prompts": [summarise(o) for o in outputs],
            "calls": lab.calls,
        }
        if lab.probe:
            import torch

            torch.save(lab.plans, args.out.parent / f"plans-{arm['name']}.pt")
        print(f"arm {arm['name']}: {time.perf_counter() - t0:.1f} s", flush=True)
    if args.time_prefill:
        one = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate(prompts, one, use_tqdm=False)  # warm-up
        runs = []
        for _ in range(args.time_prefill):
            before = timers.snapshot()
            t0 = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            wall = time.perf_counter() - t0
            after = timers.snapshot()
            runs.append({"wall_s": wall, **{f"{k}_s": after[k] - before[k] for k in after}})
        result["prefill_runs"] = runs
    result["op_calls"] = timers.calls
    return result


if __name__ == "__main__":
    main()
