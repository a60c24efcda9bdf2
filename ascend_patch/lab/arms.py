"""Arms of a drop-accuracy study: config, engine processes, and the metrics.

An arm is one setting of moe.capacity (ratio, policy, keep_top1, renormalize), a lab rule
(lab/rules.py), or the stock engine (no patch). `run_arm` runs one arm in its own process,
configured by its own file, as a deployment would; `run_sweep` runs many in one process
(one model load; the lab planner takes each arm's options in turn). Both run
`ascend_patch.lab.engine_eval` on the same held-out prompts; `compare` scores an arm against
a reference arm position by position.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ascend_patch.harness.procs import run_in_group, vllm_env

# The seed PR's rule has no protected row and no renormalisation.
SEED = "seed"
PRODUCT_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class Arm:
    ratio: float = 0.0
    policy: str = "probs"  # a drop_policy value, or a lab rule (SEED, "key:...": lab/rules.py)
    keep_top1: bool = True
    renormalize: bool = False
    stock: bool = False  # no ASCEND_PATCH_CONFIG at all
    overflow: str = "drop"  # moe.capacity's overflow: "drop" or "reroute"

    @property
    def name(self) -> str:
        if self.stock:
            return "stock"
        if self.ratio == 0:
            return "r0"
        flags = ("" if self.policy == SEED else
                 f"-top1{int(self.keep_top1)}-renorm{int(self.renormalize)}")
        overflow = "" if self.overflow == "drop" else f"-{self.overflow}"
        return f"r{self.ratio:g}-{self.policy}{flags}{overflow}"

    @property
    def rule(self) -> str | None:
        """The lab rule this arm needs (None: the product's own policy)."""
        return None if self.policy in PRODUCT_POLICIES or self.ratio == 0 else self.policy

    def options(self, simulate_ep_size: int, min_tokens: int) -> dict[str, Any]:
        """moe.capacity options of this arm (the seed rule plans with position's, the key
        rules with probs')."""
        policy = self.policy if self.policy in PRODUCT_POLICIES else (
            "position" if self.policy == SEED else "probs")
        return {
            "drop_token_ratio": self.ratio,
            "drop_policy": policy,
            "keep_top1": self.keep_top1,
            "renormalize": self.renormalize,
            "simulate_ep_size": simulate_ep_size,
            "min_tokens": min_tokens,
            "overflow": self.overflow,
            "log_interval": 1,
        }

    def config_text(self, simulate_ep_size: int, min_tokens: int) -> str:
        options = self.options(simulate_ep_size, min_tokens)
        lines = ["version: 1", "patches:", "  - name: moe", "    impl: moe.capacity",
                 "    options:"]
        lines += [f"      {key}: {json.dumps(value)}" for key, value in options.items()]
        return "\n".join(lines) + "\n"


def seed_arm(ratio: float) -> Arm:
    return Arm(ratio=ratio, policy=SEED, keep_top1=False, renormalize=False)


def stdlib_heldout_text(held_out: bool = True) -> str:
    """Every held-out (or, with held_out False, training) file of scripts/train_tiny_moe.py's
    split of this interpreter's standard library, as that script reads them (held out: about
    165k tokens on CPython 3.11.7): more text than heldout.txt, for studies that need the
    statistical power."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_moe.py"
    spec = importlib.util.spec_from_file_location("train_tiny_moe", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    root = train.stdlib_root()
    return "".join(f"# ---- {rel}\n" + train.read_text(root, rel)
                   for rel in train.corpus_files(root) if train.is_held_out(rel) == held_out)


def heldout_prompts(model_dir: Path, count: int, length: int,
                    text: str | None = None) -> list[list[int]]:
    """`count` consecutive chunks of `length` tokens of `text` (default: the model's
    heldout.txt)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    if text is None:
        text = (Path(model_dir) / "heldout.txt").read_text()
    ids = tokenizer.encode(text).ids
    if len(ids) < count * length:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than "
                         f"{count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def _run(cmd_tail: list[str], model_dir: Path, prompts_file: Path, out_dir: Path,
         config_text: str | None, *, gen_tokens: int, timeout: float,
         python: str) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "ascend_patch.lab.engine_eval", str(model_dir), "--prompts-json",
           str(prompts_file), "--out", str(out_dir / "result.json"), "--gen-tokens",
           str(gen_tokens), *cmd_tail]
    # One process: the lab planner installed by engine_eval must be the one the engine calls.
    extra = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if config_text is not None:
        config = out_dir / "config.yaml"
        config.write_text(config_text)
        extra.update(ASCEND_PATCH_CONFIG=str(config),
                     ASCEND_PATCH_REPORT_DIR=str(out_dir / "reports"))
    started = time.perf_counter()
    code, log = run_in_group(cmd, vllm_env(**extra), timeout,
                             cwd=Path(__file__).resolve().parents[2])
    (out_dir / "log.txt").write_text(log)
    result_path = out_dir / "result.json"
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"{out_dir.name} failed (exit {code}); log {out_dir / 'log.txt'}:\n"
                           f"{log[-4000:]}")
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - started
    result["moe_stats"] = None if config_text is None else moe_stats(out_dir / "reports")
    return result


def run_arm(arm: Arm, model_dir: Path, prompts_file: Path, work: Path, *,
            simulate_ep_size: int = 4, min_tokens: int = 64, gen_tokens: int = 16,
            time_prefill: int = 0, timeout: float = 900,
            python: str = sys.executable) -> dict[str, Any]:
    """One arm in its own process, configured by its own config file (the stock arm: no
    config at all). Returns the arm's result with the process's moe stats."""
    tail = ["--lab-rule", arm.rule] if arm.rule else []
    if time_prefill:
        tail += ["--time-prefill", str(time_prefill)]
    config = None if arm.stock else arm.config_text(simulate_ep_size, min_tokens)
    result = _run(tail, model_dir, prompts_file, work / arm.name, config,
                  gen_tokens=gen_tokens, timeout=timeout, python=python)
    (only,) = result.pop("arms").values()
    return {**result, **only, "arm": {**asdict(arm), "name": arm.name}}


def run_sweep(arms: list[Arm], model_dir: Path, prompts_file: Path, work: Path, *,
              simulate_ep_size: int = 4, min_tokens: int = 64, gen_tokens: int = 16,
              probe: tuple[str, ...] = (), scales: Path | None = None,
              timeout: float = 1800, python: str = sys.executable) -> dict[str, dict[str, Any]]:
    """Every (patched) arm in one engine process: the model is loaded once and each arm's
    options replace the config's in the planner (lab/rules.py). Returns results by name."""
    sweep = [{"name": a.name, "options": a.options(simulate_ep_size, min_tokens),
              "rule": a.rule}
             for a in arms if not a.stock]
    sweep_file = work / "sweep" / "arms.json"
    sweep_file.parent.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(json.dumps(sweep, indent=1))
    tail = ["--sweep", str(sweep_file)]
    if probe:
        tail += ["--probe", ",".join(probe)]
    if scales:
        tail += ["--scales", str(scales)]
    # With a reroute arm the engine is loaded with overflow: reroute, so that the router
    # scores reach the planner (adapters/router_scores.py); drop arms ignore them.
    reroute = any(a.overflow == "reroute" for a in arms)
    base = Arm(0.0, overflow="reroute" if reroute else "drop").config_text(
        simulate_ep_size, min_tokens)
    result = _run(tail, model_dir, prompts_file, work / "sweep", base, gen_tokens=gen_tokens,
                  timeout=timeout, python=python)
    by_name = {a.name: a for a in arms}
    return {name: {**arm_result, "arm": {**asdict(by_name[name]), "name": name}}
            for name, arm_result in result["arms"].items()}


def moe_stats(report_dir: Path) -> dict[str, Any] | None:
    """The moe patch's counters from the process report that ran the model."""
    from ascend_patch.core.report import read_reports

    for report in read_reports(report_dir):
        for patch in report.get("patches", []):
            stats = patch.get("stats") or {}
            if patch.get("name") == "moe" and stats.get("rows_routed"):
                return stats
    return None


def nll(result: dict[str, Any]) -> float:
    """Mean negative log-likelihood (nats per token) over every scored prompt position."""
    values = [lp for p in result["prompts"] for lp in p["logprobs"]]
    return -sum(values) / len(values)


def compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Metrics of `result` against `reference` (same prompts), position by position.

    delta_nll: mean increase of the token NLL (signed: a drop may help a token by chance);
    abs_delta_logprob: mean |change| of the token log-probability, how far the predictions
    moved at all (never negative, far less noisy); per_prompt_delta_nll for paired tests."""
    per_prompt_delta, agree, positions, prefix, generated = [], 0, 0, [], 0
    abs_total = 0.0
    for mine, ref in zip(result["prompts"], reference["prompts"], strict=True):
        delta = [r - m for m, r in zip(mine["logprobs"], ref["logprobs"], strict=True)]
        per_prompt_delta.append(sum(delta) / len(delta))
        abs_total += sum(map(abs, delta))
        agree += sum(a == b for a, b in zip(mine["argmax"], ref["argmax"], strict=True))
        positions += len(mine["argmax"])
        common = 0
        for a, b in zip(mine["generated"], ref["generated"]):
            if a != b:
                break
            common += 1
        prefix.append(common)
        generated += len(ref["generated"])
    n = len(per_prompt_delta)
    mean_delta = sum(per_prompt_delta) / n
    # Spread of the per-prompt mean increases: how much the figure depends on the text.
    stderr = statistics.stdev(per_prompt_delta) / math.sqrt(n) if n > 1 else 0.0
    return {
        "nll": nll(result),
        "perplexity": math.exp(nll(result)),
        "delta_nll": mean_delta,
        "delta_nll_stderr": stderr,
        "per_prompt_delta_nll": per_prompt_delta,
        "abs_delta_logprob": abs_total / positions,
        "argmax_agreement": agree / positions,
        "generated_prefix_agreement": sum(prefix) / max(generated, 1),
    }


def prefill_loads(calls: list[dict[str, Any]], min_rows: int) -> dict[str, Any]:
    """Rows dropped and per-rank max/mean load of the prefill calls (one per MoE layer: the
    calls with at least `min_rows` routed rows), from the lab planner's per-call record."""
    prefill = [c for c in calls if c["rows"] >= min_rows]
    if not prefill:
        return {}
    rows = sum(c["rows"] for c in prefill)
    dropped = sum(c["dropped"] for c in prefill)
    rerouted = sum(c.get("rerouted", 0) for c in prefill)
    return {
        "prefill_calls": len(prefill),
        "rows_routed": rows,
        "rows_dropped": dropped,
        "rows_rerouted": rerouted,
        # Rows the experts compute, and the bottleneck: the most loaded bin, summed over the
        # prefill calls (what sets the step time under EP).
        "rows_computed": rows - dropped + rerouted,
        "bottleneck_rows": sum(c["max_after"] for c in prefill),
        "budget": sum(c["budget"] for c in prefill),
        "drop_fraction": dropped / rows,
        "max_over_mean_before": [round(c["max_before"] / c["mean_before"], 4) for c in prefill],
        "max_over_mean_after": [round(c["max_after"] / c["mean_after"], 4) for c in prefill],
    }
