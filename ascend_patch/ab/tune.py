"""`ascend-patch tune`: from an accuracy budget to a pinned per-model profile.

Runs the repeated A/B of `ascend-patch ab` with r = 0 as the reference and one arm per
candidate (drop ratio, overflow mode): on the offline engine (offline.py, one engine per arm)
or, with --launch, on live servers (servers.py, one server per arm, started as `ab --launch`
starts them, the ratio set through ASCEND_PATCH_OVERRIDE). Then:

* loss of an arm: the held-out NLL increase per token against r = 0, from the prompt
  log-probabilities of every prompt (offline: the engine's prompt_logprobs; live: echoed
  completions, servers.prompt_nll; greedy, deterministic: repeats would give the same
  numbers; the uncertainty is over the prompts). Per prompt i, d_i = (log p_ref - log
  p_arm) / tokens_i; the interval is mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n) (Student t,
  two-sided 95%);
* speed of an arm: the median of the per-repeat paired speed-ups against r = 0 with its
  exact order-statistic 95% interval (stats.py), as `ab` reports it: offline the prefill
  speed-up (one batch of every prompt), live the TTFT speed-up (per round, the median time to
  first token); "measurably faster" means the interval lies above 1;
* choice (`choose`): among the arms whose loss interval's upper bound is within the budget
  and which are measurably faster, the largest ratio; at equal ratio the larger median
  speed-up, then the lower loss bound, then drop before reroute. If no arm is both, r = 0 is
  chosen and the reason says which condition failed.

The profile (`profile_for`) matches the model's architectures and the vLLM line the run
used, pins the chosen options of the `moe.capacity` patch, and records its evidence (samples,
intervals, versions, config digest, date). `write_config` writes a config that `extends`
the tuned one and holds that profile, atomically (temp file, then os.replace): an interrupt
leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ascend_patch.ab.stats import Estimate

# Student t quantiles t(0.975, df) for df = 1..30; above 30 the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
OVERFLOWS = ("drop", "reroute")


@dataclass(frozen=True)
class Loss:
    """NLL increase per token against r = 0 over n prompts: mean and 95% interval."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    def as_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "prompts": self.n,
                "unit": "nats per token against r = 0",
                "method": "Student t 95% interval over prompts"}


def loss_interval(reference: list[dict[str, float]], arm: list[dict[str, float]]) -> Loss:
    """`reference` and `arm`: per prompt {"logprob_sum", "tokens"}, the same prompts."""
    if len(reference) != len(arm) or not reference:
        raise ValueError(f"{len(arm)} prompts against {len(reference)}: need the same, >= 1")
    diffs = [(r["logprob_sum"] - a["logprob_sum"]) / r["tokens"]
             for r, a in zip(reference, arm) if r["tokens"]]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    if n < 2:
        return Loss(mean, None, None, n)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return Loss(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Candidate:
    ratio: float
    overflow: str
    loss: Loss
    speedup: Estimate  # r = 0 time over arm time, paired per repeat
    measure: str = "prefill"  # which time: "prefill" (offline) or "TTFT" (live servers)

    @property
    def label(self) -> str:
        return f"r={self.ratio:g} {self.overflow}"

    def within(self, max_loss: float) -> bool:
        return self.loss.hi is not None and self.loss.hi <= max_loss

    def faster(self) -> bool:
        return self.speedup.lo is not None and self.speedup.lo > 1.0


@dataclass(frozen=True)
class Choice:
    candidate: Candidate | None  # None: r = 0
    reason: str

    @property
    def options(self) -> dict[str, Any]:
        if self.candidate is None:
            return {"drop_token_ratio": 0.0}
        return {"drop_token_ratio": self.candidate.ratio, "overflow": self.candidate.overflow}


def choose(candidates: list[Candidate], max_loss: float) -> Choice:
    within = [c for c in candidates if c.within(max_loss)]
    eligible = [c for c in within if c.faster()]
    if eligible:
        best = max(eligible, key=lambda c: (c.ratio, c.speedup.median, -c.loss.hi,
                                            -OVERFLOWS.index(c.overflow)))
        return Choice(best, (
            f"{best.label}: the largest setting whose loss bound {best.loss.hi:.4g} is within "
            f"{max_loss:g} nats/token and whose {best.measure} speed-up [{best.speedup.lo:.3f}, "
            f"{best.speedup.hi:.3f}] is above 1"))
    if not within:
        return Choice(None, f"r=0: no setting's loss interval stays within {max_loss:g} "
                            f"nats/token (upper bounds: " + ", ".join(
                                f"{c.label} {_bound(c.loss.hi)}" for c in candidates) + ")")
    return Choice(None, "r=0: no setting within the budget gives a measurable speed gain "
                        f"({within[0].measure} speed-up intervals: " + ", ".join(
                            f"{c.label} {_interval(c.speedup)}" for c in within) + ")")


def _bound(value: float | None) -> str:
    return "none (fewer than 2 prompts)" if value is None else f"{value:.4g}"


def _interval(estimate: Estimate) -> str:
    if estimate.lo is None:
        return f"{estimate.median:.3f} (no interval: {estimate.n} repeats)"
    return f"[{estimate.lo:.3f}, {estimate.hi:.3f}]"


def profile_name(architectures: list[str], line: str) -> str:
    arch = (architectures[0] if architectures else "model").lower()
    name = "".join(ch if ch.isalnum() else "-" for ch in arch)
    return f"tuned-{name}-vllm{line.replace('.', '-')}"


def profile_for(choice: Choice, *, patch: str, architectures: list[str], line: str,
                evidence: dict[str, Any]) -> dict[str, Any]:
    """The profile (YAML-ready): match on the architectures and the vLLM line, the chosen
    options pinned on `patch`, the evidence recorded."""
    major, minor = (int(part) for part in line.split(".")[:2])
    return {
        "description": f"ascend-patch tune: {choice.reason}",
        "match": {"architectures": list(architectures),
                  "vllm": f">={major}.{minor},<{major}.{minor + 1}"},
        "patches": {patch: {"options": choice.options}},
        "evidence": evidence,
    }


def config_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config_text(extends: Path, target: Path, name: str, profile: dict[str, Any]) -> str:
    """A config extending `extends` (relative to the file written, when it can be) with one
    profile."""
    import yaml

    try:
        base = os.path.relpath(Path(extends).resolve(), Path(target).resolve().parent)
    except ValueError:  # another drive (Windows): keep it absolute
        base = str(Path(extends).resolve())
    body = {"version": 1, "extends": base, "profiles": {name: profile}}
    header = ("# Written by `ascend-patch tune`: the base config with the tuned profile.\n"
              "# Re-running tune replaces this file whole.\n")
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def write_config(target: Path, text: str) -> None:
    """Write `text` to `target` atomically: a temp file beside it, fsync, os.replace."""
    target = Path(target)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                    dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:  # Ctrl-C included: no temp file left behind
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the run


def candidate_arms(config: Path, patch: str, ratios: list[float],
                   overflows: list[str]) -> list[Any]:
    """r = 0 (the reference) first, then one arm per (ratio, overflow)."""
    from ascend_patch.ab.common import Arm

    arms = [Arm("r=0", config, {patch: {"drop_token_ratio": 0.0}}, 0.0)]
    for ratio in ratios:
        for overflow in overflows:
            arms.append(Arm(f"r={ratio:g} {overflow}", config,
                            {patch: {"drop_token_ratio": ratio, "overflow": overflow}}, ratio))
    return arms


class TuneFailed(RuntimeError):
    pass


def candidates_from(arms: list[Any], nlls: list[dict[str, Any] | None],
                    speedups: list[Estimate], measure: str = "prefill") -> list[Candidate]:
    """One candidate per arm after the reference (arms[0], r = 0): its loss from the arms'
    held-out NLL measurements, its speed-up as measured against the reference."""
    reference = _per_prompt(arms[0], nlls[0])
    out = []
    for arm, nll, speedup in zip(arms[1:], nlls[1:], speedups[1:]):
        overflow = arm.override[next(iter(arm.override))]["overflow"]
        out.append(Candidate(arm.ratio, overflow, loss_interval(reference, _per_prompt(arm, nll)),
                             speedup, measure))
    return out


def _per_prompt(arm: Any, nll: dict[str, Any] | None) -> list[dict[str, float]]:
    data = nll or {}
    if "per_prompt" not in data:
        raise TuneFailed(f"{arm.label}: no prompt log-probabilities "
                         f"({data.get('error', 'none returned')}): no loss to tune on")
    return data["per_prompt"]


def evidence(args: Any, candidates: list[Candidate], choice: Choice, model: Path, line: str,
             speed: dict[str, Any]) -> dict[str, Any]:
    """`speed`: "measure" (what was timed, how), "mode" and the per-repeat times of the
    reference ("reference_s") and of each candidate ("arms_s"), plus what the mode adds."""
    import datetime

    from ascend_patch import __version__
    from ascend_patch.core.versions import installed_vllm

    vllm = installed_vllm()
    times = speed["arms_s"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": f"ascend-patch {__version__} tune",
        "vllm": str(vllm.version) if vllm else None, "vllm_line": line,
        "config": str(args.config), "config_sha256": config_digest(Path(args.config)),
        "model": str(model), "max_loss": args.max_loss,
        "prompts": len(args.prompts or []) or args.num_prompts, "repeats": args.repeats,
        "warmup": args.warmup, "seed": args.seed,
        "chosen": choice.candidate.label if choice.candidate else "r=0",
        **{key: value for key, value in speed.items() if key != "arms_s"},
        "arms": [{"label": c.label, "drop_token_ratio": c.ratio, "overflow": c.overflow,
                  "nll_increase": c.loss.as_json(), "speedup": c.speedup.as_json(),
                  "times_s": arm_times}
                 for c, arm_times in zip(candidates, times)],
    }


def _nll_of(nll: dict[str, Any]) -> dict[str, Any]:
    """The r = 0 arm's held-out NLL: what the increases are measured against."""
    return {"nats_per_token": -nll["logprob_sum"] / nll["tokens"], "tokens": nll["tokens"]}


def _offline(args: Any, arms: list[Any], model: Path, work: Path, console
             ) -> tuple[list[Candidate], dict[str, Any]]:
    from ascend_patch.ab.common import held_out_prompts
    from ascend_patch.ab.offline import offline_metrics, run_offline

    runs = run_offline(args, arms, model, held_out_prompts(args), work, console)
    rows = offline_metrics(runs, args.first_tokens)
    nlls = [run.perplexity for run in runs]
    candidates = candidates_from(arms, nlls, [row["prefill_speedup"] for row in rows])
    times = [[sample["prefill_s"] for sample in run.samples] for run in runs]
    return candidates, {"reference_nll": _nll_of(nlls[0]),
        "mode": "offline engine, one per arm",
        "measure": "prefill: one batch of every prompt with 1 new token, per repeat",
        "reference_s": times[0], "arms_s": times[1:]}


def _live(args: Any, arms: list[Any], work: Path, console
          ) -> tuple[list[Candidate], dict[str, Any]]:
    from ascend_patch.ab.servers import (
        launched_servers,
        placement_of,
        round_medians,
        run_servers,
        server_metrics,
    )

    args.served_model = None  # the launched servers serve --model
    servers = launched_servers(args, work, arms)
    together, placement = placement_of(args, servers)
    console.print(f"servers {placement}", markup=False)
    run_servers(args, servers, together, console)
    rows = server_metrics(servers, args.first_tokens)
    nlls = [server.nll for server in servers]
    candidates = candidates_from(arms, nlls, [row["ttft_speedup"] for row in rows],
                                 measure="TTFT")
    times = [round_medians(server, "ttft_s") for server in servers]
    return candidates, {"reference_nll": _nll_of(nlls[0]),
        "mode": f"live servers, one per arm ({placement})",
        "measure": (f"TTFT: per round of {args.requests} streamed requests ({args.concurrency} "
                    f"at a time), the median time to first token"),
        "requests": args.requests, "concurrency": args.concurrency,
        "reference_s": times[0], "arms_s": times[1:]}


def run_tune(args: Any) -> int:
    import json

    import yaml
    from rich.console import Console

    from ascend_patch.ab.common import check_arms, resolve_load_format
    from ascend_patch.ab.engine import EngineFailed
    from ascend_patch.ab.offline import capacity_patch_name
    from ascend_patch.ab.servers import ServerFailed
    from ascend_patch.core.versions import detect_stack

    console = Console(highlight=False, stderr=args.write is None)
    config, model = Path(args.config).resolve(), Path(args.model)
    patch = capacity_patch_name(config, args.patch)
    architectures = json.loads((model / "config.json").read_text()).get("architectures") or []
    line = detect_stack().line
    arms = candidate_arms(config, patch, args.ratios, args.overflow)
    check_arms(arms)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tune-", dir=out_dir))
    args.load_format = resolve_load_format(args.load_format, model)
    prompts = len(args.prompts) if args.prompts is not None else args.num_prompts
    console.print(f"tune: {len(arms)} {'servers' if args.launch else 'arms'} (r=0 and "
                  f"{len(arms) - 1} candidates) on {model.name}, {prompts} held-out prompts, "
                  f"{args.repeats} repeats", markup=False)
    try:
        candidates, speed = (_live(args, arms, work, console) if args.launch
                             else _offline(args, arms, model, work, console))
    except (EngineFailed, ServerFailed, TuneFailed) as exc:
        console.print(str(exc), markup=False)
        return 1
    for c in candidates:
        console.print(f"  {c.label}: NLL increase {c.loss.mean:+.4f} [{_bound(c.loss.lo)}, "
                      f"{_bound(c.loss.hi)}] nats/token, {c.measure} x{c.speedup.median:.3f} "
                      f"{_interval(c.speedup)}", markup=False)
    choice = choose(candidates, args.max_loss)
    console.print(f"chosen: {choice.reason}", markup=False)
    name = args.profile or profile_name(architectures, line)
    profile = profile_for(choice, patch=patch, architectures=architectures, line=line,
                          evidence=evidence(args, candidates, choice, model, line, speed))
    if args.write is None:
        print(yaml.safe_dump({"profiles": {name: profile}}, sort_keys=False), end="")
        return 0
    write_config(Path(args.write), config_text(config, Path(args.write), name, profile))
    console.print(f"wrote profile {name!r} to {args.write} (extends {args.config})",
                  markup=False)
    return 0
