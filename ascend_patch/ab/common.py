"""What offline arms (offline.py) and live servers (servers.py) share: what an arm is and
whether its config holds, what its processes reported, how its greedy outputs agree with the
reference's, and the machine facts a result is read against.

Both modes import this module and nothing of each other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ascend_patch.core.report import read_reports

STOCK = "stock"
# How often an arm's processes rewrite their reports: ab reads them while the engines are up
# (vLLM's workers are killed, not asked, at the end, so a report written at exit may be lost).
REPORT_INTERVAL_S = 0.5
# After each step a vLLM worker polls its shared-memory queue busily for 1 s before it goes to
# sleep (shm_broadcast.py: busy_loop_s=1 in vLLM 0.23 and 0.32), and on the CPU platform every
# engine has such a worker process, even at TP 1 (platforms/cpu.py forces the mp executor:
# cpu.py:336-341 in 0.32, :146 in 0.23). An arm that runs right after another one on the same
# CPUs would share them with that poll: wait it out before switching engines.
WORKER_SETTLE_S = 1.2


@dataclass
class Arm:
    label: str
    config: Path | None  # None: stock vLLM, ASCEND_PATCH_CONFIG unset
    override: dict[str, dict[str, Any]] | None = None
    ratio: float | None = None

    def describe(self) -> str:
        if self.config is None:
            return "vLLM with no patch (ASCEND_PATCH_CONFIG unset)"
        text = str(self.config)
        if self.override:
            text += " with ASCEND_PATCH_OVERRIDE=" + json.dumps(self.override)
        return text


def arm_env(arm: Arm, report_dir: Path | None, workers: int) -> dict[str, str]:
    """The environment of an arm's engine or server: vllm_env drops every inherited
    ASCEND_PATCH_* variable, so the stock arm runs with no config at all."""
    from ascend_patch.harness.procs import vllm_env

    env: dict[str, str] = {}
    if arm.config is not None:
        env["ASCEND_PATCH_CONFIG"] = str(arm.config)
        if report_dir is not None:
            env["ASCEND_PATCH_REPORT_DIR"] = str(report_dir)
            env["ASCEND_PATCH_REPORT_INTERVAL"] = str(REPORT_INTERVAL_S)
        if arm.override:
            env["ASCEND_PATCH_OVERRIDE"] = json.dumps(arm.override)
    return vllm_env(workers=workers, **env)


def check_arms(arms: list[Arm]) -> None:
    """Everything an arm needs, checked before any engine starts: its config loads, its
    override validates (for the base patches and every profile), and its environment is
    accepted by the loader. Raises ConfigError naming the arm."""
    from ascend_patch.core import effective, runtime
    from ascend_patch.core.config import load_config
    from ascend_patch.core.errors import ConfigError
    from ascend_patch.core.settings import Settings

    problems = []
    for arm in arms:
        if arm.config is None:
            continue  # stock: nothing to check
        try:
            config = load_config(arm.config)
            env = {runtime.CONFIG_ENV: str(arm.config)}
            if arm.override:
                env[runtime.OVERRIDE_ENV] = json.dumps(arm.override)
            values = Settings.from_environ(env)
            if values.override is not None:
                effective.check_override(config, values.override)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------- what an arm ran


def summarize_reports(report_dir: Path | None) -> dict[str, Any]:
    """What the arm's processes said they run: config, digest, each patch's status and
    options, and moe.capacity's counters (of the first worker: counts are global over EP)."""
    reports = read_reports(report_dir) if report_dir is not None and report_dir.is_dir() else []
    if not reports:
        return {}
    first = reports[0]
    patches: dict[str, dict[str, Any]] = {}
    # Workers first: they build the model, so they are where a lazy patch is applied.
    ranked = sorted(reports, key=lambda r: (r["role"] != "worker", r["role"] != "engine_core",
                                            r["label"]))
    for report in ranked:
        for patch in report.get("patches", []):
            entry = patches.setdefault(patch["name"], {
                "impl": patch["impl"], "options": patch.get("options"), "status": {}})
            entry["status"][report["label"]] = patch["status"]
    moe_stats: dict[str, Any] = {}
    for report in ranked:
        for patch in report.get("patches", []):
            if patch["impl"] == "moe.capacity" and patch["status"] == "applied" and not moe_stats:
                moe_stats = patch.get("stats", {})
    return {"config": first.get("config"), "digest": first.get("digest"),
            "profile": first.get("profile"), "vllm": first.get("vllm"),
            "ascend_patch": first.get("ascend_patch"),
            "roles": [r["label"] for r in reports], "patches": patches, "moe_stats": moe_stats}


_KEY_OPTIONS = ("drop_token_ratio", "granularity", "drop_policy", "keep_top1", "min_tokens",
                "dispatch")


def describe_patches(summary: dict[str, Any]) -> str:
    """One line per arm for the legend: which patches ran, with moe.capacity's key options."""
    if not summary:
        return "no report"
    parts = []
    for name, patch in summary["patches"].items():
        statuses = set(patch["status"].values())
        status = "applied" if "applied" in statuses else "/".join(sorted(statuses))
        text = f"{name} ({patch['impl']}) {status}"
        options = patch.get("options") or {}
        if patch["impl"] == "moe.capacity":
            text += " " + " ".join(f"{k}={options[k]}" for k in _KEY_OPTIONS if k in options)
        parts.append(text)
    digest = (summary.get("digest") or "")[:12]
    head = f"{Path(summary['config']).name} sha256 {digest}" if summary.get("config") else ""
    return "; ".join([head, *parts]) if head else "; ".join(parts)


# ---------------------------------------------------------------- accuracy


def make_prompts(count: int, length: int, seed: int, vocab: int = 500) -> list[str]:
    """Deterministic prompts of `length` words of the tiny model's WordLevel vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(length)) for _ in range(count)]


def held_out_prompts(args) -> list[str]:
    """The prompts an A/B measures (and whose NLL it takes): --prompts' file, else
    --num-prompts generated prompts of --prompt-len words."""
    if args.prompts is not None:
        return list(args.prompts)
    return make_prompts(args.num_prompts, args.prompt_len, args.seed)


def perplexity(data: dict[str, Any] | None) -> float | None:
    """From a held-out NLL measurement ({"logprob_sum", "tokens", ...}: the offline engine's
    prompt_logprob_sum or servers.prompt_nll), None when there is none."""
    if not data or "error" in data or not data.get("tokens"):
        return None
    return math.exp(-data["logprob_sum"] / data["tokens"])


def compare(ref_outs: list[dict[str, Any]], outs: list[dict[str, Any]],
            first_tokens: int) -> dict[str, Any]:
    """Agreement of one arm's greedy outputs with the reference's, prompt by prompt."""
    exact = sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref_outs, outs))
    same_tokens = total_tokens = 0
    diffs: list[float] = []
    missing = 0
    for ref, out in zip(ref_outs, outs):
        for a, b in zip(ref["token_ids"], out["token_ids"]):
            total_tokens += 1
            same_tokens += a == b
        # Logprob of the reference's token under each arm, over the first positions where the
        # two arms still saw the same text (after a divergence the contexts differ).
        for i in range(min(first_tokens, len(ref["top_logprobs"]), len(out["top_logprobs"]))):
            token = str(ref["token_ids"][i])
            if token not in out["top_logprobs"][i]:
                missing += 1
                break
            diffs.append(abs(out["top_logprobs"][i][token] - ref["top_logprobs"][i][token]))
            if ref["token_ids"][i] != out["token_ids"][i]:
                break
    return {
        "exact_match_rate": exact / len(ref_outs) if ref_outs else 1.0,
        "token_agreement": same_tokens / total_tokens if total_tokens else 1.0,
        "first_logprob_mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
        "first_logprob_positions": len(diffs),
        "first_logprob_missing": missing,
    }


# ---------------------------------------------------------------- the machine and the model


def resolve_load_format(choice: str, model: Path) -> str:
    """'auto' loads real weights when the folder has any; a model folder without weights
    (`ascend-patch tiny-model`) can only run on vLLM's random dummy weights."""
    if choice != "auto":
        return choice
    weights = any(model.glob("*.safetensors")) or any(model.glob("*.bin"))
    return "auto" if weights else "dummy"


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe_load(before: list[float] | None, after: list[float] | None) -> str:
    if before is None or after is None:
        return ""
    return (f"Load average (1 min) {before[0]:.1f} before, {after[0]:.1f} after, on {cpus()} "
            "CPUs.")
